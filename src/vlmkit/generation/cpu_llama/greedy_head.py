"""Exact greedy tokens from a large output layer at half its memory traffic: a float16 screen, then float32.

At batch 1 a CPU decode step streams every weight once, and a Llama's output layer is a large share of them: the
80M-parameter CPU benchmark spec's ``lm_head`` (32064 x 512) is 65 MB of the 159 MB a step reads, and takes 2.3 of
its 9.7 ms. Greedy decoding only needs the argmax, so ``ScreenedHead`` scores every token with a float16 copy of
the layer's weights (fbgemm's float16 GEMM: float32 activations and sums, half the bytes), bounds each score's
error, and recomputes in float32 only the tokens whose upper bound reaches the best lower bound - usually one or
two. The token picked is the float32 layer's argmax (ties to the lowest id, as ``torch.argmax``): the screen only
discards tokens it has proven cannot win.

The bound, per row ``x`` and token ``j`` (``w`` the float32 weights, ``h`` their float16 rounding):
``|x.w - x.h| <= ||x||_2 ||w - h||_2`` (Cauchy-Schwarz; ``||w - h||_2`` is measured once per token when the screen
is built), plus the float32 summation error of both products, ``<= 2 K 2^-24 ||x||_2 ||w||_2`` each for ``K``
inputs (counted twice over for margin). A weight too large for float16 makes the layer unscreenable; when the
screen cannot narrow the vocabulary enough the step falls back to the float32 layer, so the answer never depends
on the screen.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.generation.cpu_llama.twins import FLOAT16_MAX, TwinCache, fbgemm_available

# an output layer smaller than this stays in the CPU caches across steps: nothing to save by screening it
SCREEN_MIN_BYTES = 8 << 20

# above this share of the vocabulary left after the screen, rescoring costs more than the float32 layer
MAX_CANDIDATE_SHARE = 1 / 16


class ScreenedHead:
    """Greedy argmax of ``head(x)`` for float32 ``x`` on CPU, float16 screen first (see the module docstring).

    hidden [batch, dim] -> tokens [batch] int64
    """

    def __init__(self, head: nn.Linear) -> None:
        # the tensors, not the module: the screen is cached weakly on the module (twins.TwinCache)
        self.weight, self.bias = head.weight.detach(), head.bias.detach() if head.bias is not None else None
        self.screen = _float16_linear(head)
        weight = self.weight
        rounding = (weight - weight.half().float()).norm(dim=-1)  # [vocab] ||w - h||_2
        summing = 4 * head.in_features * 2.0**-24 * weight.norm(dim=-1)  # [vocab] both products' float32 sums
        self.row_error = rounding + summing  # [vocab] error per unit of ||x||_2
        self.max_candidates = max(1, math.floor(head.out_features * MAX_CANDIDATE_SHARE))
        self.fallbacks = 0  # steps the screen could not narrow enough (read by tests and benchmarks)

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = self.screen(hidden)  # [batch, vocab] float16-weight logits
        bound = self.error_bound(hidden)  # [batch, vocab]
        best_floor = (scores - bound).amax(dim=-1, keepdim=True)  # [batch, 1] the winner scores at least this
        # one candidate list for the whole batch: rescoring a row on extra tokens cannot change its argmax
        candidates = ((scores + bound) >= best_floor).any(dim=0).nonzero().squeeze(-1)  # [n] ascending ids
        if candidates.numel() > self.max_candidates:
            self.fallbacks += 1
            return F.linear(hidden, self.weight, self.bias).argmax(dim=-1)
        bias = self.bias[candidates] if self.bias is not None else None
        exact = F.linear(hidden, self.weight[candidates], bias)  # [batch, n] float32 logits
        return candidates[exact.argmax(dim=-1)]  # ascending ids: ties go to the lowest, as torch.argmax

    def error_bound(self, hidden: torch.Tensor) -> torch.Tensor:
        """An upper bound on ``|head(hidden) - screen(hidden)|``.  # [batch, dim] -> [batch, vocab]"""
        # the norm is rounded up by 1e-6 relative; a bias adds one float32 rounding of the score on each side
        bound = hidden.norm(dim=-1, keepdim=True) * (1 + 1e-6) * self.row_error  # [batch, vocab]
        if self.bias is not None:
            bound = bound + 2.0**-22 * (self.bias.abs() + bound)
        return bound


def screen_refusal(model: Any, *, force: bool = False) -> str | None:
    """Why ``model``'s output layer gets no float16 screen (``None``: it does, unless a weight is beyond float16's
    range, which only building it finds out): no fbgemm engine, not a plain float32 ``nn.Linear`` on CPU, or -
    unless ``force`` - smaller than ``SCREEN_MIN_BYTES`` (it then stays in the CPU caches: nothing to save)."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or head.weight.dtype != torch.float32 or head.weight.device.type != "cpu":
        return "the output layer is not a float32 nn.Linear on CPU"
    if not fbgemm_available():
        return "no fbgemm in this torch build"
    size = head.weight.numel() * head.weight.element_size()
    if not force and size < SCREEN_MIN_BYTES:
        return f"output layer {size / 2**20:.1f} MiB < {SCREEN_MIN_BYTES >> 20} MiB stays in the CPU caches"
    return None


def screened_head(model: Any, *, twins: TwinCache, force: bool = False) -> ScreenedHead | None:
    """The float16-screened greedy head of a causal LM's ``lm_head``, or ``None`` where it would not pay or cannot
    run (``screen_refusal``, or weights beyond float16's range)."""
    if screen_refusal(model, force=force) is not None:
        return None
    head = model.lm_head
    return twins.get("screened_head", head, build=lambda: _build(head))  # None is cached too


def _build(head: nn.Linear) -> ScreenedHead | None:
    if not bool(head.weight.detach().abs().max() < FLOAT16_MAX):  # also catches inf / nan
        return None
    try:
        return ScreenedHead(head)
    except (RuntimeError, NotImplementedError):  # a build whose fbgemm lacks the float16 kernels
        return None


def _float16_linear(head: nn.Linear) -> nn.Module:
    """``head`` with float16 weights on fbgemm's float16 GEMM (float32 in, out and sums); ``head`` is untouched."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks eager quantisation for a future move to torchao
        from torch.ao.quantization import float16_dynamic_qconfig, quantize_dynamic

    shell = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    shell.weight, shell.bias = head.weight, head.bias  # the same tensors: quantisation reads, never writes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks eager quantisation for a future move to torchao
        wrapper = quantize_dynamic(
            nn.Sequential(shell), {nn.Linear: float16_dynamic_qconfig}, dtype=torch.float16, inplace=True
        )
    return wrapper[0]
