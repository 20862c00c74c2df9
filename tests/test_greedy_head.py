"""The float16-screened greedy head: the float32 layer's argmax, proven error bounds, and the decode paths using it."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tiny import NumberTokenizer, sharp_llama
from vlmkit.generation import DecodeOptions, GenerationConfig, generate
from vlmkit.generation.cpu_llama import greedy_head, twins
from vlmkit.generation.cpu_llama.greedy_head import ScreenedHead, screened_head

needs_fbgemm = pytest.mark.skipif(not twins.fbgemm_available(), reason="this torch build has no fbgemm")
CACHE = twins.TwinCache()  # what a VLM's DecodeResources hold
pytestmark = [needs_fbgemm, pytest.mark.usefixtures("one_thread")]


def _head(*, vocab: int = 4096, dim: int = 96, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(dim, vocab, bias=bias)
    nn.init.normal_(head.weight, std=0.05)
    return head.eval()


def _hiddens(*, dim: int, seed: int) -> list[torch.Tensor]:
    """Plain, tiny, huge, one-outlier and batched activations."""
    g = torch.Generator().manual_seed(seed)
    plain = torch.randn(1, dim, generator=g)
    outlier = plain.clone()
    outlier[0, 3] = 300.0
    return [plain, plain * 1e-3, plain * 1e3, outlier, torch.randn(5, dim, generator=g)]


@pytest.mark.parametrize("bias", [False, True])
@torch.no_grad()
def test_the_screen_picks_the_float32_argmax_and_its_bound_holds(bias: bool) -> None:
    head = _head(bias=bias)
    screen = ScreenedHead(head)
    for seed in range(20):
        for hidden in _hiddens(dim=96, seed=seed):
            exact = F.linear(hidden, head.weight, head.bias)  # [batch, vocab]
            error = (exact - screen.screen(hidden)).abs()
            assert bool((error <= screen.error_bound(hidden)).all())
            assert screen(hidden).tolist() == exact.argmax(-1).tolist()
    assert screen.fallbacks == 0  # the bound is tight enough to narrow the vocabulary every time


@torch.no_grad()
def test_near_ties_are_rescored_in_float32_and_go_to_the_lowest_id() -> None:
    head = _head(vocab=2048)
    hidden = torch.randn(1, 96)
    best = int(F.linear(hidden, head.weight).argmax())
    head.weight[7] = head.weight[best]  # an exact tie with a lower id
    head.weight[9] = head.weight[best] * (1 + 2e-7)  # a float16-invisible near-tie
    screen = ScreenedHead(head)
    exact = F.linear(hidden, head.weight)
    assert int(screen(hidden)) == int(exact.argmax())
    assert int(screen(hidden)) in (7, 9)


@torch.no_grad()
def test_too_many_candidates_fall_back_to_the_float32_layer(monkeypatch) -> None:
    head = _head()
    monkeypatch.setattr(greedy_head, "MAX_CANDIDATE_SHARE", 0.0)
    screen = ScreenedHead(head)
    hidden = torch.randn(3, 96)
    assert screen(hidden).tolist() == F.linear(hidden, head.weight).argmax(-1).tolist()
    assert screen.fallbacks == 1


def test_only_large_float32_cpu_heads_in_float16_range_are_screened(monkeypatch) -> None:
    small = nn.Module()
    small.lm_head = _head(vocab=64)
    assert screened_head(small, twins=CACHE) is None  # below SCREEN_MIN_BYTES
    monkeypatch.setattr(greedy_head, "SCREEN_MIN_BYTES", 0)
    model = nn.Module()
    model.lm_head = _head()
    screen = screened_head(model, twins=CACHE)
    assert screen is not None and screened_head(model, twins=CACHE) is screen  # cached
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # an in-place update: a new screen from the new weights
    assert screened_head(model, twins=CACHE) is not screen
    for change in (lambda h: h.half(), lambda h: h.weight.data.__setitem__((0, 0), 1e6)):
        other = nn.Module()
        other.lm_head = _head()
        change(other.lm_head)
        assert screened_head(other, twins=CACHE) is None  # float16 weights, or a weight float16 cannot hold
    assert screened_head(nn.Module(), twins=CACHE) is None  # no lm_head at all


@pytest.fixture
def lm(monkeypatch) -> Any:
    """A small Llama whose output layer is screened (the threshold lowered to its size)."""
    monkeypatch.setattr(greedy_head, "SCREEN_MIN_BYTES", 0)
    return sharp_llama(vocab_size=3000)


def _generate(lm: Any, *, batch: int, options: DecodeOptions | None = None, **kwargs: Any) -> list[list[int]]:
    embeds = torch.randn(batch, 9, 64, generator=torch.Generator().manual_seed(batch))
    config = GenerationConfig(max_new_tokens=24, **kwargs)
    with torch.no_grad():
        result = generate(lm, inputs_embeds=embeds, attention_mask=torch.ones(batch, 9, dtype=torch.long),
                          tokenizer=NumberTokenizer(), config=config, eos_token_ids=[], options=options)  # fmt: skip
    return result.token_ids


def _unscreened(monkeypatch) -> None:
    monkeypatch.setattr(greedy_head, "SCREEN_MIN_BYTES", 1 << 62)


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_decoding_is_the_same_with_and_without_the_screen(lm, monkeypatch, batch: int) -> None:
    calls: list[int] = []
    original = ScreenedHead.__call__
    monkeypatch.setattr(
        ScreenedHead, "__call__", lambda self, h: calls.append(h.shape[0]) or original(self, h)
    )
    screened = _generate(lm, batch=batch)
    assert calls == [batch] * 23  # every decode step after the prefill's token went through the screen
    _unscreened(monkeypatch)
    assert _generate(lm, batch=batch) == screened
    expected = lm.generate(inputs_embeds=torch.randn(batch, 9, 64, generator=torch.Generator().manual_seed(batch)),
                           attention_mask=torch.ones(batch, 9, dtype=torch.long), max_new_tokens=24,
                           do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert screened == expected.tolist()  # transformers' own greedy answer


def test_speculative_verification_uses_the_screen_and_agrees(lm, monkeypatch) -> None:
    calls: list[int] = []
    original = ScreenedHead.__call__
    monkeypatch.setattr(
        ScreenedHead, "__call__", lambda self, h: calls.append(h.shape[0]) or original(self, h)
    )
    speculative = _generate(lm, batch=1, options=DecodeOptions(speculative=4))
    assert calls and max(calls) > 1  # verification rows
    _unscreened(monkeypatch)
    assert speculative == _generate(lm, batch=1)


def test_sampling_and_penalties_never_use_the_screen(lm, monkeypatch) -> None:
    def boom(self: Any, hidden: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the screen only serves plain greedy decoding")

    monkeypatch.setattr(ScreenedHead, "__call__", boom)
    _generate(lm, batch=2, temperature=0.8, seed=1)
    _generate(lm, batch=2, repetition_penalty=1.3)


def test_cached_screens_and_drafts_do_not_keep_a_model_alive(monkeypatch) -> None:
    from vlmkit.generation.cpu_llama.draft import float16_draft

    monkeypatch.setattr(greedy_head, "SCREEN_MIN_BYTES", 0)
    lm = sharp_llama(vocab_size=3000)
    assert screened_head(lm, twins=CACHE) is not None and float16_draft(lm, twins=CACHE) is not None
    model, head = weakref.ref(lm), weakref.ref(lm.lm_head)
    del lm
    gc.collect()
    assert model() is None and head() is None
