"""Twins of a float32 model for CPU inference: the same module tree with other kernels behind its Linear layers.

A twin is a deep copy of the model's modules over the model's own tensors (nothing is copied), whose Linear layers
are then swapped: the model itself is never touched, and the lean decode step (``lean_step.py``) runs a twin like
the model. Twins (and the float16 screen and draft, which are built the same way) live in a ``TwinCache`` that
the model's owner holds (``generation.backend.DecodeResources``: one per ``VLM``), per model until a weight
changes in place (an optimiser step, ``load_state_dict``).

- ``onednn_twin``: the same float32 weights, multiplied by oneDNN (``torch.ops.mkldnn._linear_pointwise``, the
  kernel inductor's CPU lowering calls). A batch-1 decode step of a model too big for the CPU caches only streams
  weights, and oneDNN streams them at about 26 GB/s on one core where ``F.linear`` reaches 16 (80M-parameter
  spec: 6.1 against 9.9 ms for all matrices; five tokens at once, as speculative verification runs them, 11.2
  against 17.2 ms). Same float32 maths, summed in another order (last-bit differences); no extra memory. Small models (all matrices below ``ONEDNN_MIN_BYTES``)
  keep ``F.linear``, whose per-call overhead is lower: their step is overhead, not bandwidth.
- ``onednn_gemm_twin``: the same twin for passes of many rows (prefill, image encode), where the work is
  compute, not bandwidth. On the AMD Zen CPUs we measured, ``F.linear`` goes to MKL's sgemm, which runs its AVX2
  code there, while oneDNN runs AVX-512: 230-250 against 105-110 GFLOP/s on one core for the small spec's
  prefill and tower shapes (measured on AMD only; where MKL runs AVX-512, as on Intel, the gap should be smaller).
"""

from __future__ import annotations

import copy
import functools
import itertools
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from vlmkit.models.language.protocols import LanguageModel

ModuleT = TypeVar("ModuleT", bound=nn.Module | LanguageModel)  # a twin has the class of its original

# float32 matrices below this fit in the CPU caches: F.linear's lower per-call overhead wins there
ONEDNN_MIN_BYTES = 32 << 20

# fewer rows per matrix product than this and F.linear can win (one core, cache-resident weights: oneDNN is ahead
# from 4 rows on a 512 x 1376 matrix, from about 27 on 128 x 512, from 64 on 128 x 128)
ONEDNN_GEMM_MIN_ROWS = 32

# the largest finite float16: a float16 copy (greedy_head.py, draft.py) needs every weight below it
FLOAT16_MAX = 65504.0


class TwinCache:
    """What was built from a model's weights (twins, screens, drafts), per kind and model, until a weight changes.

    Weak on the model, so a dropped model frees what was built from it; owned by whoever owns the model (a
    ``VLM`` through its ``DecodeResources``), never module state.
    """

    def __init__(self) -> None:
        # kind -> model -> (weights signature, what build() returned)
        self._kinds: dict[str, weakref.WeakKeyDictionary[Any, tuple[tuple[tuple[int, int], ...], Any]]] = {}
        self._lock = threading.Lock()

    @torch.no_grad()
    def get(self, kind: str, model: Any, *, build: Callable[[], Any]) -> Any:
        """``build()``'s result, cached per ``kind`` and ``model`` until one of its weights changes (in place or
        replaced). What ``build`` returns must not hold the model module itself (the cache is weak on it)."""
        # _version is bumped by every in-place update; data_ptr catches a replaced tensor
        signature = tuple((p.data_ptr(), p._version) for p in model.parameters())
        with self._lock:
            cache = self._kinds.setdefault(kind, weakref.WeakKeyDictionary())
            hit = cache.get(model)
        if hit is not None and hit[0] == signature:
            return hit[1]
        built = build()
        with self._lock:
            cache[model] = (signature, built)
        return built

    def clear(self) -> None:
        with self._lock:
            self._kinds.clear()


class OneDnnLinear(nn.Module):
    """``nn.Linear`` computed by oneDNN on the same weight tensor (inference only: the kernel has no backward).

    x [..., in] -> [..., out]
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # the model's own parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


@functools.cache
def onednn_available() -> bool:
    """oneDNN is built in and its linear kernel runs here (one tiny call, once per process)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8), torch.ones(4, 8), None, "none", [], "")
    except (RuntimeError, NotImplementedError):  # a build whose oneDNN lacks this kernel on this CPU
        return False
    return bool((out == 8).all())


def fbgemm_available() -> bool:
    """fbgemm's CPU kernels (its float16 GEMM serves ``greedy_head.py`` and ``draft.py``) are built in."""
    return any(engine in torch.backends.quantized.supported_engines for engine in ("x86", "fbgemm"))


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the plain ``nn.Linear`` weights below ``model``: what a batch-1 step streams through them."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is nn.Linear)


def onednn_pays(model: nn.Module) -> bool:
    """A decode step of ``model`` streams weights too big for the CPU caches (``ONEDNN_MIN_BYTES`` and up)."""
    return linear_bytes(model) >= ONEDNN_MIN_BYTES


def onednn_twin(model: Any, *, twins: TwinCache, force: bool = False) -> Any | None:
    """``model`` with oneDNN Linear layers, or ``None`` (no oneDNN, not float32, or - unless ``force`` - matrices
    below ``ONEDNN_MIN_BYTES``)."""
    if not onednn_available() or model.dtype != torch.float32:
        return None
    if not force and not onednn_pays(model):
        return None
    return _onednn(model, twins=twins)


def onednn_gemm_twin(module: ModuleT, *, rows: int, twins: TwinCache) -> ModuleT | None:
    """``module`` with oneDNN Linear layers for a no-grad pass of ``rows`` rows per matrix product (a prefill, an
    image encode), or ``None`` where the module's own path stays: few rows, training, gradients, weights not
    float32 on the CPU, or no oneDNN."""
    if rows < ONEDNN_GEMM_MIN_ROWS or module.training or torch.is_grad_enabled() or not onednn_available():
        return None
    linears = [m for m in module.modules() if type(m) is nn.Linear]
    if (
        not linears
        or any(not _plain_weight(m) for m in linears)
        or any(m.weight.device.type != "cpu" or m.weight.dtype != torch.float32 for m in linears)
    ):
        return None
    return _onednn(module, twins=twins)


def _onednn(module: ModuleT, *, twins: TwinCache) -> ModuleT:
    """The one oneDNN twin of ``module`` (of its class), shared by decode steps and many-row passes."""
    return twins.get("onednn", module, build=lambda: _swap_linears(_twin(module), OneDnnLinear))


def _twin(model: Any) -> Any:
    """A new module tree over the same parameter and buffer tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _plain_weight(linear: nn.Linear) -> bool:
    """A weight oneDNN can read: a plain tensor, not a quantized tensor subclass (torchao keeps ``nn.Linear``)."""
    return type(linear.weight) in (nn.Parameter, torch.Tensor)


def _swap_linears(model: Any, make: Callable[[nn.Linear], nn.Module]) -> Any:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and _plain_weight(child):
                setattr(parent, name, make(child))
    return model
