"""KV-cache plumbing over transformers' ``DynamicCache`` that works across transformers 5.x releases.

Two things moved between releases: the forward keyword (``past_key_values`` up to ~5.2x, ``cache`` later,
with the old name deprecated) and the cache helpers for beam search. We pick the keyword from the model's
forward signature, and reorder batch rows with ``reorder_cache`` when the cache has it, else by
``index_select`` on each layer's key/value tensors.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers import DynamicCache

# Newest first: a model accepting "cache" takes that, older ones only know "past_key_values".
_CACHE_KWARGS = ("cache", "past_key_values")


@functools.lru_cache(maxsize=64)
def _forward_params(forward_owner: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(forward_owner.forward).parameters)
    except (TypeError, ValueError):  # builtins / C extensions without a signature
        return frozenset()


def _unwrap(lm: Any) -> Any:
    """The transformers model under a wrapper (e.g. PEFT) whose forward only takes ``**kwargs``."""
    while not (_forward_params(type(lm)) & set(_CACHE_KWARGS)) and hasattr(lm, "get_base_model"):
        inner = lm.get_base_model()
        if inner is lm:
            break
        lm = inner
    return lm


def cache_kwarg(lm: Any) -> str:
    """The forward keyword that takes the KV cache for ``lm``."""
    params = _forward_params(type(_unwrap(lm)))
    for name in _CACHE_KWARGS:
        if name in params:
            return name
    # Unknown wrapper: the old name is still accepted (deprecated) by newer releases; the new one is not by older.
    return "past_key_values"


def accepts_logits_to_keep(lm: Any) -> bool:
    """Whether ``lm.forward`` can compute logits for the last position only."""
    return "logits_to_keep" in _forward_params(type(_unwrap(lm)))


def new_cache(lm: Any) -> DynamicCache:
    """An empty dynamic cache laid out for ``lm`` (sliding-window layers included when the config has them)."""
    config = getattr(lm, "config", None)
    try:
        return DynamicCache(config=config)
    except TypeError:  # a release whose DynamicCache takes no config
        return DynamicCache()


def reorder_cache(cache: Any, index: torch.Tensor) -> None:
    """Replace the cache's batch rows by ``cache[index]`` in place (expand to beams, follow beam parents).

    index  # [new_batch] int64, rows of the current cache
    """
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
    else:
        reorder_layer_tensors(cache, index)


def reorder_layer_tensors(cache: Any, index: torch.Tensor) -> None:
    """``reorder_cache`` by hand: ``index_select`` on every layer's keys / values (per-layer objects or lists)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
                layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
                layer.values = layer.values.index_select(0, index.to(layer.values.device))
        return
    for name in ("key_cache", "value_cache"):  # the older layout: parallel per-layer lists
        tensors = getattr(cache, name)
        for i, tensor in enumerate(tensors):
            if tensor.numel() > 0:
                tensors[i] = tensor.index_select(0, index.to(tensor.device))
