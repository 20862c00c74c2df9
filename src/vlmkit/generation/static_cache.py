"""A preallocated (static) KV cache and a decode step that ``torch.compile`` can capture whole.

transformers' ``StaticCache`` (same constructor on 5.17 and 5.24: ``StaticCache(config=, max_cache_len=)``, buffers
allocated lazily at the first update) holds ``[batch, kv_heads, max_len, head_dim]`` per layer and writes in place,
so the decode step has fixed shapes and fixed tensor addresses: what CUDA graphs (``mode="reduce-overhead"``)
need. As in gpt-fast only the one-token decode step is compiled; prefill stays eager (its length varies).

Caches are pooled per (model, batch, length bucket, dtype, device) so a second request reuses the buffers (and,
on GPU, the recorded graphs) instead of allocating again; the pool belongs to the model's owner
(``backend.DecodeResources``, one per ``VLM``). A cache is taken out of the pool while a generation
uses it, so concurrent generations never share one.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StaticCache

from vlmkit.generation.kv_cache import plain_layers
from vlmkit.models.language.protocols import LanguageModel

# cache lengths round up to this, so nearby prompt lengths share buffers and compiled graphs
LENGTH_BUCKET = 256


def bucket_length(length: int, *, multiple: int = LENGTH_BUCKET) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-length // multiple) * multiple


def new_static_cache(lm: LanguageModel, *, max_len: int) -> StaticCache:
    return StaticCache(config=lm.config, max_cache_len=max_len)


def static_cache_supported(lm: LanguageModel) -> bool:
    """Whether ``lm`` gets a static cache whose layers all keep every position (no sliding window, no
    linear-attention state): the layout the static decode loop and prefix restore assume."""
    config = getattr(lm, "config", None)
    if config is None:
        return False
    try:
        return plain_layers(new_static_cache(lm, max_len=1))
    except (TypeError, ValueError, AttributeError):
        return False


def reset_static_cache(cache: StaticCache) -> None:
    """Mark every layer empty. Stale values past the new length are never read: the attention mask hides them."""
    layers: Sequence[Any] = cache.layers  # plain StaticLayers here (static_cache_supported)
    for layer in layers:
        if layer.is_initialized:
            layer.cumulative_length.zero_()


class StaticCachePool:
    """Idle static caches, least recently used first; at most ``max_entries`` are kept."""

    def __init__(self, *, max_entries: int = 2) -> None:
        self.max_entries = max_entries
        self._idle: OrderedDict[tuple[Any, ...], StaticCache] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(
        self, lm: LanguageModel, *, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[tuple[Any, ...], StaticCache]:
        """An empty cache for this shape (reused when one is idle) and the key to ``release`` it under."""
        key = (id(lm), batch, max_len, dtype, str(device))
        with self._lock:
            cache = self._idle.pop(key, None)
        if cache is None:
            cache = new_static_cache(lm, max_len=max_len)
        reset_static_cache(cache)
        return key, cache

    def release(self, key: tuple[Any, ...], cache: StaticCache) -> None:
        with self._lock:
            self._idle[key] = cache
            self._idle.move_to_end(key)
            while len(self._idle) > self.max_entries:
                self._idle.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


# ------------------------------------------------------------------------------------------- decode step


def forward_logits(lm: LanguageModel, inputs: dict[str, Any]) -> torch.Tensor:
    """The decode forward: last-position logits as float32.  # [batch, vocab]"""
    return lm(**inputs).logits[:, -1, :].to(torch.float32)


def compile_options(option: bool | dict[str, Any], *, device: torch.device) -> dict[str, Any]:
    """``torch.compile`` arguments: whole graph, fixed shapes, CUDA graphs on GPU; a dict overrides any of them."""
    defaults: dict[str, Any] = {"fullgraph": True, "dynamic": False}
    if device.type == "cuda":
        defaults["mode"] = "reduce-overhead"
    return defaults | (option if isinstance(option, dict) else {})


class DecodeStep:
    """Runs ``forward_logits`` eagerly or compiled; a compile failure warns once and falls back to eager."""

    _compiled: dict[str, Callable[..., torch.Tensor]] = {}
    _lock = threading.Lock()

    def __init__(self, *, options: dict[str, Any] | None) -> None:
        self.options = options
        self.cuda_graphs = options is not None and options.get("mode") in ("reduce-overhead", "max-autotune")
        self._fn = forward_logits if options is None else self._compiled_fn(options)

    @classmethod
    def _compiled_fn(cls, options: dict[str, Any]) -> Callable[..., torch.Tensor]:
        key = repr(sorted(options.items(), key=lambda item: item[0]))
        with cls._lock:  # one wrapper per option set: dynamo's cache of compiled graphs lives on it
            if key not in cls._compiled:
                cls._compiled[key] = torch.compile(forward_logits, **options)
            return cls._compiled[key]

    def __call__(self, lm: LanguageModel, inputs: dict[str, Any]) -> torch.Tensor:
        if self._fn is forward_logits:
            return forward_logits(lm, inputs)
        if self.cuda_graphs:
            # the previous step's outputs are consumed: let CUDA graphs reuse their memory
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return self._fn(lm, inputs)
        except torch._dynamo.exc.TorchDynamoException as exc:  # a model dynamo cannot capture whole
            warnings.warn(
                f"compiled decode step failed, running it eagerly: {exc}", RuntimeWarning, stacklevel=2
            )
            self._fn = forward_logits
            return forward_logits(lm, inputs)
