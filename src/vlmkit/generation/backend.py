"""Decode backends as one strategy: the ``DecodeBackend`` protocol, the resources a model's backends share, and
``select_backend``, the one place that decides which backend runs a request and says why.

Every backend gives the same greedy tokens (tests/test_decode_backends.py runs each on one model); they differ in
speed and in what they can run. The rules, in order (docs/inference.md has them as a table):

1. ``num_beams > 1`` -> ``beam`` (eager, dynamic cache).
2. a static cache asked for (``static_cache``, ``compile``) and a cache layout that allows it -> ``compiled`` or
   ``static``.
3. anything but an unpadded batch for a plain float32 ``LlamaForCausalLM`` on CPU over plain cache layers ->
   ``dynamic`` (the model's own forward).
4. otherwise the lean step (``cpu_llama/``): for a plain greedy batch-1 request, ``speculative`` where a float16
   draft is asked for or pays (``speculative=None``: LM matrices beyond the CPU caches, draft affordable; never
   for a quantized LM); for plain greedy, ``screened-head`` where the output layer is worth screening; else
   ``lean-onednn`` (matrices beyond the CPU caches) or ``lean-linear``.

``DecodeOptions.backend`` forces one (a request it cannot serve is a ``ValueError`` naming why).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from vlmkit.generation.config import DecodeOptions, GenerationConfig
from vlmkit.generation.cpu_llama import twins as twin_module
from vlmkit.generation.cpu_llama.backends import LeanRunner, SpeculativeRunner
from vlmkit.generation.cpu_llama.draft import affordable, draft_bytes, float16_draft
from vlmkit.generation.cpu_llama.greedy_head import screen_refusal, screened_head
from vlmkit.generation.cpu_llama.lean_step import lean_refusal, plain_dynamic_cache
from vlmkit.generation.cpu_llama.twins import (
    TwinCache,
    fbgemm_available,
    linear_bytes,
    onednn_available,
    onednn_twin,
)
from vlmkit.generation.kv_cache import PromptKV, _unwrap, new_cache
from vlmkit.generation.runner import BeamRunner, DynamicRunner, StaticRunner
from vlmkit.generation.static_cache import StaticCachePool, static_cache_supported
from vlmkit.generation.stopping import RowState, StopStrings
from vlmkit.models.language.protocols import LanguageModel
from vlmkit.quantization import QuantizedLinear, is_quantized

logger = logging.getLogger("vlmkit.generation")

# draft tokens per round when ``DecodeOptions.speculative`` is None (auto): a float16 draft agrees with its model
# on nearly every token, so long rounds pay (CPU benchmark: 15.5 of 16 proposals accepted per round)
AUTO_DRAFT_TOKENS = 16

_LEAN = ("lean-linear", "lean-onednn", "screened-head", "speculative")


@runtime_checkable
class DecodeBackend(Protocol):
    """The model side of one request's decode loop: prefill once, then one step per token, then close.

    Built per request by ``select_backend``; ``name`` is one of ``config.BACKENDS``.
    """

    name: str

    def prefill(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [batch, seq - past, dim] -> the first new token's logits [batch, vocab] float32."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch] -> next logits [batch, vocab] float32."""
        ...

    def greedy_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch] -> the next greedy tokens [batch] (plain greedy requests; the hook a screened output
        layer uses to skip most of the full logits)."""
        ...

    def prompt_kv(self) -> PromptKV:
        """The whole prompt's KV after prefill (batch 1), for the prefix cache."""
        ...

    def close(self) -> None:
        """Give back what the request held (a pooled static cache)."""
        ...


@runtime_checkable
class Speculator(Protocol):
    """The optional hook of a backend that decides several greedy tokens per pass (``speculative``)."""

    def rounds(
        self, logits: torch.Tensor, *, max_new_tokens: int, eos_token_ids: Sequence[int], stops: StopStrings
    ) -> Iterator[list[RowState]]: ...


@dataclass
class DecodeResources:
    """What one model's backends keep between requests: idle static caches and what was built from its weights
    (oneDNN twins, float16 screens and drafts). A ``VLM`` owns one; a bare ``generate`` call without one builds
    what it needs for that call only."""

    pool: StaticCachePool = field(default_factory=StaticCachePool)
    twins: TwinCache = field(default_factory=TwinCache)

    def clear(self) -> None:
        self.pool.clear()
        self.twins.clear()


@dataclass(frozen=True)
class Decision:
    """Which backend, why, and the lean path's settings (``kernel``: ``"linear"`` / ``"onednn"``)."""

    name: str
    reason: str
    kernel: str = "linear"
    screen: bool = False
    draft_tokens: int = 0
    forced: bool = False  # by ``DecodeOptions.backend``: size thresholds do not apply


class Selection(NamedTuple):
    backend: DecodeBackend
    reason: str


