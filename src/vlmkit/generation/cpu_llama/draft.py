"""The draft of speculative decoding: a float16 copy of a float32 Llama's matrices, run by a lean fused step.

A batch-1 decode step on CPU streams every weight once, so a copy with half the bytes proposes tokens in about
half the time. Float16 rounding (relative 2^-11 per weight) leaves the argmax alone except at near-ties, so the
draft agrees with the float32 model on almost every token (15.5 of 16 proposals per round on the CPU benchmark's
random-weight model, where an int8 copy agreed on about 4 of 6), and the model verifies them all in one pass
(``speculative.py``): the answer stays the float32 model's.

Per layer the draft keeps four matrices packed for fbgemm's float16 GEMM (float32 activations and sums): q, k and v
stacked, o, gate and up stacked, and down; fewer, larger calls stream faster than the model's seven. Norms use
``F.rms_norm``, one kernel instead of six ops. The draft shares the model's embedding table and writes its
proposals' keys and values into the request's own cache (``lean_step._append``), which the verifier crops.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.generation.cpu_llama.lean_step import _append, _rotate_half
from vlmkit.generation.cpu_llama.twins import FLOAT16_MAX, TwinCache, fbgemm_available

# ``speculative=None`` (auto) builds a draft only up to this size, and within a quarter of the memory available
AUTO_MAX_BYTES = 1 << 30


def _pack(*linears: nn.Linear) -> Any:
    """One fbgemm float16 matrix of the stacked layers (bias stacked too, or none)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    bias = None
    if any(linear.bias is not None for linear in linears):
        bias = torch.cat([linear.bias.detach() if linear.bias is not None else linear.weight.new_zeros(
            linear.out_features) for linear in linears])  # fmt: skip
    return torch.ops.quantized.linear_prepack_fp16(weight, bias)


def _mm(x: torch.Tensor, packed: Any) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic_fp16(x, packed)


class Float16Draft:
    """Greedy proposals from a float16 copy of ``model`` (a plain float32 ``LlamaForCausalLM`` that
    ``lean_step.lean_step_model`` accepted); the model itself is never touched."""

    def __init__(self, model: Any) -> None:
        base = model.model
        self.embed = base.embed_tokens.weight  # shared, not copied
        self.inv_freq = base.rotary_emb.inv_freq
        self.final_norm = (base.norm.weight, base.norm.variance_epsilon)
        self.head = _pack(model.lm_head)
        self.layers = [self._layer(layer) for layer in base.layers]

    @staticmethod
    def _layer(layer: Any) -> dict[str, Any]:
        attn, mlp = layer.self_attn, layer.mlp
        return {
            "qkv": _pack(attn.q_proj, attn.k_proj, attn.v_proj),
            "split": (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features),
            "o": _pack(attn.o_proj),
            "gate_up": _pack(mlp.gate_proj, mlp.up_proj),
            "down": _pack(mlp.down_proj),
            "norms": [
                (n.weight, n.variance_epsilon)
                for n in (layer.input_layernorm, layer.post_attention_layernorm)
            ],
            "head_dim": attn.head_dim,
            "scaling": attn.scaling,
            "gqa": attn.num_key_value_groups > 1,
        }

    @torch.no_grad()
    def propose(
        self, *, token: int, position: int, count: int, cache: Any, stop: frozenset[int]
    ) -> list[int]:
        """Up to ``count`` greedy tokens after ``token`` (at ``position``), ending early after one in ``stop``;
        the cache keeps their keys and values until the verifier crops them."""
        proposals: list[int] = []
        current = token
        for step in range(count):
            current = int(self._next(current, position=position + step, cache=cache))
            proposals.append(current)
            if current in stop:
                break
        return proposals

    def _next(self, token: int, *, position: int, cache: Any) -> torch.Tensor:
        """One decode step for one token.  x: [1, 1, dim]"""
        x = F.embedding(torch.tensor([[token]]), self.embed)  # [1, 1, dim]
        freqs = position * self.inv_freq  # [head_dim / 2]
        emb = torch.cat((freqs, freqs))
        cos, sin = emb.cos(), emb.sin()  # [head_dim]
        for index, layer in enumerate(self.layers):
            x = x + self._attention(layer, x, cos=cos, sin=sin, kv=cache.layers[index])
            weight, eps = layer["norms"][1]
            gate, up = _mm(F.rms_norm(x, x.shape[-1:], weight, eps), layer["gate_up"]).chunk(2, dim=-1)
            x = x + _mm(F.silu(gate) * up, layer["down"])
        weight, eps = self.final_norm
        return _mm(F.rms_norm(x[:, -1], x.shape[-1:], weight, eps), self.head).argmax(dim=-1)

    @staticmethod
    def _attention(
        layer: dict[str, Any], x: torch.Tensor, *, cos: torch.Tensor, sin: torch.Tensor, kv: Any
    ) -> torch.Tensor:
        """x [1, 1, dim] -> attention output [1, 1, dim]; appends this position's key and value to ``kv``."""
        (weight, eps), head_dim = layer["norms"][0], layer["head_dim"]
        h = F.rms_norm(x, x.shape[-1:], weight, eps)
        q, k, v = (t.view(1, 1, -1, head_dim).transpose(1, 2)
                   for t in _mm(h, layer["qkv"]).split(layer["split"], dim=-1))  # fmt: skip
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        _append(kv, "keys", k)
        _append(kv, "values", v)
        out = F.scaled_dot_product_attention(
            q, kv.keys, kv.values, scale=layer["scaling"], enable_gqa=layer["gqa"]
        )
        return _mm(out.transpose(1, 2).reshape(1, 1, -1), layer["o"])


def float16_draft(model: Any, *, twins: TwinCache) -> Float16Draft | None:
    """The cached float16 draft of ``model`` (see ``lean_step.lean_step_model``), or ``None`` without fbgemm's
    float16 kernels or when a weight is beyond float16's range."""
    if not fbgemm_available():
        return None
    return twins.get("float16_draft", model, build=lambda: _build(model))  # None is cached too


def draft_bytes(model: Any) -> int:
    """Bytes of ``model``'s float16 draft: half its ``nn.Linear`` matrices."""
    return sum(m.weight.numel() * 2 for m in model.modules() if type(m) is nn.Linear)


def affordable(model: Any) -> bool:
    """Whether auto mode may build ``model``'s draft: its float16 matrices within ``AUTO_MAX_BYTES`` and within a
    quarter of the memory available now (where the system says; Linux ``MemAvailable``)."""
    size = draft_bytes(model)
    available = _available_memory()
    return size <= AUTO_MAX_BYTES and (available is None or 4 * size <= available)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _build(model: Any) -> Float16Draft | None:
    matrices = [m.weight for m in model.modules() if type(m) is nn.Linear]
    if not all(bool(w.detach().abs().max() < FLOAT16_MAX) for w in matrices):  # also catches inf / nan
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch marks its quantized ops for a future move to torchao
            return Float16Draft(model)
    except (RuntimeError, NotImplementedError):  # a build whose fbgemm lacks the float16 kernels
        return None
