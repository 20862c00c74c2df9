"""A lean eager decode step for small Llama models on CPU: the same tensor ops as transformers, less Python.

At a few million parameters a batch-1 decode step is not bound by arithmetic but by framework overhead:
transformers' ``LlamaForCausalLM`` spends most of a step in module calls, decorators, output records and mask
construction (measured 0.69 ms per step on the ``tiny-scratch`` shapes, of which 0.39 ms are the tensor ops).
``lean_decode_step`` runs exactly the ops transformers runs for one token over a ``DynamicCache`` - same kernels,
same order, same dtypes - straight on the weights, so the logits are bitwise identical; it only drops the work
around them. It covers the case ``ask`` hits (no padding, so no attention mask: transformers skips it too) and
falls back to the model's own forward for anything else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.generation.kv_cache import _unwrap
from vlmkit.models.language.protocols import LanguageModel
from vlmkit.quantization import QuantizedLinear

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def lean_step_model(lm: LanguageModel, *, attention_mask: torch.Tensor) -> Any | None:
    """The model ``lean_decode_step`` runs in place of ``lm``'s own decode step for this request, else ``None``
    (``lean_refusal`` says why). The cache must be checked too, once it has its layers (``plain_dynamic_cache``)."""
    if lean_refusal(lm) is not None or not bool(attention_mask.all()):  # one host sync per request
        return None
    return _unwrap(lm)


def lean_refusal(lm: LanguageModel) -> str | None:
    """Why ``lm``'s decode step cannot be ``lean_decode_step`` (``None``: it can, for a batch without padding).

    Plain ``LlamaForCausalLM`` in float32 on CPU, sdpa attention, default RoPE, SiLU MLP, plain ``nn.Linear``
    layers (or vlmkit's quantized CPU layers) without hooks (no adapters).
    """
    from transformers import LlamaForCausalLM

    model = _unwrap(lm)
    if type(model) is not LlamaForCausalLM:
        return f"{type(model).__name__} is not a plain LlamaForCausalLM"
    if model.training or model.device.type != "cpu" or model.dtype != torch.float32:
        where = (
            "in training mode"
            if model.training
            else f"{str(model.dtype).replace('torch.', '')} on {model.device.type}"
        )
        return f"the LM is {where}, not float32 on CPU in eval mode"
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    if (
        config._attn_implementation != "sdpa"
        or rope.get("rope_type", "default") != "default"
        or config.hidden_act != "silu"
        or head_dim > 256
        or len(model.model.layers) != config.num_hidden_layers
    ):
        return "a Llama variant the lean step does not copy (attention, RoPE, activation or head size)"
    return _module_refusal(model)


def _module_refusal(model: Any) -> str | None:
    """Layers the lean step would bypass: another Linear type (an adapter, a foreign quantization) or a hook."""
    modules = [
        model,
        model.model,
        model.model.embed_tokens,
        model.model.norm,
        model.model.rotary_emb,
        model.lm_head,
    ]
    for layer in model.model.layers:
        modules += [layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm]
        linears = [getattr(layer.self_attn, n) for n in _PROJECTIONS] + [getattr(layer.mlp, n) for n in _MLP]
        # vlmkit's quantized CPU layers run their own forward (``_linear``), exactly as the model calls them
        for linear in linears:
            if type(linear) is not nn.Linear and not isinstance(linear, QuantizedLinear):
                return (
                    f"a {type(linear).__name__} layer (adapter or foreign quantization) in place of nn.Linear"
                )
        modules += linears
    if any(_has_hooks(module) for module in modules) or nn.modules.module._global_forward_hooks:
        return "forward hooks on the LM's modules"
    return None


def plain_dynamic_cache(cache: Any, *, num_layers: int) -> bool:
    """One plain ``DynamicLayer`` per model layer (no sliding window, no quantisation)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return layers is not None and len(layers) == num_layers and all(type(x) is DynamicLayer for x in layers)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward, float32 in and out (its dtype casts are no-ops then)."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return norm.weight * (x * torch.rsqrt(variance + norm.variance_epsilon))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear``'s own call, minus the module call; a twin's layer (``twins.py``) runs its forward directly."""
    if type(module) is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    return module.forward(x)  # twins carry no hooks: skip ``Module.__call__``


def lean_decode_step(
    model: Any, *, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any
) -> torch.Tensor:
    """One token per row on top of ``cache`` (extended in place, as ``DynamicLayer.update`` does).

    model           # what ``lean_step_model`` returned
    input_ids       # [batch, 1]
    position_ids    # [batch, 1]
    returns         # [batch, vocab] float32, bitwise equal to ``decode_step(lm, ...)``
    """
    hidden = lean_hidden(model, input_ids=input_ids, position_ids=position_ids, cache=cache)
    return _linear(model.lm_head, hidden[:, -1]).to(torch.float32)


def lean_hidden(
    model: Any, *, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any
) -> torch.Tensor:
    """The final-norm hidden states of ``tokens`` new tokens per row on top of ``cache`` (extended in place).

    input_ids       # [batch, tokens]
    position_ids    # [batch, tokens]
    returns         # [batch, tokens, dim]
    With one token there is no mask (transformers passes none either); with more, each new token sees the
    cache and the new tokens up to itself. No padding in either case (``lean_step_model`` checks it).
    """
    base = model.model
    batch, tokens = input_ids.shape
    embed = base.embed_tokens
    x = F.embedding(input_ids, embed.weight, embed.padding_idx)  # [batch, tokens, dim]
    # LlamaRotaryEmbedding.forward: once per step, shared by every layer (attention_scaling is 1 for default RoPE)
    freqs = position_ids[..., None].float() * base.rotary_emb.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [batch, 1, tokens, head_dim]
    mask = None
    if tokens > 1:
        cached = cache.layers[0].keys.shape[-2]
        mask = torch.ones(tokens, cached + tokens, dtype=torch.bool).tril(diagonal=cached)  # [tokens, all]
    for index, layer in enumerate(base.layers):
        attn = layer.self_attn
        h = _rms_norm(layer.input_layernorm, x)
        q = _linear(attn.q_proj, h).view(batch, tokens, -1, attn.head_dim).transpose(1, 2)
        k = _linear(attn.k_proj, h).view(batch, tokens, -1, attn.head_dim).transpose(1, 2)
        v = _linear(attn.v_proj, h).view(batch, tokens, -1, attn.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kv = cache.layers[index]
        _append(kv, "keys", k)
        _append(kv, "values", v)
        # one token, no mask: the very call transformers' sdpa_attention_forward makes; several: causal among them
        out = F.scaled_dot_product_attention(q, kv.keys, kv.values, attn_mask=mask, dropout_p=0.0,
                                             scale=attn.scaling, is_causal=False,
                                             enable_gqa=attn.num_key_value_groups > 1)  # fmt: skip
        x = x + _linear(attn.o_proj, out.transpose(1, 2).reshape(batch, tokens, -1))
        mlp = layer.mlp
        h = _rms_norm(layer.post_attention_layernorm, x)
        x = x + _linear(mlp.down_proj, F.silu(_linear(mlp.gate_proj, h)) * _linear(mlp.up_proj, h))
    return _rms_norm(base.norm, x)


def _append(layer: Any, name: str, new: torch.Tensor) -> None:
    """``layer.<name>`` extended by ``new`` along the sequence axis (-2), as ``DynamicLayer.update`` does.

    ``torch.cat`` copies the whole cache every step (a quarter of a batch-1 step at 80M parameters and 230 cached
    positions); here the tensor is a view into a buffer with room to spare and only the new positions are written.
    Only a buffer made here is ever written in place: when the layer's tensor is anything else (the prefill's
    output, a reused prompt prefix, a tensor transformers' own update made) it is copied into a new buffer first.
    """
    old = getattr(layer, name)
    length, extra = old.shape[-2], new.shape[-2]
    buffer: torch.Tensor | None = getattr(layer, f"_vlmkit_{name}_buffer", None)
    if buffer is None or not _owns(buffer, old, length + extra):
        capacity = length + extra + max(256, length // 4)
        buffer = old.new_empty((*old.shape[:-2], capacity, old.shape[-1]))
        buffer[..., :length, :] = old
        setattr(layer, f"_vlmkit_{name}_buffer", buffer)
    buffer[..., length : length + extra, :] = new
    setattr(layer, name, buffer[..., : length + extra, :])


def _owns(buffer: torch.Tensor | None, tensor: torch.Tensor, needed: int) -> bool:
    """``tensor`` is a leading slice of ``buffer`` (same layout) and the buffer has room for ``needed`` positions."""
    return (
        buffer is not None
        and buffer.data_ptr() == tensor.data_ptr()
        and buffer.shape[:-2] == tensor.shape[:-2]
        and buffer.stride() == tensor.stride()
        and buffer.dtype == tensor.dtype
        and buffer.shape[-2] >= needed
    )
