"""Quantize a built model's language model in place, rebuild the empty quantized layout of a saved one, undo it.

Only ``nn.Linear`` layers inside the language model are touched, minus its output layer (``lm_head``: greedy
decoding's argmax reads it, and on CPU its float16-screened head keeps it exact; bitsandbytes' transformers
integration keeps it too). Everything else keeps the compute dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlmkit.config import QuantizationConfig
from vlmkit.models.language.protocols import LanguageModel
from vlmkit.quantization.errors import QuantizationError
from vlmkit.quantization.linear import INT4_GROUP_SIZES, Int4Linear, Int8DynamicLinear, QuantizedLinear
from vlmkit.quantization.schemes import Scheme, resolve_scheme, scheme_named

if TYPE_CHECKING:
    from vlmkit.models.vlm import VisionLanguageModel

INT4_GROUP_SIZE = 128  # torchao's default; smaller layers take the largest of 64 / 32 that divides them


def target_linears(lm: LanguageModel) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """(name, layer) of every ``nn.Linear`` to quantize, and the names of those kept (the output layer)."""
    output = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    targets: list[tuple[str, nn.Linear]] = []
    kept: list[tuple[str, nn.Linear]] = []
    for name, module in lm.named_modules():
        if type(module) is nn.Linear:
            (kept if module is output else targets).append((name, module))
    return targets, [name for name, _ in kept]


def int4_group_size(linears: list[tuple[str, nn.Linear]]) -> int:
    """The largest supported group size (at most ``INT4_GROUP_SIZE``) dividing every layer's input width."""
    for size in sorted((g for g in INT4_GROUP_SIZES if g <= INT4_GROUP_SIZE), reverse=True):
        if all(linear.in_features % size == 0 for _, linear in linears):
            return size
    widths = sorted({linear.in_features for _, linear in linears})
    raise QuantizationError(
        f"int4 needs every LM layer's input width divisible by 32; this model has {widths}"
    )


def quantize_model(
    model: VisionLanguageModel, *, method: str, device: str | torch.device | None
) -> QuantizationConfig:
    """Quantize ``model.language_model`` for ``device`` (moving the whole model there); -> the config to store."""
    scheme = resolve_scheme(method, device=device)
    lm = model.language_model
    targets, kept = target_linears(lm)
    if not targets:
        raise QuantizationError("the language model has no nn.Linear layers to quantize")
    if scheme.library == "torch":
        group = int4_group_size(targets) if method == "int4" else None
        _swap(lm, targets, lambda linear: _cpu_layer(linear, scheme=scheme, group_size=group))
        model.to(torch.device(device or "cpu"))
        return QuantizationConfig(method=method, scheme=scheme.name, group_size=group, skip=tuple(kept))
    from vlmkit.quantization import cuda

    group = cuda.quantize(model, scheme=scheme, targets=targets, device=device)
    return QuantizationConfig(method=method, scheme=scheme.name, group_size=group, skip=tuple(kept))


def _cpu_layer(linear: nn.Linear, *, scheme: Scheme, group_size: int | None) -> QuantizedLinear:
    if scheme.method == "int8":
        return Int8DynamicLinear.from_linear(linear)
    return Int4Linear.from_linear(linear, group_size=group_size or INT4_GROUP_SIZE)


def _swap(lm: LanguageModel, targets: list[tuple[str, nn.Linear]], make: Any) -> None:
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(lm.get_submodule(parent_name) if parent_name else lm, child, make(linear))


def prepare_quantized(lm: LanguageModel, *, config: QuantizationConfig) -> None:
    """Swap ``lm``'s layers for empty quantized ones of ``config``'s scheme, ready for ``load_state_dict``."""
    scheme = scheme_named(config.scheme)
    if not scheme.portable:
        raise QuantizationError(f"scheme {config.scheme!r} is not stored in vlmkit's portable format")
    resolve_scheme(scheme.method, device="cpu")  # this machine can run it
    targets, kept = target_linears(lm)
    if sorted(kept) != sorted(config.skip):
        raise QuantizationError(
            f"config.json keeps {list(config.skip)} unquantized, the model's layout {kept}"
        )

    def empty(linear: nn.Linear) -> QuantizedLinear:
        shape: dict[str, Any] = {"in_features": linear.in_features, "out_features": linear.out_features,
                 "bias": linear.bias is not None}  # fmt: skip
        if scheme.method == "int8":
            return Int8DynamicLinear(**shape)
        return Int4Linear(**shape, group_size=config.group_size or INT4_GROUP_SIZE)

    _swap(lm, targets, empty)


def is_quantized(module: nn.Module | LanguageModel) -> bool:
    """Whether any layer below ``module`` is quantized (ours, bitsandbytes' or torchao's)."""
    return any(_quantized_layer(m) for m in module.modules())


def _quantized_layer(module: nn.Module) -> bool:
    if isinstance(module, QuantizedLinear):
        return True
    kind = type(module).__module__
    if kind.startswith("bitsandbytes"):
        return True
    weight = getattr(module, "weight", None)
    return weight is not None and type(weight).__module__.startswith("torchao")


def portable(module: nn.Module) -> bool:
    """Whether every quantized layer below ``module`` is one vlmkit saves as plain tensors."""
    return all(isinstance(m, QuantizedLinear) or not _quantized_layer(m) for m in module.modules())


def parameter_count(module: nn.Module) -> int:
    """Parameters of a part, a quantized layer counting the weights it stands for (its codes are buffers)."""
    quantized = [m for m in module.modules() if isinstance(m, QuantizedLinear)]
    stood_for = sum(
        m.in_features * m.out_features + (m.out_features if m.bias is not None else 0) for m in quantized
    )
    return sum(p.numel() for p in module.parameters()) + stood_for


def part_bytes(module: nn.Module) -> int:
    """Bytes of a part's parameters and buffers (quantized codes and scales included; shared tensors once)."""
    seen: dict[int, int] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        seen[tensor.data_ptr()] = _nbytes(tensor)
    return sum(seen.values())


def _nbytes(tensor: torch.Tensor) -> int:
    packed = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: the parameter holds packed bytes
    size = tensor.numel() * tensor.element_size()
    if packed is not None and getattr(packed, "absmax", None) is not None:
        size += packed.absmax.numel() * packed.absmax.element_size()
    return size
