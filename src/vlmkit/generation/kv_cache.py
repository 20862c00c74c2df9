"""KV-cache plumbing over transformers' ``DynamicCache`` that works across transformers 5.x releases.

Two things moved between releases: the forward keyword (``past_key_values`` up to ~5.2x, ``cache`` later,
with the old name deprecated) and the cache helpers for beam search. We pick the keyword from the model's
forward signature, and reorder batch rows with ``reorder_cache`` when the cache has it, else by
``index_select`` on each layer's key/value tensors.

``PromptKV`` is the KV of a batch-1 prompt, detached from any cache object: the prefix cache stores it and a
later request starts from it (``fill_cache``) instead of recomputing those positions.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from vlmkit.models.language.protocols import LanguageModel

# Newest first: a model accepting "cache" takes that, older ones only know "past_key_values".
_CACHE_KWARGS = ("cache", "past_key_values")


@functools.lru_cache(maxsize=64)
def _forward_params(forward_owner: type[nn.Module]) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(forward_owner.forward).parameters)
    except (TypeError, ValueError):  # builtins / C extensions without a signature
        return frozenset()


def _unwrap(lm: LanguageModel) -> LanguageModel:
    """The transformers model under a wrapper (e.g. PEFT) whose forward only takes ``**kwargs``."""
    while not (_forward_params(type(lm)) & set(_CACHE_KWARGS)) and hasattr(lm, "get_base_model"):
        inner = lm.get_base_model()
        if inner is lm:
            break
        lm = inner
    return lm


def cache_kwarg(lm: LanguageModel) -> str:
    """The forward keyword that takes the KV cache for ``lm``."""
    params = _forward_params(type(_unwrap(lm)))
    for name in _CACHE_KWARGS:
        if name in params:
            return name
    # Unknown wrapper: the old name is still accepted (deprecated) by newer releases; the new one is not by older.
    return "past_key_values"


def accepts_logits_to_keep(lm: LanguageModel) -> bool:
    """Whether ``lm.forward`` can compute logits for the last position only."""
    return "logits_to_keep" in _forward_params(type(_unwrap(lm)))


def new_cache(lm: LanguageModel) -> DynamicCache:
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


@dataclass(frozen=True)
class PromptKV:
    """Keys / values of the first ``length`` positions of one prompt, per layer.

    layers  # [(keys [1, kv_heads, length, head_dim], values [1, kv_heads, length, head_dim])] * num_layers
    """

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[-2] if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def truncate(self, length: int) -> PromptKV:
        """The first ``length`` positions (views, no copy)."""
        return PromptKV(layers=tuple((k[:, :, :length], v[:, :, :length]) for k, v in self.layers))


def plain_layers(cache: Any) -> bool:
    """Whether every layer of ``cache`` keeps all positions (no sliding window / linear-attention state), so a
    prompt's KV can be cut at any position and restored."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    return all(not getattr(layer, "is_sliding", False) and hasattr(layer, "keys") for layer in layers)


def fill_cache(cache: Any, past: PromptKV) -> None:
    """Write ``past`` into an empty ``cache`` (dynamic or static) as if those positions had been prefilled."""
    for index, (keys, values) in enumerate(past.layers):
        cache.update(keys, values, index)


def own_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when it owns its storage exactly, else a compact copy (a view of a fused QKV output or of
    a preallocated buffer would otherwise pin, and be billed for, the whole buffer)."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def snapshot_prompt(cache: Any, *, length: int, layers: Sequence[Any] | None = None) -> PromptKV:
    """The first ``length`` positions of a batch-1 ``cache`` right after prefill.

    A dynamic cache replaces its tensors on every update (``torch.cat``), so what it holds now is never written
    again and is kept without a copy; a static cache's buffers are reused, so those positions are copied out.
    """
    out = []
    for layer in layers if layers is not None else cache.layers:
        keys, values = layer.keys[:, :, :length], layer.values[:, :, :length]
        out.append((own_tensor(keys), own_tensor(values)))
    return PromptKV(layers=tuple(out))
