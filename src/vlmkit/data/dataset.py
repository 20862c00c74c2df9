"""LLaVA-format conversation data (docs/design.md, "Data format"): reading, validation, per-sample encoding and collation.

``read_records`` parses a JSON array or JSONL file into ``Record``s and fails on the first malformed
record with a ``DataError`` naming its id and field. ``ConversationDataset`` turns a record into token
ids, labels (assistant turns only) and preprocessed pixels; a record whose image is missing or corrupt
becomes a ``Skipped`` marker instead of an exception, so one bad file never stops a run. ``collate``
right-pads a micro-batch and carries the skipped markers along for counting.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmkit.processing.image import ImageLoadError, load_image
from vlmkit.processing.processor import Sample, VLMProcessor
from vlmkit.processing.prompting import IGNORE_INDEX
from vlmkit.processing.tiling import TileLayout

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TOKEN = "<image>"


class DataError(ValueError):
    """A data file or record is malformed; the message names the file, the record id and the field."""


@dataclass(frozen=True)
class Record:
    """One conversation: plain ``{"role", "content"}`` messages and image paths (as written in the file)."""

    id: str
    messages: list[dict[str, str]]
    images: tuple[str, ...] = ()


@dataclass
class Example:
    """An encoded record: input_ids [seq], labels [seq], pixel_values [images, 3, S, S].

    AnyRes: pixel_values [tiles, 3, S, S] (per image its base view, then its tiles) and one layout per image.
    """

    id: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    image_layouts: list[TileLayout] = field(default_factory=list)


@dataclass(frozen=True)
class Skipped:
    """A record left out of training, with the reason (missing/corrupt image, too long)."""

    id: str
    reason: str


@dataclass
class Batch:
    """A right-padded micro-batch. input_ids/attention_mask/labels [batch, seq]; pixel_values [images, 3, S, S]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    ids: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    image_layouts: list[TileLayout] = field(default_factory=list)  # AnyRes: one per image, in order

    @property
    def num_target_tokens(self) -> int:
        """Tokens that carry a loss: the labels the shifted next-token objective actually scores."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------------------------- reading


def read_records(path: str | Path) -> list[Record]:
    """Parse a LLaVA-format JSON array or JSONL file; the first malformed record raises ``DataError``."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise DataError(f"data file not found: {source}")
    raws = _load_raw(source)
    if not raws:
        raise DataError(f"{source}: contains no records")
    records = [parse_record(raw, source=str(source), position=position) for position, raw in raws]
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        if record.id in seen:
            raise DataError(
                f"{source}: record id {record.id!r} appears twice (records {seen[record.id]} and {index})"
            )
        seen[record.id] = index
    return records


