"""Which quantization scheme each ``quantize=`` option is on each device, and what it needs to run.

==========  ===========================================================  ==================================
option      CPU                                                          CUDA
==========  ===========================================================  ==================================
``int8``    dynamic int8: int8 weights (per-row scale), activations      bitsandbytes LLM.int8()
            quantized per token on each call, ``torch._int_mm``           (``Linear8bitLt``, threshold 6.0)
            (``Int8DynamicLinear``)
``int4``    weight-only int4, groups of 128 (or the largest of 64 / 32   torchao ``Int4WeightOnlyConfig``
            that divides the layer), bfloat16 activations, torch's        (group 128, bfloat16)
            ``_weight_int4pack_mm_for_cpu`` (``Int4Linear``)
``nf4``     refused: bitsandbytes' NF4 kernels need CUDA                  bitsandbytes NF4 with double
                                                                          quantization (``Linear4bit``)
==========  ===========================================================  ==================================

Only the language model's linear layers are quantized; its output layer (``lm_head``), embeddings, norms, the
vision tower and the projector stay in the compute dtype.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

from vlmkit.quantization.errors import QuantizationError

METHODS = ("int8", "int4", "nf4")
INSTALL_QUANT = "pip install 'vlmkit[quant]'"


@dataclass(frozen=True)
class Scheme:
    """One method on one device kind: the scheme name stored in config.json and the library that runs it."""

    method: str
    device: str  # "cpu" | "cuda"
    name: str
    library: str  # "torch" | "bitsandbytes" | "torchao"

    @property
    def portable(self) -> bool:
        """Stored as plain tensors vlmkit itself reads back (save_pretrained works)."""
        return self.library == "torch"


SCHEMES = {
    ("int8", "cpu"): Scheme("int8", "cpu", "int8-dynamic-per-token", "torch"),
    ("int4", "cpu"): Scheme("int4", "cpu", "int4-weight-only-grouped", "torch"),
    ("int8", "cuda"): Scheme("int8", "cuda", "bnb-llm-int8", "bitsandbytes"),
    ("nf4", "cuda"): Scheme("nf4", "cuda", "bnb-nf4-double-quant", "bitsandbytes"),
    ("int4", "cuda"): Scheme("int4", "cuda", "torchao-int4-weight-only", "torchao"),
}


def check_method(method: str | None) -> str | None:
    """``method`` itself, or a clear error naming the choices (checked before any weight is read)."""
    if method is None or method in METHODS:
        return method
    raise QuantizationError(f"unknown quantize={method!r}; choose one of {', '.join(METHODS)} (or none)")


def resolve_scheme(method: str, *, device: str | torch.device | None) -> Scheme:
    """The scheme ``method`` runs as on ``device`` (default CPU), after checking this machine can run it."""
    check_method(method)
    kind = torch.device(device or "cpu").type
    scheme = SCHEMES.get((method, kind))
    if scheme is None:
        raise QuantizationError(_unsupported(method, kind))
    _check_runnable(scheme)
    return scheme


def scheme_named(name: str) -> Scheme:
    for scheme in SCHEMES.values():
        if scheme.name == name:
            return scheme
    known = ", ".join(s.name for s in SCHEMES.values())
    raise QuantizationError(f"config.json names an unknown quantization scheme {name!r} (known: {known})")


def _unsupported(method: str, kind: str) -> str:
    if method == "nf4" and kind == "cpu":
        return ("quantize='nf4' needs bitsandbytes on a CUDA device (its NF4 kernels are CUDA-only); "
                "on CPU use quantize='int8' (fastest) or 'int4' (smallest)")  # fmt: skip
    return (
        f"quantize={method!r} is not available on {kind} devices (supported: "
        + ", ".join(f"{m} on {d}" for m, d in SCHEMES)
        + ")"
    )


def _check_runnable(scheme: Scheme) -> None:
    if scheme.device == "cuda" and not torch.cuda.is_available():
        raise QuantizationError(f"quantize={scheme.method!r} on cuda: no CUDA device in this torch install")
    if scheme.library != "torch":
        if importlib.util.find_spec(scheme.library) is None:
            raise QuantizationError(
                f"quantize={scheme.method!r} on {scheme.device} needs {scheme.library}, which is not installed: "
                f"{INSTALL_QUANT}"
            )
        return
    if scheme.method == "int8" and not _int_mm_runs():
        raise QuantizationError(
            f"quantize='int8' on CPU needs torch's int8 matrix product (torch._int_mm) on CPU; torch "
            f"{torch.__version__} lacks it"
        )
    if scheme.method == "int4" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise QuantizationError(
            f"quantize='int4' on CPU needs torch's int4 CPU kernel (torch >= 2.5); this is torch {torch.__version__}"
        )


@functools.cache
def _int_mm_runs() -> bool:
    """``torch._int_mm`` exists and multiplies correctly on CPU (one tiny call, once per process)."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        ones = torch.ones(1, 8, dtype=torch.int8)
        return bool((torch._int_mm(ones, ones.t()) == 8).all())
    except (RuntimeError, NotImplementedError):
        return False
