"""``VLMRunner``: the engine's view of a ``VLM`` — batched ``generate`` and a per-request text stream."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from vlmkit.generation import GenerationConfig
from vlmkit.processing.processor import Sample
from vlmkit.processing.tokenizer_protocol import Tokenizer
from vlmkit.serving.engine import Completion

if TYPE_CHECKING:
    from vlmkit.api import VLM


class VLMRunner:
    """Runs on the engine's worker thread only."""

    def __init__(self, vlm: VLM) -> None:
        self.vlm = vlm

    def generate(self, samples: Sequence[Sample], generation: dict[str, Any]) -> list[Completion]:
        result = self.vlm.generate(samples, **generation)
        return [
            Completion(text=text, completion_tokens=len(ids), finish_reason=reason)
            for text, ids, reason in zip(result.texts, result.token_ids, result.finish_reasons, strict=True)
        ]

    def stream(self, sample: Sample, generation: dict[str, Any]) -> _VLMTextStream:
        return _VLMTextStream(vlm=self.vlm, sample=sample, generation=generation)


class _CountingTokenizer:
    """Passes everything to the real tokenizer and remembers how many ids the last ``decode`` saw.

    The decode loop decodes each row's full generated ids (eos excluded) every step, so the last count is
    the completion's token count: exact usage for streams without a second tokenization.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.last_decoded = 0

    def decode(self, token_ids: Sequence[int], **kwargs: Any) -> str:
        self.last_decoded = len(token_ids)
        return self._tokenizer.decode(token_ids, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


class _VLMTextStream:
    """Lazily prefills on first iteration (on the worker thread) and yields text deltas."""

    def __init__(self, *, vlm: VLM, sample: Sample, generation: dict[str, Any]) -> None:
        self.vlm = vlm
        self.sample = sample
        self.generation = generation
        self.config = GenerationConfig.from_kwargs(**generation)
        self.tokenizer = _CountingTokenizer(vlm.tokenizer)
        self._deltas: Iterator[str] | None = None

    def __iter__(self) -> Iterator[str]:
        # the same preparation as VLM.generate (feature and prefix caches included), so greedy streams
        # equal non-streamed answers
        # a Tokenizer by delegation (``__getattr__``), which a static check cannot see
        counting = cast(Tokenizer, self.tokenizer)
        self._deltas = self.vlm.stream_sample(self.sample, tokenizer=counting, **self.generation)
        return self._deltas

    def close(self) -> None:
        if self._deltas is not None and hasattr(self._deltas, "close"):
            self._deltas.close()  # frees the KV cache now rather than at garbage collection

    def completion(self, text: str) -> Completion:
        tokens = self.tokenizer.last_decoded
        if tokens == 0 and text:  # the decode loop changed how it decodes: count the text instead
            tokens = len(self.vlm.tokenizer.encode(text, add_special_tokens=False))
        reason = "length" if tokens >= self.config.max_new_tokens else "stop"
        return Completion(text=text, completion_tokens=tokens, finish_reason=reason)