def _load_raw(source: Path) -> list[tuple[str, Any]]:
    """-> [(position for messages, raw object)] from a JSON array or one JSON object per line."""
    text = source.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise DataError(f"{source}: expected a JSON array of records or JSONL")
        return [(str(i), raw) for i, raw in enumerate(data)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: line {number} is not valid JSON ({exc})") from None
    return rows


def parse_record(raw: Any, *, source: str = "data", position: str = "?") -> Record:
    """Validate one raw record and convert LLaVA roles (human/gpt/system) to chat roles.

    ``position`` (array index or "line N") names the record in errors until its id is known, and is its
    id when it has none.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{source}: record {position}: expected a JSON object, got {type(raw).__name__}")
    record_id = str(raw["id"]) if raw.get("id") is not None else position
    at = f"{source}: record {record_id!r}"
    images = _images_field(raw.get("image"), at=at)
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{at}: field 'conversations' must be a non-empty list")
    messages = [_message(turn, at=f"{at}, conversations[{i}]") for i, turn in enumerate(turns)]
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{at}: field 'conversations' has no 'gpt' turn, so there is nothing to learn")
    if any(IMAGE_TOKEN in m["content"] for m in messages if m["role"] != "user"):
        raise DataError(f"{at}: field 'conversations': {IMAGE_TOKEN} may only appear in 'human' turns")
    placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if placeholders != len(images):
        raise DataError(
            f"{at}: field 'image' lists {len(images)} image(s) but the conversations have {placeholders} "
            f"{IMAGE_TOKEN} placeholder(s); there must be one per image"
        )
    return Record(id=record_id, messages=messages, images=images)


def _images_field(value: Any, *, at: str) -> tuple[str, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in values):
        raise DataError(f"{at}: field 'image' must be a path string or a list of path strings")
    return tuple(values)


def _message(turn: Any, *, at: str) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise DataError(f"{at}: expected an object with 'from' and 'value'")
    role = ROLE_MAP.get(turn.get("from"))  # type: ignore[arg-type]
    if role is None:
        raise DataError(f"{at}: field 'from' must be 'human', 'gpt' or 'system', got {turn.get('from')!r}")
    if not isinstance(turn.get("value"), str):
        raise DataError(f"{at}: field 'value' must be a string")
    return {"role": role, "content": turn["value"]}


# ------------------------------------------------------------------------------------------------ dataset


class ConversationDataset(torch.utils.data.Dataset):
    """Records -> ``Example`` (or ``Skipped`` for a missing/corrupt image or an over-long sequence)."""

    def __init__(
        self,
        records: Sequence[Record],
        *,
        processor: VLMProcessor,
        image_folder: str | Path | None = None,
        max_length: int | None = None,
    ) -> None:
        self.records = list(records)
        self.processor = processor
        self.image_folder = Path(image_folder).expanduser() if image_folder is not None else Path.cwd()
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, name: str) -> Path:
        return self.image_folder / Path(name).expanduser()

    def __getitem__(self, index: int) -> Example | Skipped:
        record = self.records[index]
        try:
            pil = [load_image(self.image_path(name)) for name in record.images]
        except ImageLoadError as exc:
            return Skipped(id=record.id, reason=str(exc))
        layouts = self.processor.image_layouts(pil)  # AnyRes: each image's tiling; else None
        try:
            encoded = self.processor.encode_sample(
                Sample(messages=record.messages, images=pil), add_generation_prompt=False, with_labels=True,
                layouts=layouts,
            )
        except ValueError as exc:  # e.g. a template that cannot render this conversation
            raise DataError(f"record {record.id!r}: field 'conversations' cannot be encoded: {exc}") from None
        if self.max_length is not None and len(encoded.input_ids) > self.max_length:
            return Skipped(
                id=record.id, reason=f"{len(encoded.input_ids)} tokens > max length {self.max_length}"
            )
        size = self.processor.image_processor.image_size
        if layouts is not None:  # AnyRes: each image's base view and tiles
            anyres = self.processor.anyres
            tiles = [anyres.preprocess(im, tiled=lay.grid != (0, 0)) for im, lay in zip(pil, layouts, strict=True)]
            pixels = list(torch.cat(tiles)) if tiles else []
        else:
            pixels = [self.processor.image_processor.preprocess_one(image) for image in pil]
        return Example(
            id=record.id,
            input_ids=torch.tensor(encoded.input_ids, dtype=torch.long),
            labels=torch.tensor(encoded.labels, dtype=torch.long),
            pixel_values=torch.stack(pixels) if pixels else torch.empty((0, 3, size, size)),
            image_layouts=list(layouts or []),
        )


def collate(items: Sequence[Example | Skipped], *, pad_token_id: int, image_size: int) -> Batch:
    """Right-pad the examples; skipped records ride along in ``Batch.skipped`` (the batch may be empty)."""
    examples = [item for item in items if isinstance(item, Example)]
    skipped = [item for item in items if isinstance(item, Skipped)]
    width = max((len(e.input_ids) for e in examples), default=0)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n], labels[row, :n], mask[row, :n] = example.input_ids, example.labels, 1
    pixels = [e.pixel_values for e in examples if len(e.pixel_values)]
    return Batch(
        input_ids=input_ids,
        attention_mask=mask,
        labels=labels,
        pixel_values=torch.cat(pixels) if pixels else torch.empty((0, 3, image_size, image_size)),
        ids=[e.id for e in examples],
        skipped=skipped,
        image_layouts=[layout for e in examples for layout in e.image_layouts],
    )
