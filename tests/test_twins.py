"""Twins of a float32 model for CPU inference: oneDNN matmuls, the same maths on the same weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tiny import NumberTokenizer, sharp_llama
from vlmkit.generation import DecodeOptions, GenerationConfig, generate, runner
from vlmkit.generation.cpu_llama import twins
from vlmkit.generation.cpu_llama.lean_step import lean_hidden
from vlmkit.generation.cpu_llama.twins import OneDnnLinear, TwinCache, onednn_available, onednn_twin
from vlmkit.generation.kv_cache import cache_kwarg, new_cache

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
CACHE = TwinCache()  # what a VLM's DecodeResources hold


@pytest.fixture
def lm() -> Any:
    return sharp_llama(vocab_size=300)


def _greedy(lm: Any, *, seed: int, options: DecodeOptions | None = None) -> list[int]:
    embeds = torch.randn(1, 11, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        result = generate(lm, inputs_embeds=embeds, attention_mask=torch.ones(1, 11, dtype=torch.long),
                          tokenizer=NumberTokenizer(), config=GenerationConfig(max_new_tokens=20), eos_token_ids=[],
                          options=options)  # fmt: skip
    return result.token_ids[0]


@pytest.fixture
def any_size(monkeypatch) -> None:
    """Twin models of any size (the tests' model is far below ``ONEDNN_MIN_BYTES``)."""
    monkeypatch.setattr(twins, "ONEDNN_MIN_BYTES", 0)


@needs_onednn
def test_onednn_twin_shares_weights_and_leaves_the_model_alone(lm, any_size) -> None:
    twin = onednn_twin(lm, twins=CACHE)
    assert twin is not None and onednn_twin(lm, twins=CACHE) is twin  # cached
    assert type(twin.model.layers[0].mlp.up_proj) is OneDnnLinear and type(twin.lm_head) is OneDnnLinear
    assert twin.model.layers[0].mlp.up_proj.weight is lm.model.layers[0].mlp.up_proj.weight
    assert type(lm.model.layers[0].mlp.up_proj) is torch.nn.Linear
    with torch.no_grad():
        lm.model.layers[1].self_attn.q_proj.weight.mul_(0.5)  # an in-place update: a fresh twin
    assert onednn_twin(lm, twins=CACHE) is not twin


@needs_onednn
@torch.no_grad()
def test_onednn_decode_step_is_the_models_maths(lm, any_size) -> None:
    twin = onednn_twin(lm, twins=CACHE)
    embeds = torch.randn(1, 9, 64)
    caches = new_cache(lm), new_cache(lm)
    for cache in caches:
        lm(inputs_embeds=embeds, use_cache=True, **{cache_kwarg(lm): cache})
    length = 9
    for ids in (torch.tensor([[7]]), torch.tensor([[7, 31, 5]])):  # a decode step, a verification pass
        positions = torch.arange(length, length + ids.shape[1])[None]
        length += ids.shape[1]
        ours = lean_hidden(twin, input_ids=ids, position_ids=positions, cache=caches[0])
        theirs = lean_hidden(lm, input_ids=ids, position_ids=positions, cache=caches[1])
        torch.testing.assert_close(twin.lm_head(ours), lm.lm_head(theirs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0].layers[1].keys, caches[1].layers[1].keys, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@needs_onednn
def test_greedy_answers_are_the_same_with_and_without_onednn(lm, any_size) -> None:
    fast = [_greedy(lm, seed=seed) for seed in range(4)]
    assert onednn_twin(lm, twins=CACHE) is not None
    for backend in ("lean-linear", "lean-onednn"):
        assert [_greedy(lm, seed=seed, options=DecodeOptions(backend=backend)) for seed in range(4)] == fast
    assert len({tuple(answer) for answer in fast}) == 4  # four different answers, not one repeated token


def test_small_models_keep_f_linear(lm) -> None:
    # 0.3 MB of matrices: framework overhead, not bandwidth, bounds its step
    assert onednn_twin(lm, twins=CACHE) is None
    assert _greedy(lm, seed=0)


@needs_onednn
def test_gemm_twin_only_for_many_rows_without_gradients_in_float32(lm) -> None:
    with torch.no_grad():
        few = twins.ONEDNN_GEMM_MIN_ROWS - 1
        assert twins.onednn_gemm_twin(lm, rows=few, twins=CACHE) is None  # a GEMV-like pass
        twin = twins.onednn_gemm_twin(lm, rows=twins.ONEDNN_GEMM_MIN_ROWS, twins=CACHE)
        assert twin is not None and type(twin.model.layers[0].self_attn.q_proj) is OneDnnLinear
        assert twin.model.layers[0].self_attn.q_proj.weight is lm.model.layers[0].self_attn.q_proj.weight
        lm.train()
        # training: dropout and friends stay the model's
        assert twins.onednn_gemm_twin(lm, rows=64, twins=CACHE) is None
        lm.eval()
    # gradients wanted: oneDNN's kernel has no backward
    assert twins.onednn_gemm_twin(lm, rows=64, twins=CACHE) is None
    with torch.no_grad():
        assert twins.onednn_gemm_twin(lm.to(torch.bfloat16), rows=64, twins=CACHE) is None


@needs_onednn
@torch.no_grad()
def test_gemm_twin_prefill_is_the_models_maths(lm) -> None:
    embeds = torch.randn(2, 40, 64)
    twin = twins.onednn_gemm_twin(lm, rows=80, twins=CACHE)
    caches = new_cache(lm), new_cache(lm)
    ours = twin(inputs_embeds=embeds, use_cache=True, **{cache_kwarg(lm): caches[0]}).logits
    theirs = lm(inputs_embeds=embeds, use_cache=True, **{cache_kwarg(lm): caches[1]}).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(caches[0].layers[1].values, caches[1].layers[1].values, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_greedy_answers_are_the_same_with_and_without_the_gemm_prefill(lm, monkeypatch) -> None:
    def long_prompt(seed: int) -> list[int]:
        embeds = torch.randn(1, 48, 64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return generate(lm, inputs_embeds=embeds, attention_mask=torch.ones(1, 48, dtype=torch.long),
                            tokenizer=NumberTokenizer(), config=GenerationConfig(max_new_tokens=12), eos_token_ids=[],
                            ).token_ids[0]  # fmt: skip

    calls = []
    real = runner.onednn_gemm_twin
    monkeypatch.setattr(
        runner,
        "onednn_gemm_twin",
        lambda m, rows, twins: calls.append(rows) or real(m, rows=rows, twins=twins),
    )
    fast = [long_prompt(seed) for seed in range(4)]
    assert calls == [48] * 4
    monkeypatch.setattr(runner, "onednn_gemm_twin", lambda m, rows, twins: None)
    assert [long_prompt(seed) for seed in range(4)] == fast


@needs_onednn
@torch.no_grad()
def test_gemm_twin_encodes_images_as_the_model_does(tiny_vlm) -> None:
    pixels = torch.randn(4, 3, 32, 32)
    twin = twins.onednn_gemm_twin(tiny_vlm.model, rows=4 * tiny_vlm.model.vision.num_tokens, twins=CACHE)
    assert twin is not None and twin.vision.model is not tiny_vlm.model.vision.model
    torch.testing.assert_close(
        twin.encode_images(pixels), tiny_vlm.model.encode_images(pixels), rtol=1e-5, atol=1e-5
    )


def test_quantized_tensor_subclass_weights_keep_their_own_path() -> None:
    """torchao keeps ``nn.Linear`` modules with a tensor-subclass weight: oneDNN must not be handed that weight."""
    from vlmkit.generation.cpu_llama.twins import _swap_linears

    class QuantizedWeight(torch.Tensor):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = torch.nn.Parameter(model[1].weight.detach().as_subclass(QuantizedWeight))
    swapped = _swap_linears(model, lambda linear: torch.nn.Identity())
    assert isinstance(swapped[0], torch.nn.Identity) and type(swapped[1]) is torch.nn.Linear
