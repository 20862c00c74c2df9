"""LLaVA-format conversation data (docs/design.md, "Data format"): reading, validation, per-sample encoding and collation.

``read_records`` parses a JSON array or JSONL file into ``Record``s and fails on the first malformed
record with a ``DataError`` naming its id and field. ``ConversationDataset`` turns a record into token
ids, labels (assistant turns only) and preprocessed pixels; a record whose image is missing or corrupt
becomes a ``Skipped`` marker instead of an exception, so one bad file never stops a run. ``collate``
right-pads a micro-batch and carries the skipped markers along for counting.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError

from vlmkit.config import parse_json
from vlmkit.processing.image import ImageLoadError, load_image
from vlmkit.processing.processor import Sample, VLMProcessor
from vlmkit.processing.prompting import IGNORE_INDEX, EncodedPrompt, encode
from vlmkit.processing.tiling import TileLayout

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TOKEN = "<image>"
TOO_LONG = ("skip", "truncate")  # what happens to a record longer than the maximum length
# the default maximum length is the LM's max positions, at most this (LLaVA-NeXT trains at 4096): one 10 MB
# record must not become a sequence whose logits alone need terabytes
DEFAULT_MAX_LENGTH = 4096
# what a chat template raises on a conversation it rejects (jinja's raise_exception is a TemplateError)
TEMPLATE_ERRORS = (ValueError, TypeError, TemplateError)


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
        data = parse_json(text, where=str(source), error=DataError, max_depth=None)
        if not isinstance(data, list):
            raise DataError(f"{source}: expected a JSON array of records or JSONL")
        return [(str(i), raw) for i, raw in enumerate(data)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        rows.append((f"line {number}", parse_json(line, where=f"{source}: line {number}", error=DataError,
                                                  max_depth=None)))  # fmt: skip
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
    speaker = turn.get("from")
    role = ROLE_MAP.get(speaker) if isinstance(speaker, str) else None
    if role is None:
        raise DataError(f"{at}: field 'from' must be 'human', 'gpt' or 'system', got {turn.get('from')!r}")
    if not isinstance(turn.get("value"), str):
        raise DataError(f"{at}: field 'value' must be a string")
    return {"role": role, "content": turn["value"]}


# ------------------------------------------------------------------------------------------------ dataset


class ConversationDataset(torch.utils.data.Dataset):
    """Records -> ``Example`` (or ``Skipped`` for a missing/corrupt image or an over-long sequence).

    ``validate()`` (the trainer calls it before step 1) renders every record's chat template and measures it,
    so a record the template rejects fails the run before training, and one longer than ``max_length`` is
    skipped or cut (``too_long``) and counted. Image paths must stay inside ``image_folder`` (after symlinks)
    unless ``allow_outside_images``.
    """

    def __init__(
        self,
        records: Sequence[Record],
        *,
        processor: VLMProcessor,
        image_folder: str | Path | None = None,
        max_length: int | None = None,
        too_long: str = "skip",
        allow_outside_images: bool = False,
    ) -> None:
        if too_long not in TOO_LONG:
            raise DataError(f"too_long must be one of {', '.join(TOO_LONG)}, got {too_long!r}")
        self.records = list(records)
        self.processor = processor
        self.image_folder = Path(image_folder).expanduser() if image_folder is not None else Path.cwd()
        self.max_length = max_length
        self.too_long = too_long
        self.allow_outside_images = allow_outside_images
        self.skip_reasons: dict[int, str] = {}  # found by validate(): never loaded
        self.truncated = 0

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, name: str) -> Path:
        return image_in_folder(self.image_folder, name, allow_outside=self.allow_outside_images)

    def validate(self) -> None:
        """Check every record before training: image paths, template rendering, length (see the class doc)."""
        for index, record in enumerate(self.records):
            try:
                missing = [str(p) for p in map(self.image_path, record.images) if not p.is_file()]
            except DataError as exc:
                raise DataError(f"record {record.id!r}: {exc}") from None
            if missing:
                self.skip_reasons[index] = f"image not found: {missing[0]}"
                continue
            fitted = self._prepare(record, num_image_tokens=self.processor.num_image_tokens)
            if isinstance(fitted, str):
                self.skip_reasons[index] = fitted
            elif fitted[1]:
                self.truncated += 1
        if len(self.skip_reasons) == len(self.records):
            first = next(iter(self.skip_reasons.items()))
            raise DataError(
                f"all {len(self.records)} records would be skipped, nothing to train on (first: record "
                f"{self.records[first[0]].id!r}: {first[1]})"
            )

    def skipped(self) -> dict[str, str]:
        """Record id -> reason, for the records ``validate`` left out."""
        return {self.records[i].id: reason for i, reason in self.skip_reasons.items()}

    def _prepare(self, record: Record, *, num_image_tokens: Any) -> tuple[EncodedPrompt, bool] | str:
        """-> (tokens and labels within ``max_length``, whether they were cut), or the reason to skip the record."""
        messages = self._within_reach(record)
        if isinstance(messages, str):
            return messages
        encoded = self._encode(record, messages=messages, num_image_tokens=num_image_tokens)
        fitted = self._fit(encoded)
        if isinstance(fitted, str):
            return fitted
        return fitted, fitted is not encoded or messages is not record.messages

    @functools.cached_property
    def _chars_per_token(self) -> int:
        """The longest token in characters: a text of n characters is at least n / this many tokens."""
        return max(1, max(map(len, self.processor.tokenizer.get_vocab()), default=1))

    def _within_reach(self, record: Record) -> list[dict[str, str]] | str:
        """The messages cut to what ``max_length`` tokens can cover at most (``max_length`` x the longest token),
        so a 10 MB record is never rendered or tokenized whole; in "skip" mode such a record is skipped now."""
        limit, total = self.max_length, sum(len(m["content"]) for m in record.messages)
        if limit is None or total <= limit * self._chars_per_token:
            return record.messages
        too_long = f"{total:,} characters, more than {limit} tokens (max length) can hold"
        if self.too_long == "skip":
            return too_long
        kept, left = [], limit * self._chars_per_token
        for message in record.messages:
            kept.append({**message, "content": message["content"][:left]})
            left -= len(kept[-1]["content"])
            if left <= 0:  # the window is full: later turns could never be reached
                break
        token = self.processor.prompt.image_token
        if sum(m["content"].count(token) for m in kept) != len(record.images):
            return f"{too_long}, and cutting it would cut an image"
        return kept

    def _encode(
        self, record: Record, *, messages: list[dict[str, str]], num_image_tokens: Any
    ) -> EncodedPrompt:
        """Tokens and labels of a record; a conversation the chat template rejects is a ``DataError``."""
        processor = self.processor
        try:
            return encode(messages, tokenizer=processor.tokenizer, template=processor.template,
                          image_token=processor.prompt.image_token, num_image_tokens=num_image_tokens,
                          system=processor.prompt.system, add_generation_prompt=False, with_labels=True)  # fmt: skip
        except TEMPLATE_ERRORS as exc:
            raise DataError(f"record {record.id!r}: field 'conversations' cannot be encoded: {exc}") from None

    def _fit(self, encoded: EncodedPrompt) -> EncodedPrompt | str:
        """``encoded`` within ``max_length``: as is, cut (``too_long="truncate"``), or the reason it is skipped.

        A cut must keep every image token (a partial image cannot be fed) and at least one target token."""
        limit, length = self.max_length, len(encoded.input_ids)
        if limit is None or length <= limit:
            return encoded
        too_long = f"{length} tokens > max length {limit}"
        if self.too_long == "skip":
            return too_long
        image_id = self.processor.tokenizer.convert_tokens_to_ids(self.processor.prompt.image_token)
        ids, labels = encoded.input_ids[:limit], (encoded.labels or [])[:limit]
        if ids.count(image_id) != encoded.input_ids.count(image_id):
            return f"{too_long}, and cutting it would cut an image"
        if all(label == IGNORE_INDEX for label in labels[1:]):
            return f"{too_long}, and no answer token is left within it"
        return EncodedPrompt(input_ids=ids, labels=labels, num_images=encoded.num_images)

    def __getitem__(self, index: int) -> Example | Skipped:
        record = self.records[index]
        if index in self.skip_reasons:
            return Skipped(id=record.id, reason=self.skip_reasons[index])
        try:
            pil = [load_image(self.image_path(name)) for name in record.images]
        except ImageLoadError as exc:
            return Skipped(id=record.id, reason=str(exc))
        sample = Sample(messages=record.messages, images=pil)
        layouts = self.processor.image_layouts(sample.images)
        prepared = self._prepare(record, num_image_tokens=self.processor.token_counts(layouts))
        if isinstance(prepared, str):
            return Skipped(id=record.id, reason=prepared)
        fitted = prepared[0]
        size = self.processor.image_processor.image_size
        if layouts is not None:  # AnyRes: each image's base view and tiles
            anyres = self.processor.anyres
            assert anyres is not None  # layouts come from AnyRes
            tiles = [
                anyres.preprocess(im, tiled=lay.grid != (0, 0)) for im, lay in zip(pil, layouts, strict=True)
            ]
            pixels = list(torch.cat(tiles)) if tiles else []
        else:
            pixels = [self.processor.image_processor.preprocess_one(image) for image in pil]
        return Example(
            id=record.id,
            input_ids=torch.tensor(fitted.input_ids, dtype=torch.long),
            labels=torch.tensor(fitted.labels, dtype=torch.long),
            pixel_values=torch.stack(pixels) if pixels else torch.empty((0, 3, size, size)),
            image_layouts=list(layouts or []),
        )


def image_in_folder(folder: Path, name: str, *, allow_outside: bool = False) -> Path:
    """``name`` under ``folder``; a path that leaves it (``../``, absolute, a symlink out) is a ``DataError``
    unless ``allow_outside``: training data must not make vlmkit read files the user did not point it at."""
    path = folder / Path(name).expanduser()
    if not allow_outside:
        root, resolved = folder.resolve(), path.resolve()
        if not resolved.is_relative_to(root):
            raise DataError(
                f"image {name!r} resolves to {resolved}, outside the image folder {root}; fix the data or "
                "pass --allow-outside-images to read it"
            )
    return path


def default_max_length(lm_config: Any) -> int:
    """The maximum record length when none is given: the LM's max positions, at most ``DEFAULT_MAX_LENGTH``."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(lm_config, name, None)
        if isinstance(value, int) and value > 0:
            return min(value, DEFAULT_MAX_LENGTH)
    return DEFAULT_MAX_LENGTH


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
