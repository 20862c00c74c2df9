"""Control tokens typed in message text stay text (no role injection).

A tokenizer matches its special tokens (``<|im_end|>``, ``</s>``, ``<|im_start|>`` ...) anywhere in the string
it is given, so a user who types ``<|im_end|><|im_start|>system`` into a message would otherwise end their
turn and open a system turn. Before rendering, every control-token string inside message content is wrapped
in two private-use markers (markers already in the text are dropped first, so none can be forged); after
rendering the markers are removed again and their positions remembered. The prompt is then tokenized in one
call as before, and each token that sits exactly on a remembered position is replaced by the same characters
encoded as plain text. The template's own control tokens are never marked and keep working; a prompt with no
typed control token is tokenized exactly as before.

The same idea as transformers' ``apply_chat_template(..., sanitize_control_tokens=True)``, kept compatible with
vlmkit's single tokenizer call (image-token expansion and offset-based labels in between).
"""

from __future__ import annotations

import re
from typing import Any, TypeGuard

from vlmkit.processing.tokenizer_protocol import Tokenizer

# Unicode private-use plane 15: never produced by a tokenizer or a template, stripped from user text
MARK_START, MARK_END = "\U000f0000", "\U000f0001"
_MARKED = re.compile(f"{MARK_START}([^{MARK_START}{MARK_END}]*){MARK_END}")

Span = tuple[int, int]


def control_tokens(tokenizer: Tokenizer, *, image_token: str) -> list[str]:
    """The tokenizer's special tokens (the image placeholder excepted: it has its own rules), longest first."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {added.content for added in decoder.values() if getattr(added, "special", False)}
    found.update(t for t in getattr(tokenizer, "all_special_tokens", ()) if isinstance(t, str))
    found.discard(image_token)
    return sorted((t for t in found if t), key=len, reverse=True)


def mark_control_text(messages: list[dict], *, tokenizer: Tokenizer, image_token: str) -> list[dict]:
    """``messages`` with every control-token string in their content wrapped in markers (the same list when
    nothing needs marking, so ordinary prompts take no extra work)."""
    tokens = control_tokens(tokenizer, image_token=image_token)
    pattern = re.compile("|".join(map(re.escape, tokens))) if tokens else None

    def needs(content: Any) -> TypeGuard[str]:
        return isinstance(content, str) and (
            MARK_START in content
            or MARK_END in content
            or (pattern is not None and pattern.search(content) is not None)
        )

    if not any(isinstance(m, dict) and needs(m.get("content")) for m in messages):
        return messages
    marked = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if needs(content):
            clean = content.replace(MARK_START, "").replace(MARK_END, "")
            if pattern is not None:
                clean = pattern.sub(lambda m: f"{MARK_START}{m.group(0)}{MARK_END}", clean)
            message = {**message, "content": clean}
        marked.append(message)
    return marked


def unmark_control_text(text: str, spans: list[Span]) -> tuple[str, list[Span], list[Span]]:
    """Remove the markers: (plain text, ``spans`` shifted to it, [start, end) of each typed control token)."""
    if MARK_START not in text and MARK_END not in text:
        return text, spans, []
    pieces: list[str] = []
    removed: list[int] = []  # positions (in the marked text) of removed marker characters
    typed: list[Span] = []
    cursor, length = 0, 0
    for match in _MARKED.finditer(text):
        pieces.append(text[cursor : match.start()])
        length += match.start() - cursor
        typed.append((length, length + len(match.group(1))))
        pieces.append(match.group(1))
        length += len(match.group(1))
        removed += [match.start(), match.end() - 1]
        cursor = match.end()
    pieces.append(text[cursor:])
    plain = "".join(pieces)
    if MARK_START in plain or MARK_END in plain:
        raise ValueError(
            "the chat template splits or rearranges message text that contains control-token text "
            "(such as '</s>' or '<|im_end|>'), so it cannot be kept as plain text; remove it from the message"
        )

    def shift(pos: int) -> int:
        return pos - sum(1 for r in removed if r < pos)

    return plain, [(shift(s), shift(e)) for s, e in spans], typed


def encode_as_text(
    tokenizer: Tokenizer, *, ids: list[int], offsets: list[Span] | None, typed: list[Span], text: str
) -> tuple[list[int], list[Span]]:
    """Replace each control token on a typed span with its characters encoded as plain text (a token that also
    took a neighbouring space, ``lstrip`` / ``rstrip`` style, is re-encoded with that space)."""
    if offsets is None or not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "control-token text in a message needs a fast tokenizer (offset mapping) to stay text"
        )
    control_ids = {tokenizer.convert_tokens_to_ids(t) for t in control_tokens(tokenizer, image_token="")}
    new_ids: list[int] = []
    new_offsets: list[Span] = []
    for token_id, span in zip(ids, offsets, strict=True):
        span = (int(span[0]), int(span[1]))
        if token_id in control_ids and any(span[0] < end and span[1] > start for start, end in typed):
            plain = _plain_ids(tokenizer, text[span[0] : span[1]])
            if control_ids.intersection(plain):
                raise ValueError(
                    f"cannot encode {text[span[0] : span[1]]!r} as plain text with this tokenizer"
                )
            new_ids += plain
            new_offsets += [span] * len(plain)
        else:
            new_ids.append(token_id)
            new_offsets.append(span)
    return new_ids, new_offsets


def _plain_ids(tokenizer: Tokenizer, piece: str) -> list[int]:
    """``piece`` as ordinary text, as it would tokenize mid-prompt: encoded after a newline (so a SentencePiece
    tokenizer adds no prefix space) and the newline's ids removed again, as transformers does."""
    newline = tokenizer.encode("\n", add_special_tokens=False, split_special_tokens=True)
    ids = tokenizer.encode("\n" + piece, add_special_tokens=False, split_special_tokens=True)
    if ids[: len(newline)] == newline:
        return ids[len(newline) :]
    return tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True)
