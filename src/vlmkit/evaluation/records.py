"""Evaluation records: read LLaVA-format JSON / JSONL (docs/design.md, "Data format") and split each into prompt and reference.

The last ``gpt`` turn of a record is its reference (a string, or a list of strings for multi-reference
metrics); the turns before it are the prompt, so earlier turns of a multi-turn conversation are history.
``to_items`` scores every ``gpt`` turn instead: one item per turn, the conversation before it (with the
reference replies as history) as its prompt and only the images whose placeholders that prompt holds. A
record's optional ``turns`` list (one ``{"task", "kind"}`` per gpt turn, as ``vlmkit synth --conversations``
writes) labels each turn; items also carry their turn position (1 = the first gpt turn).
File-level problems (unreadable, not JSON, not a list of objects) are errors; a record that cannot be
evaluated (no gpt turn, placeholder/image count mismatch, unknown speaker) is skipped with a reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_IMAGE_TOKEN = "<image>"  # the placeholder of the data format, whatever the model's own token is
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RecordError(ValueError):
    """A record that cannot be evaluated; the message is the reason it is skipped."""


@dataclass(frozen=True)
class EvalItem:
    index: int  # position in the data file
    id: str
    task: str
    images: tuple[str, ...]  # as written in the record (relative to the image folder)
    messages: tuple[dict[str, str], ...]  # {"role", "content"}: the conversation before the reference
    references: tuple[str, ...]
    turn: int = 1  # which gpt turn of its record this is (1-based)
    kind: str | None = None  # the record's label for the turn (e.g. "new_image"), if it has one


def read_records(path: Path) -> list[dict[str, Any]]:
    """A JSON array of objects, or JSONL (one object a line; blank lines ignored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
    bad = next((i for i, record in enumerate(records) if not isinstance(record, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: record {bad} is a {type(records[bad]).__name__}, expected a JSON object")
    return records


def record_id(record: dict[str, Any], *, index: int) -> str:
    return str(record.get("id", index))


def to_item(record: dict[str, Any], *, index: int, image_token: str = DATA_IMAGE_TOKEN) -> EvalItem:
    """Split a record into prompt messages and references; raise ``RecordError`` naming what is wrong."""
    images = record.get("image")
    images = () if images in (None, "", []) else tuple(images) if isinstance(images, list) else (images,)
    if not all(isinstance(image, str) for image in images):
        raise RecordError("'image' must be a path or a list of paths")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise RecordError("'conversations' must be a list of {from, value} objects")
    last = max((i for i, t in enumerate(turns) if _ROLES.get(t.get("from")) == "assistant"), default=None)
    if last is None:
        raise RecordError("no gpt turn to use as the reference")
    messages = [_message(turn, image_token=image_token) for turn in turns[:last]]
    if not any(m["role"] == "user" for m in messages):
        raise RecordError("no human turn before the reference")
    messages = _place_images(messages, num_images=len(images), image_token=image_token)
    return EvalItem(index=index, id=record_id(record, index=index), task=str(record.get("task") or "default"),
                    images=images, messages=tuple(messages), references=_references(turns[last]["value"]))  # fmt: skip


def to_items(
    record: dict[str, Any], *, index: int, image_token: str = DATA_IMAGE_TOKEN, last_only: bool = False
) -> list[EvalItem]:
    """One item per ``gpt`` turn (only the last with ``last_only``); raise ``RecordError`` as ``to_item``."""
    whole = to_item(record, index=index, image_token=image_token)  # validates; images placed in their turns
    turns = record["conversations"]
    replies = [i for i, t in enumerate(turns) if _ROLES.get(t.get("from")) == "assistant"]
    labels = _turn_labels(record, count=len(replies))
    items = []
    for k in range(len(replies) - 1 if last_only else 0, len(replies)):
        # whole.messages[i] is turns[i] for every turn before the last
        messages = whole.messages[: replies[k]]
        if not any(m["role"] == "user" for m in messages):
            continue  # a reply before any question (e.g. a greeting) is not an answer to score
        shown = sum(m["content"].count(image_token) for m in messages)
        items.append(EvalItem(index=index, id=whole.id, task=str(labels[k].get("task") or whole.task),
                              images=whole.images[:shown], messages=messages,
                              references=_references(turns[replies[k]]["value"]), turn=k + 1,
                              kind=labels[k].get("kind")))  # fmt: skip
    return items


def _turn_labels(record: dict[str, Any], *, count: int) -> list[dict[str, Any]]:
    """The record's ``turns`` labels, one per gpt turn; empty dicts where it has none."""
    labels = record.get("turns")
    if labels is None:
        return [{} for _ in range(count)]
    if not isinstance(labels, list) or len(labels) != count or not all(isinstance(t, dict) for t in labels):
        raise RecordError(f"'turns' must be a list of {count} objects, one per gpt turn")
    return labels


def _message(turn: dict[str, Any], *, image_token: str) -> dict[str, str]:
    speaker = turn.get("from")
    role = _ROLES.get(speaker) if isinstance(speaker, str) else None
    if role is None:
        raise RecordError(f"unknown speaker {turn.get('from')!r} (expected human, gpt or system)")
    value = turn.get("value")
    if not isinstance(value, str):
        raise RecordError(f"a {turn.get('from')} turn has no text value")
    return {"role": role, "content": value.replace(DATA_IMAGE_TOKEN, image_token)}


def _place_images(
    messages: list[dict[str, str]], *, num_images: int, image_token: str
) -> list[dict[str, str]]:
    """Check placeholder count; with none at all, images go before the first user turn (LLaVA style)."""
    found = sum(m["content"].count(image_token) for m in messages)
    if found == 0 and num_images:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first] = {
            "role": "user",
            "content": f"{image_token}\n" * num_images + messages[first]["content"],
        }
    elif found != num_images:
        raise RecordError(f"{found} {DATA_IMAGE_TOKEN} placeholder(s) but {num_images} image(s)")
    return messages


def _references(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise RecordError("the reference must be a string or a non-empty list of strings")
