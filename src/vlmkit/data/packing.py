"""Pack every question about the same image(s) into one multi-turn conversation.

A small VLM spends most of a training step on the image tokens (64 of them before a 5-token question), so
one sequence per question wastes most of the compute. Records that show the same image(s) are merged into
conversations of up to ``max_turns`` question/answer pairs; the images appear once, in the first turn.
Turn order is shuffled (seeded) so no question type always sits right after the image.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from vlmkit.data.dataset import IMAGE_TOKEN, Record

_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


def pack_by_image(records: Sequence[Record], *, max_turns: int = 8, seed: int = 0) -> list[Record]:
    """Merged records first-seen order; records that cannot be merged safely pass through unchanged.

    Mergeable: one user turn then one assistant turn, with images, and every ``<image>`` of the user turn
    on its own line (e.g. "<image>\\nWhat colour ...?" or "Image 1: <image>\\n..."), so the later turns can
    drop those lines and keep a clean question.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    groups: dict[tuple[str, ...], list[Record]] = {}
    alone: list[Record] = []
    for record in records:
        (groups.setdefault(record.images, []) if _mergeable(record) else alone).append(record)
    rng = random.Random(seed)
    packed: list[Record] = []
    for members in groups.values():
        members = list(members)
        rng.shuffle(members)
        for start in range(0, len(members), max_turns):
            packed.append(_merge(members[start : start + max_turns]))
    return packed + alone


def _mergeable(record: Record) -> bool:
    roles = [m["role"] for m in record.messages]
    if roles != ["user", "assistant"] or not record.images:
        return False
    question = _strip_image_lines(record.messages[0]["content"])
    return question is not None and question.strip() != ""


def _strip_image_lines(text: str) -> str | None:
    """The question without its image lines; None when a placeholder shares a line with question text."""
    kept = []
    for line in text.split("\n"):
        if IMAGE_TOKEN in line:
            rest = line.replace(IMAGE_TOKEN, "").strip()
            if rest and not rest.rstrip(":").replace("Image", "").strip().isdigit():
                return None  # "Describe <image> please": no clean way to drop the image
            continue
        kept.append(line)
    return "\n".join(kept).strip()


def _merge(members: list[Record]) -> Record:
    if len(members) == 1:
        return members[0]
    messages = list(members[0].messages)
    for record in members[1:]:
        question = _strip_image_lines(record.messages[0]["content"]) or ""
        messages += [{"role": "user", "content": question}, dict(record.messages[1])]
    return Record(id=f"pack-{members[0].id}", messages=messages, images=members[0].images)


def write_records(records: Sequence[Record], path: Path) -> None:
    """LLaVA-format JSON (one record a line) that ``read_records`` reads back."""
    lines = []
    for record in records:
        raw: dict[str, object] = {"id": record.id}
        if record.images:
            raw["image"] = record.images[0] if len(record.images) == 1 else list(record.images)
        raw["conversations"] = [{"from": _FROM[m["role"]], "value": m["content"]} for m in record.messages]
        lines.append(json.dumps(raw, ensure_ascii=False))
    Path(path).write_text("[\n" + ",\n".join(lines) + "\n]\n", encoding="utf-8")
