"""Every decode backend gives the same greedy tokens on one model, and ``select_backend`` picks (and explains) the
one the model, the batch and the options call for."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tiny import NumberTokenizer, sharp_llama
from vlmkit.generation import (
    BACKENDS,
    DecodeBackend,
    DecodeOptions,
    DecodeResources,
    GenerationConfig,
    generate,
    stream,
)
from vlmkit.generation.backend import decide, select_backend
from vlmkit.generation.cpu_llama import greedy_head, twins

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN = 64
NEEDS = {
    "lean-onednn": (twins.onednn_available, "this torch build has no oneDNN"),
    "screened-head": (twins.fbgemm_available, "the float16 screen needs fbgemm"),
    "speculative": (twins.fbgemm_available, "the float16 draft needs fbgemm"),
}


@pytest.fixture(scope="module")
def lm() -> Any:
    return sharp_llama(vocab_size=600)


def _embeds(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _generate(lm: Any, embeds: torch.Tensor, *, backend: str | None, **kwargs: Any) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=12, **kwargs)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    with torch.no_grad():
        result = generate(lm, inputs_embeds=embeds, attention_mask=mask, tokenizer=NumberTokenizer(), config=config,
                          eos_token_ids=[], options=DecodeOptions(backend=backend))  # fmt: skip
    return result.token_ids


def _skip_unavailable(backend: str) -> None:
    available, why = NEEDS.get(backend, (lambda: True, ""))
    if not available():
        pytest.skip(why)


@pytest.mark.parametrize(
    "backend",
    [pytest.param(b, marks=pytest.mark.slow) if b == "compiled" else b for b in BACKENDS if b != "dynamic"],
)
def test_every_backend_gives_the_dynamic_backends_greedy_tokens(lm, backend: str, caplog) -> None:
    """Forced in turn on one sharp Llama (two prompts at batch 1, and a batch of 2 where the backend takes one);
    ``beam`` runs beam search with one beam, which is greedy search when nothing ends early."""
    _skip_unavailable(backend)
    prompts = [_embeds(1, 9, seed=1), _embeds(1, 5, seed=2)]
    if backend != "speculative":  # speculation serves batch-1 requests only
        prompts.append(_embeds(2, 7, seed=3))
    answers = set()
    with caplog.at_level(logging.DEBUG, logger="vlmkit.generation"):
        for embeds in prompts:
            caplog.clear()
            expected = _generate(lm, embeds, backend="dynamic")
            assert _generate(lm, embeds, backend=backend) == expected
            used = [r.args[0] for r in caplog.records if r.msg.startswith("decode backend")]
            assert used == ["dynamic", backend]  # the backend really ran (and the choice was logged)
            answers |= {tuple(row) for row in expected}
    assert len(answers) == len(prompts) + (backend != "speculative")  # all different, not one repeated token


def test_a_forced_backend_the_request_cannot_use_is_an_error(lm) -> None:
    with pytest.raises(ValueError, match="backend must be None"):
        DecodeOptions(backend="fastest")
    padded = torch.tensor([[0, 1, 1]])
    for backend in ("lean-linear", "screened-head", "speculative"):
        with pytest.raises(ValueError, match="padded batch"):
            decide(
                lm, attention_mask=padded, config=GenerationConfig(), options=DecodeOptions(backend=backend)
            )
    sampling = GenerationConfig(temperature=0.7)
    with pytest.raises(ValueError, match="plain greedy"):
        decide(
            lm,
            attention_mask=torch.ones(1, 3),
            config=sampling,
            options=DecodeOptions(backend="screened-head"),
        )
    with pytest.raises(ValueError, match="num_beams=1"):
        stream(lm, inputs_embeds=_embeds(1, 4, seed=0), attention_mask=torch.ones(1, 4, dtype=torch.long),
               tokenizer=NumberTokenizer(), config=GenerationConfig(), options=DecodeOptions(backend="beam"))  # fmt: skip


def _choice(lm: Any, *, mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[str, str]:
    options = {k: kwargs.pop(k) for k in ("static_cache", "compile", "speculative", "backend") if k in kwargs}
    mask = mask if mask is not None else torch.ones(1, 5, dtype=torch.long)
    decision = decide(
        lm, attention_mask=mask, config=GenerationConfig(**kwargs), options=DecodeOptions(**options)
    )
    return decision.name, decision.reason


def test_selection_follows_model_batch_and_options(lm, monkeypatch) -> None:
    name, reason = _choice(lm)
    assert name == "lean-linear" and "float32 Llama on CPU" in reason and "< cache budget 32 MiB" in reason
    assert _choice(lm, num_beams=2)[0] == "beam"
    assert _choice(lm, static_cache=True)[0] == "static"
    assert _choice(lm, compile=True)[0] == "compiled"
    name, reason = _choice(lm, mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert name == "dynamic" and "padded batch" in reason  # padding forces the model's own forward
    assert _choice(lm, temperature=0.8)[1].endswith("sampling")
    assert _choice(lm, repetition_penalty=1.2)[1].endswith("repetition penalty")
    if twins.fbgemm_available():  # an output layer worth screening (threshold lowered to this one's size)
        monkeypatch.setattr(greedy_head, "SCREEN_MIN_BYTES", 0)
        name, reason = _choice(lm)
        assert name == "screened-head" and reason.startswith("plain greedy, output layer 0.2 MB")
        assert _choice(lm, temperature=0.8)[0] == "lean-linear"  # sampling needs every logit
    if twins.onednn_available():  # matrices beyond the CPU caches (threshold lowered)
        monkeypatch.setattr(twins, "ONEDNN_MIN_BYTES", 0)
        name, reason = _choice(lm, temperature=0.8)
        assert name == "lean-onednn" and ">= cache budget 0 MiB" in reason
        if twins.fbgemm_available():
            name, reason = _choice(lm)
            assert name == "speculative" and "speculative=None" in reason
            assert (
                _choice(lm, mask=torch.ones(2, 5, dtype=torch.long))[0] == "screened-head"
            )  # batch 2: no draft
            name, reason = _choice(lm, speculative=0)
            assert name == "screened-head"


def test_other_models_dtypes_and_quantized_lms_leave_the_lean_path(lm, monkeypatch) -> None:
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()  # fmt: skip
    name, reason = _choice(qwen)
    assert name == "dynamic" and "Qwen2ForCausalLM is not a plain LlamaForCausalLM" in reason
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, attn_implementation="sdpa")  # fmt: skip
    half = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    name, reason = _choice(half)
    assert name == "dynamic" and "bfloat16 on cpu" in reason
    hooked = LlamaForCausalLM(config).eval()
    handle = hooked.model.layers[0].mlp.register_forward_hook(lambda *_: None)  # an adapter's way in
    assert _choice(hooked) == ("dynamic", "model's own forward: forward hooks on the LM's modules")
    handle.remove()


def test_quantized_lms_get_no_float16_draft(monkeypatch) -> None:
    from vlmkit.quantization import Int8DynamicLinear

    if not (twins.onednn_available() and twins.fbgemm_available()):
        pytest.skip("the automatic draft needs oneDNN and fbgemm")
    monkeypatch.setattr(twins, "ONEDNN_MIN_BYTES", 0)
    model = sharp_llama(vocab_size=300)
    assert _choice(model)[0] == "speculative"
    mlp = model.model.layers[0].mlp
    mlp.up_proj = Int8DynamicLinear.from_linear(mlp.up_proj)
    name, reason = _choice(model)
    assert name != "speculative" and "quantized LM: no float16 draft" in reason
    assert reason.startswith("Llama with vlmkit-quantized layers on CPU")
    with pytest.raises(ValueError, match="not quantized"):
        _choice(model, backend="speculative")


def test_select_backend_builds_what_decide_chose_and_logs_why(lm, caplog) -> None:
    resources = DecodeResources()
    mask = torch.ones(1, 5, dtype=torch.long)
    with caplog.at_level(logging.DEBUG, logger="vlmkit.generation"):
        backend, reason = select_backend(lm, attention_mask=mask, config=GenerationConfig(),
                                         options=DecodeOptions(static_cache=True), resources=resources)  # fmt: skip
    assert (
        isinstance(backend, DecodeBackend)
        and backend.name == "static"
        and reason.startswith("static_cache set")
    )
    assert f"decode backend static ({reason})" in caplog.text
    backend.close()
    assert len(resources.pool._idle) == 1  # the pool is the resources', not a module's
    resources.clear()
    assert not resources.pool._idle


def test_vlm_reports_its_decode_backend(tiny_vlm) -> None:
    info = tiny_vlm.info()["decode"]
    assert (info["backend"], info["reason"]) == tiny_vlm.decode_backend()
    assert tiny_vlm.decode_backend(batch=2, num_beams=3)[0] == "beam"
