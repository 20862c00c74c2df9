"""When to stop: eos / pad id resolution, stop strings, and the host-side record of each row.

Stop strings are matched on decoded text (``skip_special_tokens=True``), so a stop string that spans several
tokens, or that a tokenizer can spell in many ways, is still found. Streaming holds back text that could
still turn into a stop string, and a trailing U+FFFD (an incomplete UTF-8 character).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmkit.models.language.protocols import LanguageModel
from vlmkit.processing.tokenizer_protocol import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class RowState:
    """What one batch row has produced so far (kept on the host)."""

    token_ids: list[int] = field(default_factory=list)
    # None while running; "stop" (eos or stop string) or "length" once done
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, Iterable):
        return [int(v) for v in value]
    return [int(value)]


def resolve_eos_token_ids(
    *, lm: LanguageModel, tokenizer: Tokenizer, eos_token_ids: Sequence[int] | None
) -> list[int]:
    """Explicit ids win; else lm.generation_config (or lm.config) eos ids plus the tokenizer's eos, deduplicated."""
    if eos_token_ids is not None:
        return list(dict.fromkeys(int(i) for i in eos_token_ids))
    generation_config = getattr(lm, "generation_config", None)
    ids = _as_id_list(getattr(generation_config, "eos_token_id", None))
    if not ids:
        config = getattr(lm, "config", None)
        text_config = (
            config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        )
        ids = _as_id_list(getattr(text_config, "eos_token_id", None))
    ids += _as_id_list(getattr(tokenizer, "eos_token_id", None))
    return list(dict.fromkeys(ids))


def resolve_pad_token_id(*, lm: LanguageModel, tokenizer: Tokenizer, eos_token_ids: Sequence[int]) -> int:
    """The id fed to rows that already finished: tokenizer pad, model pad, first eos, else 0."""
    candidates = (
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(lm, "generation_config", None), "pad_token_id", None),
        eos_token_ids[0] if eos_token_ids else None,
    )
    for candidate in candidates:
        ids = _as_id_list(candidate)
        if ids:
            return ids[0]
    return 0


@dataclass(frozen=True)
class StopStrings:
    """Decoding plus stop-string search, shared by ``generate`` and ``stream`` so both cut text identically."""

    tokenizer: Tokenizer
    stops: tuple[str, ...] = ()

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def find(self, text: str) -> int | None:
        """Index of the earliest stop-string occurrence in ``text``, or None."""
        hits = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        return min(hits) if hits else None

    def cut(self, text: str) -> str:
        """``text`` up to (not including) its earliest stop string."""
        index = self.find(text)
        return text if index is None else text[:index]

    def hit(self, token_ids: Sequence[int]) -> bool:
        """Whether the decoded ``token_ids`` contain a stop string (decodes only when stops are set)."""
        return bool(self.stops) and self.find(self.decode(token_ids)) is not None

    def stream_safe(self, text: str) -> str:
        """The prefix of a still-running row's ``text`` that can be shown without ever being taken back."""
        text = text.rstrip(REPLACEMENT_CHAR)  # an incomplete UTF-8 character decodes to U+FFFD
        return text[: len(text) - self._stop_prefix_len(text)]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best


def record_step(
    rows: list[RowState], *, tokens: Sequence[int], eos_hit: Sequence[int], stops: StopStrings
) -> list[int]:
    """Append one step's tokens to the running rows; returns rows that just hit a stop string.

    ``eos_hit[i]`` is truthy when row i sampled an eos (that token is not kept). Rows finished earlier are
    skipped: their ``tokens`` entry is the pad id.
    """
    stopped: list[int] = []
    for index, row in enumerate(rows):
        if row.done:
            continue
        if eos_hit[index]:
            row.finish_reason = "stop"
            continue
        row.token_ids.append(tokens[index])
        if stops.hit(row.token_ids):
            row.finish_reason = "stop"
            stopped.append(index)
    return stopped