def decide(
    lm: LanguageModel,
    *,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    options: DecodeOptions,
    cache: Any = None,
) -> Decision:
    """The backend for this request and the reason, without building anything (``vlmkit info`` shows it).

    attention_mask  # [batch, seq] the whole prompt, left padded
    ``cache``: the empty dynamic cache the lean step would write, to check its layers (default: a new one).
    """
    forced = options.backend
    if config.num_beams > 1 or forced == "beam":
        why = "forced" if forced else f"num_beams={config.num_beams}: eager, dynamic cache"
        return Decision("beam", why, forced=forced == "beam")
    static, note = _static(lm, options=options)
    if static is not None:
        return static
    refusal = _lean_refusal(lm, attention_mask=attention_mask, cache=cache)
    if forced == "dynamic" or (refusal is not None and forced not in _LEAN):
        why = "forced" if forced == "dynamic" else f"model's own forward: {refusal}"
        return Decision("dynamic", note + why, forced=forced == "dynamic")
    if refusal is not None:
        raise ValueError(f"backend={forced!r} cannot run this request: {refusal}")
    lean = _lean(_unwrap(lm), batch=attention_mask.shape[0], config=config, options=options)
    return dataclasses.replace(lean, reason=note + lean.reason) if note else lean


def _static(lm: LanguageModel, *, options: DecodeOptions) -> tuple[Decision | None, str]:
    """``static`` / ``compiled`` where asked for and the cache layout allows, else ``None`` and a note on why not
    (empty when no static cache was asked for)."""
    forced = options.backend
    if forced not in ("static", "compiled") and (forced is not None or not options.uses_static_cache):
        return None, ""
    if not static_cache_supported(lm):
        if forced is not None:
            raise ValueError(
                f"backend={forced!r}: this model's static cache has sliding-window or linear layers"
            )
        return None, "static cache asked for, but its layers do not keep every position; "
    if forced is not None:
        return Decision(forced, "forced", forced=True), ""
    if options.compile is not False:
        return Decision(
            "compiled", "compile set: a torch.compile'd one-token step over a pooled static cache"
        ), ""
    return Decision("static", "static_cache set (VLM: from batch 16 on): a pooled, preallocated cache"), ""


def _lean_refusal(lm: LanguageModel, *, attention_mask: torch.Tensor, cache: Any) -> str | None:
    """Why the lean step cannot run this request (model, padding, cache layout), else ``None``."""
    refusal = lean_refusal(lm)
    if refusal is not None:
        return refusal
    if not bool(attention_mask.all()):  # one host sync per request, on CPU only
        return "a padded batch (the lean step runs unmasked)"
    model: Any = _unwrap(lm)
    cache = cache if cache is not None else new_cache(lm)
    if not plain_dynamic_cache(cache, num_layers=len(model.model.layers)):
        return "sliding-window or quantized KV-cache layers"
    return None


def _lean(model: Any, *, batch: int, config: GenerationConfig, options: DecodeOptions) -> Decision:
    """The lean-step variant for a model ``lean_refusal`` accepted."""
    forced = options.backend
    size, budget = linear_bytes(model), twin_module.ONEDNN_MIN_BYTES
    # vlmkit's CPU-quantized layers run their own forward in the lean step (lean_refusal lets only them through)
    quantized = any(isinstance(m, QuantizedLinear) for m in model.model.layers.modules())
    kernel = "onednn" if onednn_available() and size >= budget else "linear"
    if forced == "lean-onednn" and not onednn_available():
        raise ValueError("backend='lean-onednn': this torch build has no oneDNN linear kernel")
    if forced in ("lean-linear", "lean-onednn"):
        return Decision(forced, "forced", kernel=forced.removeprefix("lean-"), forced=True)
    what = "Llama with vlmkit-quantized layers" if quantized else "float32 Llama"
    facts = f"{what} on CPU, float32 matrices {_mb(size)} {'>=' if size >= budget else '<'} cache budget"
    facts += f" {budget >> 20} MiB" + (
        " (no oneDNN in this torch build)" if size >= budget and kernel == "linear" else ""
    )
    greedy = not config.do_sample and config.repetition_penalty == 1
    if forced in ("screened-head", "speculative") and not greedy:
        raise ValueError(f"backend={forced!r} serves plain greedy requests only (no sampling, no penalty)")
    screen = screen_refusal(model, force=forced == "screened-head") if greedy else None
    if forced == "screened-head" and screen is not None:
        raise ValueError(f"backend='screened-head': {screen}")
    if forced == "screened-head":
        return Decision(forced, "forced", kernel=kernel, screen=True, forced=True)
    draft, draft_note = _draft_tokens(
        model, kernel=kernel, batch=batch, greedy=greedy, options=options, quantized=quantized
    )
    if draft:
        return Decision("speculative", f"{draft_note}; {facts}", kernel=kernel, screen=greedy and screen is None,
                        draft_tokens=draft, forced=forced == "speculative")  # fmt: skip
    notes = [note for note in (draft_note, screen) if note]
    if not greedy:
        notes.append("sampling" if config.do_sample else "repetition penalty")
    elif screen is None:
        head = model.lm_head.weight
        note = f"plain greedy, output layer {_mb(head.numel() * head.element_size())} screened in float16"
        return Decision("screened-head", f"{note}; {facts}", kernel=kernel, screen=True)
    return Decision(f"lean-{kernel}", "; ".join([facts, *notes]), kernel=kernel)


