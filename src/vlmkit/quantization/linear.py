"""Quantized stand-ins for ``nn.Linear`` on CPU, whose state is plain tensors (safetensors, never pickles).

- ``Int8DynamicLinear``: int8 weights, one symmetric scale per output row; each call quantizes its activations
  per token (one scale per row) and multiplies in integers, then rescales to float32: dynamic int8, not
  weight-only. Decode steps (a few rows) run fbgemm's dynamic GEMM (``torch.ops.quantized.linear_dynamic``, the
  kernel of ``torch.ao``'s ``quantize_dynamic``: 7-bit asymmetric activations) one row at a time, prefills
  ``torch._int_mm`` (8-bit symmetric activations, exact int32 sums). Either way a row's result depends on that
  row alone, so batching and padding never change an answer. int8 weight-only kernels (``_weight_int8pack_mm``,
  torchao's) measured slower than float32 on this CPU (docs/quantization.md).
- ``Int4Linear``: weight-only, 4-bit codes in groups of ``group_size`` input columns, one bfloat16 scale and zero
  per group (asymmetric). The product is torch's ``_weight_int4pack_mm_for_cpu`` (the kernel torchao's CPU int4
  layout calls) with bfloat16 activations: its float32-activation path measured 30x slower.

The kernels' packed forms are built on first use and cached per weight tensor; the module keeps only the plain
tensors (``qweight``, scales, ``bias``) as buffers, so the quantized base never trains and ``state_dict`` is
portable. Backward (QLoRA: gradients reach adapters below a quantized layer) multiplies by the dequantized weight,
as bitsandbytes does; no gradient reaches the quantized weights.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vlmkit.quantization.errors import QuantizationError

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 CPU kernel packs
# int8: up to this many rows (decode batches) fbgemm runs each row; more rows (prefill) take torch._int_mm
FBGEMM_MAX_ROWS = 16
# packed kernel weights per quantized weight tensor (by id, dropped with the tensor): (its version, packed)
_PACKED: dict[int, tuple[int, Any]] = {}


class QuantizedLinear(nn.Module):
    """Common part: shapes, device-only moves of the quantized buffers, the autograd bridge, dequantization."""

    scheme = ""  # the name stored in config.json's ``quantization.scheme``
    # buffers (registered in __init__), declared for type checkers: not nn.Module.__getattr__'s Tensor | Module
    bias: torch.Tensor | None
    qweight: torch.Tensor

    def __init__(self, *, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        """``.to(dtype)`` would round scales and break the codes' meaning: quantized buffers only change device."""
        kept = {name: buf for name, buf in self._buffers.items() if name != "bias" and buf is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            moved = self._buffers[name]
            assert moved is not None  # _apply maps a tensor to a tensor
            self._buffers[name] = old.to(moved.device) if moved.dtype != old.dtype else moved
        return self

    def dequantize(self) -> torch.Tensor:  # [out, in] float32
        raise NotImplementedError

    def kernel(self, x: torch.Tensor) -> torch.Tensor:  # [rows, in] float32 -> [rows, out] float32
        raise NotImplementedError

    def to_linear(self, *, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weights (merging adapters, exporting)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.device, dtype=dtype)  # fmt: skip
        with torch.no_grad():
            linear.weight.copy_(self.dequantize())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def one_row(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [1, ..., 1, in] float32 -> [1, ..., 1, out] straight through the kernel, or None (no fast path)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        # a batch-1 decode step: one row, no bias, no gradient; per call overhead is most of such a small product
        if x.numel() == self.in_features and x.dtype is torch.float32 and x.is_cpu and self.bias is None:
            if not (x.requires_grad and torch.is_grad_enabled()) and (out := self.one_row(x)) is not None:
                return out
        if self.device.type != "cpu":
            raise RuntimeError(f"{self.scheme} layers run on CPU only; this one is on {self.device}")
        rows = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and rows.requires_grad:
            out = _QuantizedMatmul.apply(rows, self)
        else:
            out = self.kernel(rows.float())
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


class _QuantizedMatmul(torch.autograd.Function):
    """y = x W^T with the quantized kernel; dx = dy W with W dequantized on the fly (W itself gets no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.kernel(x.float()).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = ctx.layer.dequantize()  # [out, in]
        return (grad.float() @ weight).to(grad.dtype), None


def _packed(key: torch.Tensor, build: Callable[[], Any]) -> Any:
    """``build()``'s packed weights, cached until ``key`` changes in place (``load_state_dict`` copies in place)."""
    # an inference tensor (made under torch.inference_mode) keeps no version: it is never written in place
    version = -1 if key.is_inference() else key._version
    hit = _PACKED.get(id(key))
    if hit is not None and hit[0] == version:
        return hit[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks its quantized tensors for a future move to torchao
        packed = build()
    if hit is None:
        weakref.finalize(key, _PACKED.pop, id(key), None)
    _PACKED[id(key)] = (version, packed)
    return packed


class Int8DynamicLinear(QuantizedLinear):
    """int8 weights + per-row scales; activations quantized per token on each call; int8 x int8 -> int32 GEMM."""

    scheme = "int8-dynamic-per-token"
    scale: torch.Tensor

    def __init__(self, *, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features=in_features, out_features=out_features, bias=bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))  # [out] float32: weight = qweight * scale

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8DynamicLinear:
        layer = cls(in_features=linear.in_features, out_features=linear.out_features,
                    bias=linear.bias is not None)  # fmt: skip
        weight = linear.weight.detach().float().cpu()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [out] symmetric per row
        layer.qweight.copy_((weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        layer.scale.copy_(scale)
        if linear.bias is not None and layer.bias is not None:  # both or neither
            layer.bias.copy_(linear.bias.detach().float())
        return layer.to(linear.weight.device)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Activations quantized per token (one scale per row), so a row's result never depends on the other rows
        of its batch. Decode-sized inputs go row by row through fbgemm's dynamic int8 GEMM (for one row its
        per-tensor scale is a per-token one; measured 2-3x faster than ``torch._int_mm`` at one row), larger ones
        (prefill) through ``torch._int_mm``."""
        if x.shape[0] <= FBGEMM_MAX_ROWS and fbgemm_available():
            packed = _packed(self.qweight, self._pack)
            rows = [torch.ops.quantized.linear_dynamic(x[i : i + 1], packed, True) for i in range(x.shape[0])]
            return rows[0] if len(rows) == 1 else torch.cat(rows)
        row_scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / 127  # [rows, 1] symmetric per token
        q = torch.round(x / row_scale).clamp_(-127, 127).to(torch.int8)
        return torch._int_mm(q, self.qweight.t()).float() * (row_scale * self.scale.float())

    def one_row(self, x: torch.Tensor) -> torch.Tensor | None:
        if not fbgemm_available():
            return None
        return torch.ops.quantized.linear_dynamic(x, _packed(self.qweight, self._pack), True)

    def _pack(self) -> Any:
        zero = torch.zeros(self.out_features, dtype=torch.long)
        weight = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(weight, None)


@functools.cache
def fbgemm_available() -> bool:
    return any(engine in torch.backends.quantized.supported_engines for engine in ("x86", "fbgemm"))


class Int4Linear(QuantizedLinear):
    """4-bit codes (two per byte) + a bfloat16 scale and zero per group: weight = (code - 8) * scale + zero."""

    scheme = "int4-weight-only-grouped"
    scales: torch.Tensor
    zeros: torch.Tensor

    def __init__(self, *, in_features: int, out_features: int, bias: bool, group_size: int) -> None:
        super().__init__(in_features=in_features, out_features=out_features, bias=bias)
        check_int4_shape(in_features=in_features, out_features=out_features, group_size=group_size)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.bfloat16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.bfloat16))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, group_size: int) -> Int4Linear:
        layer = cls(in_features=linear.in_features, out_features=linear.out_features,
                    bias=linear.bias is not None, group_size=group_size)  # fmt: skip
        out_f, in_f = linear.out_features, linear.in_features
        weight = linear.weight.detach().float().cpu().view(out_f, in_f // group_size, group_size)
        low, high = weight.amin(-1), weight.amax(-1)  # [out, groups]
        scale = ((high - low) / 15).clamp(min=1e-6).to(torch.bfloat16)
        # the kernel's convention: weight = (code - 8) * scale + zero
        zero = (low + 8 * scale.float()).to(torch.bfloat16)
        codes = ((weight - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
        codes = codes.to(torch.uint8).view(out_f, in_f)
        layer.qweight.copy_(codes[:, 0::2] | (codes[:, 1::2] << 4))
        layer.scales.copy_(scale)
        layer.zeros.copy_(zero)
        if linear.bias is not None and layer.bias is not None:  # both or neither
            layer.bias.copy_(linear.bias.detach().float())
        return layer.to(linear.weight.device)

    def codes(self) -> torch.Tensor:  # [out, in] int32 in 0..15
        low, high = self.qweight & 0xF, self.qweight >> 4
        return torch.stack((low, high), dim=-1).view(self.out_features, self.in_features).to(torch.int32)

    def dequantize(self) -> torch.Tensor:
        groups = self.codes().view(self.out_features, -1, self.group_size).float() - 8
        weight = groups * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return weight.view(self.out_features, self.in_features)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        packed, scales_zeros = _packed(self.qweight, self._pack)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), packed, self.group_size, scales_zeros
        )
        return out.float()

    def one_row(self, x: torch.Tensor) -> torch.Tensor | None:
        packed, scales_zeros = _packed(self.qweight, self._pack)
        flat = x.reshape(1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, scales_zeros)
        return out.float().view(*x.shape[:-1], self.out_features)

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes(), 1)
        scales_zeros = torch.stack((self.scales, self.zeros), dim=-1).transpose(0, 1)  # [groups, out, 2]
        return packed, scales_zeros.contiguous().to(torch.bfloat16)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def check_int4_shape(*, in_features: int, out_features: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size or out_features % 16:
        raise QuantizationError(
            f"int4 needs in_features divisible by the group size {group_size} and out_features by 16; "
            f"a layer has {in_features} -> {out_features}"
        )
