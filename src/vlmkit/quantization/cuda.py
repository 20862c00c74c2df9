"""CUDA schemes, run by the libraries that own them: bitsandbytes (LLM.int8(), NF4) and torchao (int4).

Not measured in this repository's CI (no GPU there); each path refuses with a clear error where its library or a
CUDA device is missing (``schemes.resolve_scheme`` checks before any weight moves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlmkit.models.language.protocols import LanguageModel
from vlmkit.quantization.errors import QuantizationError
from vlmkit.quantization.schemes import INSTALL_QUANT, Scheme

if TYPE_CHECKING:
    from vlmkit.models.vlm import VisionLanguageModel

LLM_INT8_THRESHOLD = 6.0  # transformers' BitsAndBytesConfig default: outlier columns above it stay in 16 bits
TORCHAO_INT4_GROUP = 128


def quantize(
    model: VisionLanguageModel, *, scheme: Scheme, targets: list[tuple[str, nn.Linear]], device: Any
) -> int | None:
    """Quantize ``targets`` (layers of ``model.language_model``) by ``scheme``; the model ends on ``device``.

    -> the group size used (int4), else None.
    """
    if scheme.library == "bitsandbytes":
        _bitsandbytes(model.language_model, scheme=scheme, targets=targets)
        model.to(device)  # bitsandbytes quantizes its parameters as they move to the GPU
        return None
    model.to(device=device, dtype=torch.bfloat16)  # torchao's int4 CUDA kernel takes bfloat16 activations
    _torchao_int4(model.language_model, targets=targets)
    return TORCHAO_INT4_GROUP


def _bitsandbytes(lm: LanguageModel, *, scheme: Scheme, targets: list[tuple[str, nn.Linear]]) -> None:
    import bitsandbytes as bnb

    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        layer = _bnb_layer(bnb, linear, nf4=scheme.method == "nf4")
        setattr(lm.get_submodule(parent_name) if parent_name else lm, child, layer)


def _bnb_layer(bnb: Any, linear: nn.Linear, *, nf4: bool) -> nn.Module:
    bias = linear.bias is not None
    weight = linear.weight.data
    if nf4:
        compute = weight.dtype if weight.dtype != torch.float32 else torch.bfloat16
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute,
                                  compress_statistics=True, quant_type="nf4")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=LLM_INT8_THRESHOLD)  # fmt: skip
        layer.weight = bnb.nn.Int8Params(weight.half(), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def _torchao_int4(lm: LanguageModel, *, targets: list[tuple[str, nn.Linear]]) -> None:
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise QuantizationError(
            f"quantize='int4' on cuda: torchao could not be imported ({exc}); {INSTALL_QUANT}"
        ) from None
    names = {name for name, _ in targets}
    try:
        quantize_(
            lm, Int4WeightOnlyConfig(group_size=TORCHAO_INT4_GROUP), filter_fn=lambda _m, fqn: fqn in names
        )
    except ImportError as exc:  # e.g. the int4 kernels' own package is missing
        raise QuantizationError(
            f"quantize='int4' on cuda: torchao's int4 kernels are missing ({exc})"
        ) from None