def _draft_tokens(
    model: Any, *, kernel: str, batch: int, greedy: bool, options: DecodeOptions, quantized: bool
) -> tuple[int, str]:
    """Draft tokens per round (0: none) and a note why (see ``DecodeOptions.speculative``)."""
    if options.backend == "speculative":
        if batch != 1 or not fbgemm_available() or quantized:
            raise ValueError("backend='speculative' needs a batch of 1, fbgemm's float16 kernels and an LM that "
                             "is not quantized")  # fmt: skip
        return options.speculative or AUTO_DRAFT_TOKENS, "forced"
    if not greedy or batch != 1 or (options.speculative is None and kernel != "onednn"):
        return 0, ""  # auto drafts only where a step streams weights beyond the CPU caches
    if options.speculative == 0:
        return 0, "speculative=0"
    if quantized or is_quantized(model):  # its float16 draft would stream more bytes than the quantized LM
        return 0, "quantized LM: no float16 draft"
    if not fbgemm_available():
        return 0, "no fbgemm for a float16 draft"
    if options.speculative is not None:  # an explicit N drafts whatever the LM's size
        return (
            options.speculative,
            f"float16 draft, up to {options.speculative} tokens per round (speculative=N)",
        )
    if not affordable(model):
        return 0, f"a {_mb(draft_bytes(model))} float16 draft is not affordable"
    return AUTO_DRAFT_TOKENS, f"float16 draft, up to {AUTO_DRAFT_TOKENS} tokens per round (speculative=None)"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size < 10e6 else f"{size / 1e6:.0f} MB"


def select_backend(
    lm: LanguageModel,
    *,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    options: DecodeOptions,
    resources: DecodeResources | None = None,
    past: PromptKV | None = None,
    dtype: torch.dtype | None = None,
) -> Selection:
    """Build the backend for this request (``decide``'s choice) and say why; logged at debug level.

    attention_mask  # [batch, seq] the whole prompt (a reused ``past`` included), left padded
    ``dtype`` is the static cache's (the prompt embeddings'); ``resources`` default to ones for this call only.
    """
    resources = resources or DecodeResources()
    cache = new_cache(lm)  # the dynamic backends' cache, its layers checked by ``decide``
    decision = decide(lm, attention_mask=attention_mask, config=config, options=options, cache=cache)
    run: dict[str, Any] = dict(attention_mask=attention_mask, past=past, cache=cache)
    backend: DecodeBackend
    reason = decision.reason
    if decision.name == "beam":
        backend = BeamRunner(lm, **run, twins=None)
    elif decision.name in ("static", "compiled"):
        compile_ = (options.compile or True) if decision.name == "compiled" else False
        backend = StaticRunner(lm, attention_mask=attention_mask, past=past, max_new_tokens=config.max_new_tokens,
                               options=dataclasses.replace(options, compile=compile_), pool=resources.pool,
                               dtype=dtype or torch.float32)  # fmt: skip
    elif decision.name == "dynamic":
        backend = DynamicRunner(lm, **run, twins=resources.twins)
    else:
        backend, reason = _build_lean(lm, decision=decision, twins=resources.twins, run=run)
    logger.debug("decode backend %s (%s)", backend.name, reason)
    return Selection(backend, reason)


def _build_lean(
    lm: LanguageModel, *, decision: Decision, twins: TwinCache, run: dict[str, Any]
) -> tuple[LeanRunner, str]:
    """The lean runner ``decision`` names; a screen or draft that cannot be built (a weight beyond float16's
    range) falls back to the plain lean step, and the reason says so."""
    model: Any = _unwrap(lm)
    step_model: Any = model
    if decision.kernel == "onednn":  # any size: ``decide`` chose the kernel
        step_model = onednn_twin(model, twins=twins, force=True)
    force = decision.forced and decision.name == "screened-head"
    head = screened_head(model, twins=twins, force=force) if decision.screen else None
    reason = decision.reason
    if decision.screen and head is None:
        reason += "; no float16 screen: an output-layer weight is beyond float16's range"
    lean = dict(run, twins=twins, model=model, step_model=step_model, head=head)
    if decision.draft_tokens:
        draft = float16_draft(model, twins=twins)
        if draft is not None:
            return SpeculativeRunner(lm, draft=draft, draft_tokens=decision.draft_tokens, **lean), reason
        reason += "; no float16 draft: a weight is beyond float16's range"
    return LeanRunner(lm, **lean), reason
