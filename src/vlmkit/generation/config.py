"""Generation settings and results: plain dataclasses, no torch import.

``GenerationConfig.validate`` names the offending argument in its ``ValueError`` and ``from_kwargs`` rejects
unknown keywords with a ``TypeError`` naming them, so a typo (``max_tokens=``) never silently becomes a default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard

from vlmkit.config import require
from vlmkit.processing.text import check_text

# sampling divides logits by the temperature: near 0 that overflows float32 (1e-300 is 0.0 there, and the
# softmax becomes NaN); this bound is far below any useful sampling temperature; use 0 for greedy
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
# the penalty divides / multiplies logits: the same overflow at the extremes
MIN_PENALTY, MAX_PENALTY = 1e-3, 1e3
# token counts and k beyond int64 overflow torch's index arithmetic
MAX_INT = 2**63 - 1

# the decode backends ``backend.select_backend`` chooses from (docs/inference.md has the table)
BACKENDS = (
    "beam",
    "static",
    "compiled",
    "dynamic",
    "lean-linear",
    "lean-onednn",
    "screened-head",
    "speculative",
)


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop."""

    max_new_tokens: int = 128
    # 0 = greedy (argmax); > 0 = sample from softmax(logits / temperature)
    temperature: float = 0.0
    # nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p (sampling only)
    top_p: float = 1.0
    # keep only the k most likely tokens; 0 = off (sampling only)
    top_k: int = 0
    # > 1 = beam search (deterministic; cannot be combined with temperature > 0)
    num_beams: int = 1
    # generation stops as soon as the decoded text contains one; the returned text is cut before it
    stop: tuple[str, ...] = ()
    # seeds a private torch.Generator: reproducible sampling that leaves torch's global RNG alone
    seed: int | None = None
    # CTRL-style penalty on tokens generated so far (1.0 = off), as transformers' RepetitionPenaltyLogitsProcessor
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        # accept a single string or a list for convenience; validate() checks the contents
        self.stop = _as_stop_tuple(self.stop)

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid argument."""
        _require(
            _int_in(self.max_new_tokens, 1, MAX_INT), "max_new_tokens", f"an int in [1, {MAX_INT}]", self
        )
        _require(
            (_is_number(self.temperature) and self.temperature == 0)
            or _number_in(self.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE),
            "temperature",
            f"0 (greedy) or a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]",
            self,
        )
        _require(_number_in(self.top_p, 0, 1) and self.top_p > 0, "top_p", "a number in (0, 1]", self)
        _require(_int_in(self.top_k, 0, MAX_INT), "top_k", f"an int in [0, {MAX_INT}] (0 = off)", self)
        _require(_int_in(self.num_beams, 1, MAX_INT), "num_beams", "an int >= 1", self)
        _require(
            _number_in(self.repetition_penalty, MIN_PENALTY, MAX_PENALTY),
            "repetition_penalty",
            f"a number in [{MIN_PENALTY:g}, {MAX_PENALTY:g}] (1.0 = off)",
            self,
        )
        _require(
            self.seed is None or _int_in(self.seed, -(2**63), 2**64 - 1), "seed", "a 64-bit int or None", self
        )
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {_short(self.stop)}")
        for index, text in enumerate(self.stop):
            check_text(text, name=f"stop[{index}]")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError(
                f"num_beams={self.num_beams} (beam search) cannot be combined with temperature={self.temperature}; "
                "use temperature=0 with beams, or num_beams=1 to sample"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> GenerationConfig:
        """Build and validate a config; unknown keywords raise ``TypeError`` naming them.

        ``stop`` may be a single string or any iterable of strings; ``None`` means no stop strings.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [name for name in kwargs if name not in known]
        if unknown:
            raise TypeError(
                f"unknown generation argument(s) {', '.join(map(repr, unknown))}; expected one of {sorted(known)}"
            )
        config = cls(**kwargs)
        config.validate()
        return config


@dataclass
class GenerationResult:
    """One entry per batch row, in input order."""

    # generated ids: no prompt, no eos (a stop string's tokens are kept; only the text is cut)
    token_ids: list[list[int]]
    # decoded with skip_special_tokens=True, cut before the earliest stop string
    texts: list[str]
    # "stop" (eos or stop string) | "length" (max_new_tokens reached)
    finish_reasons: list[str]


def _as_stop_tuple(stop: str | Iterable[str] | None) -> tuple[str, ...] | Any:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, Iterable):
        return tuple(stop)
    return stop  # validate() reports it


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number_in(value: object, low: float, high: float) -> bool:
    """A finite int/float in [low, high]; a 400-digit int or 1e-300 never reaches float arithmetic unchecked."""
    if not _is_number(value):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and low <= number <= high


def _int_in(value: object, low: int, high: int) -> bool:
    return _is_int(value) and low <= value <= high


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _require(ok: bool, name: str, expected: str, config: GenerationConfig) -> None:
    require(ok, field=name, message=lambda: f"{name} must be {expected}, got {_short(getattr(config, name))}")


@dataclass
class DecodeOptions:
    """How the decode loop runs (never what it generates: every choice here keeps greedy output identical).

    ``static_cache`` preallocates the KV cache once per (batch, length bucket) instead of growing it by
    concatenation; ``compile`` (``True`` or a dict of ``torch.compile`` keyword arguments) compiles the one-token
    decode step over that static cache, which implies ``static_cache``. ``sync_every`` is how many decode steps run
    between host syncs (finished / stop-string checks): 1 reads every token back at once (what streaming needs);
    more lets the host queue several GPU steps ahead, at the price of up to ``sync_every - 1`` wasted steps at the end.
    ``speculative`` > 0 lets a float16 copy of the LM propose up to that many tokens per round, which the LM verifies
    in one pass (``cpu_llama/speculative.py``): greedy batch-1 requests on a float32 Llama on CPU with the dynamic
    cache; anything else decodes as usual. 0 = off; ``None`` (default) = on, up to ``backend.AUTO_DRAFT_TOKENS``, where
    the LM's matrices are too big for the CPU caches (a step then streams its weights, and the draft streams half
    the bytes), off for smaller LMs. ``backend`` forces one of ``BACKENDS`` (tests, benchmarks; ``None``: chosen
    per request by ``backend.select_backend``, see docs/inference.md); one the request cannot run is a ValueError.
    """

    static_cache: bool = False
    compile: bool | dict[str, Any] = False
    sync_every: int = 1
    speculative: int | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.sync_every) or self.sync_every < 1:
            raise ValueError(f"sync_every must be an int >= 1, got {self.sync_every!r}")
        if self.speculative is not None and (
            not _is_int(self.speculative) or not 0 <= self.speculative <= 16
        ):
            raise ValueError(
                f"speculative must be None (auto) or an int in [0, 16] (draft tokens per round), "
                f"got {self.speculative!r}"
            )
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(
                f"backend must be None (auto) or one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        if not isinstance(self.compile, bool | dict):
            raise ValueError(
                f"compile must be a bool or a dict of torch.compile options, got {self.compile!r}"
            )

    @property
    def uses_static_cache(self) -> bool:
        return self.static_cache or self.compile is not False
