"""QLoRA: LoRA adapters (trained, in the compute dtype) over a quantized, frozen base language model.

- vlmkit's CPU layers (``quantize="int8"`` / ``"int4"``, quantization/linear.py): peft wraps them through its
  custom-module mapping (``QuantLoraLinear``). The base layer runs its quantized kernel forward; backward
  multiplies by the dequantized weight, so gradients reach the adapters below; its codes and scales are
  buffers, which no optimizer sees.
- bitsandbytes layers (CUDA ``nf4`` / ``int8``): peft's own bitsandbytes LoRA layers, targets chosen by
  ``all-linear`` as for an unquantized model (not run in CI: no GPU there).

The usual ``prepare_model_for_kbit_training`` steps are the trainer's own: the base is frozen (peft), the
non-quantized parameters (norms, embeddings) are in the training dtype (float32 unless ``--precision bf16``), and
activation checkpointing (``--grad-ckpt``) is non-reentrant, so no input needs ``requires_grad``.

Merging (``lora.merge_lora``) first replaces every quantized base layer by its dequantized ``nn.Linear`` in the
compute dtype: the merged model is an ordinary unquantized model whose weights are the dequantized base plus the
adapters' product (it differs from the original float base by the quantization error, as any merged QLoRA does).
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
from torch import nn

from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.quantization import (
    Int4Linear,
    Int8DynamicLinear,
    QuantizationError,
    QuantizedLinear,
    quantize_model,
)


def quantize_base(model: VisionLanguageModel, *, method: str, device: Any) -> None:
    """Quantize ``model``'s LM for QLoRA (on ``device``) unless it already is, by the same method."""
    stored = model.config.quantization
    if stored is None:
        model.config.quantization = quantize_model(model, method=method, device=device)
    elif stored.method != method:
        raise QuantizationError(f"the model is already quantized as {stored.method}, not {method}")


@functools.cache
def quant_lora_class() -> type:
    """peft's LoRA ``Linear`` over a vlmkit quantized layer (built on first use: peft is the train extra)."""
    from peft.tuners.lora.layer import Linear

    class QuantLoraLinear(Linear):
        """The base layer runs its own quantized kernel; the adapters add ``B(A(dropout(x))) * scale``."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            layer = cast(QuantizedLinear, module)  # the layers this class is registered for
            return layer.in_features, layer.out_features

    return QuantLoraLinear


def language_lora_config(lm: nn.Module, config: Any) -> Any:
    """``config`` (a peft ``LoraConfig``) made to target ``lm``'s vlmkit quantized layers, if it has any: peft's
    ``all-linear`` sees only ``nn.Linear``, so they are named, and mapped to ``QuantLoraLinear``."""
    names = {name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, QuantizedLinear)}
    if not names:
        return config
    config.target_modules = names
    config._register_custom_module({Int8DynamicLinear: quant_lora_class(), Int4Linear: quant_lora_class()})
    return config


@torch.no_grad()
def dequantize_bases(module: nn.Module, *, dtype: torch.dtype) -> int:
    """Replace the quantized base layer of every LoRA layer below ``module`` by a plain ``nn.Linear`` holding
    the dequantized weights in ``dtype`` (so peft can merge into it); -> how many were replaced."""
    replaced = 0
    for layer in list(module.modules()):
        base = getattr(layer, "base_layer", None)
        if base is None or not _quantized(base):
            continue
        layer.base_layer = _plain(base, dtype=dtype)
        replaced += 1
    return replaced


def _quantized(layer: nn.Module) -> bool:
    return isinstance(layer, QuantizedLinear) or type(layer).__module__.startswith("bitsandbytes")


def _plain(layer: nn.Module, *, dtype: torch.dtype) -> nn.Linear:
    if isinstance(layer, QuantizedLinear):
        return layer.to_linear(dtype=dtype)
    weight = _bnb_weight(layer)  # [out, in] float
    bias = cast("torch.Tensor | None", layer.bias)  # a bitsandbytes Linear's bias
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=dtype)  # fmt: skip
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


def _bnb_weight(layer: nn.Module) -> torch.Tensor:
    """A bitsandbytes layer's weights dequantized: NF4 through bitsandbytes, LLM.int8() rows as code x absmax/127."""
    import bitsandbytes as bnb

    weight: Any = layer.weight  # bitsandbytes' Params4bit or Int8Params (SCB: the row scales)
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.float() * weight.SCB.float()[:, None] / 127
