"""Weight quantization of a VLM's language model (``VLM.from_pretrained(..., quantize=...)``).

Layer: above ``models`` (it rewrites a built model's linear layers), below ``generation`` and ``api`` (which run
quantized models). ``schemes.py`` says which scheme each option is on each device; ``linear.py`` holds vlmkit's
own CPU layers (plain-tensor state, saved as safetensors); ``cuda.py`` hands CUDA schemes to bitsandbytes / torchao.
"""

from vlmkit.quantization.apply import (
    is_quantized,
    parameter_count,
    part_bytes,
    portable,
    prepare_quantized,
    quantize_model,
    target_linears,
)
from vlmkit.quantization.errors import QuantizationError
from vlmkit.quantization.linear import Int4Linear, Int8DynamicLinear, QuantizedLinear
from vlmkit.quantization.schemes import METHODS, SCHEMES, Scheme, check_method, resolve_scheme

__all__ = [
    "METHODS",
    "SCHEMES",
    "Int4Linear",
    "Int8DynamicLinear",
    "QuantizationError",
    "QuantizedLinear",
    "Scheme",
    "check_method",
    "is_quantized",
    "parameter_count",
    "part_bytes",
    "portable",
    "prepare_quantized",
    "quantize_model",
    "resolve_scheme",
    "target_linears",
]
