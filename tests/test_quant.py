"""Quantized inference (vlmkit/quantization): layer error bounds, a tiny quantized VLM against float32, decoding
paths (batched, uncached, streamed, beams, static cache, the lean step), save -> load, and the clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import tiny
from vlmkit.api import VLM
from vlmkit.quantization import (
    Int4Linear,
    Int8DynamicLinear,
    QuantizationError,
    is_quantized,
    quantize_model,
    resolve_scheme,
)

pytestmark = pytest.mark.usefixtures("one_thread")
# relative L2 error of a tiny VLM's logits against float32 (measured: int8 ~0.01, int4 ~0.06)
LOGIT_TOLERANCE = {"int8": 0.04, "int4": 0.15}
PROMPTS = ["What colour is the circle?", "Describe the image.", "Which image has more circles?"]


@pytest.fixture(scope="module")
def quant_parts(tmp_path_factory):
    """A CLIP tower + a Llama with widths int4 can group (64 / 128), saved once."""
    root = tmp_path_factory.mktemp("quant-parts")
    return tiny.save_vision(root / "clip", "clip"), tiny.save_language(root / "llama", "llama", hidden=64)


@pytest.fixture(scope="module")
def float_vlm(quant_parts):
    vision, language = quant_parts
    return VLM.build(vision=vision, language=language, projector="mlp")


@pytest.fixture(scope="module")
def quantized(float_vlm):
    """method -> a quantized copy of ``float_vlm`` (the float model itself is left alone)."""
    out = {}
    for method in ("int8", "int4"):
        model = copy.deepcopy(float_vlm.model)
        model.config.quantization = quantize_model(model, method=method, device="cpu")
        out[method] = VLM(model=model, tokenizer=float_vlm.tokenizer)
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_int8_layer_within_its_rounding_bound():
    torch.manual_seed(0)
    linear = nn.Linear(256, 384)
    layer = Int8DynamicLinear.from_linear(linear)
    step = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127  # one code per row
    assert ((layer.dequantize() - linear.weight).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(8, 256)
    with torch.no_grad():
        exact, got = linear(x), layer(x)
        # activations are rounded per token to int8 as well: the product's error stays near 1 %
        assert _relative(got, exact) < 0.02
        assert _relative(got, x @ layer.dequantize().t() + linear.bias) < 0.02
        # a row's result is the same whatever else is in the batch
        assert torch.equal(layer(x[2:3]), got[2:3])


def test_int4_layer_within_its_rounding_bound():
    torch.manual_seed(0)
    linear = nn.Linear(256, 384)
    layer = Int4Linear.from_linear(linear, group_size=64)
    groups = linear.weight.detach().view(384, 4, 64)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(64, dim=1)  # [out, in]
    # half a code step, plus the bfloat16 rounding of the scale and zero (2^-8 relative each)
    bound = step / 2 + 2**-8 * (linear.weight.detach().abs() + 8 * step) + 1e-6
    assert ((layer.dequantize() - linear.weight).abs() <= bound).all()
    x = torch.randn(8, 256)
    with torch.no_grad():
        assert _relative(layer(x), linear(x)) < 0.12
        # the kernel is the dequantized product, with activations rounded to bfloat16
        assert _relative(layer(x), x.bfloat16().float() @ layer.dequantize().t() + linear.bias) < 0.01


def test_layers_quantized_under_inference_mode_run():
    """Tensors made under ``torch.inference_mode`` keep no version counter; the packed-weight cache copes."""
    with torch.inference_mode():
        linear = nn.Linear(128, 64)
        for layer in (Int8DynamicLinear.from_linear(linear), Int4Linear.from_linear(linear, group_size=128)):
            x = torch.randn(3, 128)
            assert _relative(layer(x), linear(x)) < 0.12


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_vlm_logits_close_to_float32(float_vlm, quantized, images, method):
    vlm = quantized[method]
    assert is_quantized(vlm.model.language_model) and not is_quantized(float_vlm.model)
    assert type(vlm.model.language_model.lm_head) is nn.Linear  # the output layer keeps the compute dtype
    embeds, mask = float_vlm._prefill_inputs(_samples(float_vlm, images))
    with torch.no_grad():
        exact = float_vlm.model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        got = vlm.model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
    assert _relative(got, exact) < LOGIT_TOLERANCE[method]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_greedy_batched_equals_unbatched_and_uncached(quantized, images, method):
    vlm = quantized[method]
    image_lists = [[images[0]], [images[1]], []]
    batched = vlm.ask_batch(PROMPTS, images=image_lists, max_new_tokens=8)
    alone = [vlm.ask(p, images=i, max_new_tokens=8) for p, i in zip(PROMPTS, image_lists, strict=True)]
    assert batched == alone
    sample = _samples(vlm, images)[0]
    cached = vlm.generate([sample], max_new_tokens=8).token_ids[0]
    assert cached == _uncached_greedy(vlm, sample, steps=8)
    assert "".join(vlm.stream(PROMPTS[0], images=[images[0]], max_new_tokens=8)) == alone[0]


def test_quantized_decode_paths(quantized, images, monkeypatch):
    """Decode steps run vlmkit's lean step over the quantized layers (the decoder layers' own forward runs only in
    prefill); the static cache, beams of 1 and an asked-for draft give the same greedy answer."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    vlm = quantized["int8"]
    calls = []
    original = LlamaDecoderLayer.forward
    monkeypatch.setattr(LlamaDecoderLayer, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    plain = vlm.ask(PROMPTS[0], images=[images[0]], max_new_tokens=8)
    layers = len(vlm.model.language_model.model.layers)
    assert len(calls) == layers  # prefill only: every decode step took the lean path
    monkeypatch.setattr(LlamaDecoderLayer, "forward", original)
    vlm.set_decoding(static_cache=True)
    try:
        assert vlm.ask(PROMPTS[0], images=[images[0]], max_new_tokens=8) == plain
    finally:
        vlm.set_decoding()
    assert vlm.ask(PROMPTS[0], images=[images[0]], max_new_tokens=8, num_beams=1) == plain
    assert isinstance(vlm.ask(PROMPTS[0], images=[images[0]], max_new_tokens=8, num_beams=3), str)
    vlm.set_decoding(speculative=4)  # no float16 draft of a quantized model: plain decoding, same answer
    try:
        assert vlm.ask(PROMPTS[0], images=[images[0]], max_new_tokens=8) == plain
    finally:
        vlm.set_decoding()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_save_load_identical_logits(quantized, images, tmp_path, method):
    vlm = quantized[method]
    directory = vlm.save_pretrained(tmp_path / method)
    loaded = VLM.from_pretrained(directory)
    assert loaded.config.quantization == vlm.config.quantization
    embeds, mask = vlm._prefill_inputs(_samples(vlm, images))
    with torch.no_grad():
        before = vlm.model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        after = loaded.model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
    assert torch.equal(before, after)
    # int8: 1 byte a weight + a float32 scale a row; int4: half a byte + two bfloat16 numbers per 64 weights
    saved = 4 * vlm.info()["parameters"]["language_model"] - loaded.info()["bytes"]["language_model"]
    weights = sum(m.in_features * m.out_features for m in loaded.model.modules() if hasattr(m, "qweight"))
    assert saved >= {"int8": 2.9, "int4": 3.4}[method] * weights
    assert VLM.from_pretrained(directory, quantize=method).config.quantization.method == method
    other = "int4" if method == "int8" else "int8"
    with pytest.raises(QuantizationError, match=f"quantized as {method}"):
        VLM.from_pretrained(directory, quantize=other)


def test_export_refuses_a_quantized_model(quantized, tmp_path):
    from vlmkit.models.convert.export import export_hf_llava

    with pytest.raises(ValueError, match="quantized language model"):
        export_hf_llava(quantized["int8"], out=tmp_path / "hf")


def test_from_pretrained_quantize(float_vlm, tmp_path):
    directory = float_vlm.save_pretrained(tmp_path / "float")
    vlm = VLM.from_pretrained(directory, quantize="int4")
    assert vlm.config.quantization.scheme == "int4-weight-only-grouped"
    assert vlm.config.quantization.group_size == 64  # 128 does not divide the 64-wide layers
    info = vlm.info()
    assert info["parameters"] == float_vlm.info()["parameters"]  # quantized layers count what they stand for
    assert info["bytes"]["vision"] == float_vlm.info()["bytes"]["vision"]  # the tower is not quantized


@pytest.mark.parametrize(
    ("method", "device", "message"),
    [
        ("nf4", "cpu", "needs bitsandbytes on a CUDA device"),
        ("int3", "cpu", "unknown quantize='int3'"),
        ("int8", "meta", "not available on meta devices"),
    ],
)
def test_unsupported_combinations(method, device, message):
    with pytest.raises(QuantizationError, match=message):
        resolve_scheme(method, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("method", ["int8", "nf4", "int4"])
def test_cuda_schemes_without_cuda(method):
    with pytest.raises(QuantizationError, match="no CUDA device"):
        resolve_scheme(method, device="cuda")


def test_int4_refuses_ungroupable_widths(tiny_vlm):
    """The conftest Llama is 48 wide: no int4 group size divides it."""
    model = copy.deepcopy(tiny_vlm.model)
    with pytest.raises(QuantizationError, match="divisible by 32"):
        quantize_model(model, method="int4", device="cpu")


def test_quantize_refuses_lm_without_linear_layers(parts):
    vlm = VLM.build(vision=parts["clip"], language=parts["gpt2"], projector="mlp")  # GPT-2 uses Conv1D
    with pytest.raises(QuantizationError, match="no nn.Linear layers"):
        quantize_model(vlm.model, method="int8", device="cpu")


def _samples(vlm, images):
    from vlmkit.processing.processor import Sample

    image_lists = [[images[0]], [images[1]], []]
    return [Sample(messages=vlm.processor.user_prompt(p, num_images=len(i)), images=i)
            for p, i in zip(PROMPTS, image_lists, strict=True)]  # fmt: skip


@torch.no_grad()
def _uncached_greedy(vlm, sample, *, steps: int) -> list[int]:
    """Greedy tokens by recomputing the whole sequence every step (no KV cache)."""
    embeds, _ = vlm._prefill_inputs([sample])
    lm = vlm.model.language_model
    tokens: list[int] = []
    for _ in range(steps):
        logits = lm(inputs_embeds=embeds).logits[0, -1]
        token = int(logits.argmax())
        tokens.append(token)
        if token in (lm.config.eos_token_id, vlm.tokenizer.eos_token_id):
            break
        embeds = torch.cat((embeds, lm.get_input_embeddings()(torch.tensor([[token]]))), dim=1)
    return tokens


@pytest.fixture(scope="module")
def float_dir(float_vlm, tmp_path_factory):
    return float_vlm.save_pretrained(tmp_path_factory.mktemp("quant-models") / "float")


def test_cli_quantize(float_dir, images, tmp_path):
    from typer.testing import CliRunner

    from vlmkit.cli.main import app

    picture = tmp_path / "a.png"
    images[0].save(picture)
    run = CliRunner().invoke
    answer = run(app, ["ask", str(picture), "--prompt", PROMPTS[0], "--model", str(float_dir), "--quantize", "int8",
                       "--max-new-tokens", "6"])  # fmt: skip
    expected = VLM.from_pretrained(float_dir, quantize="int8").ask(
        PROMPTS[0], images=[picture], max_new_tokens=6
    )
    assert answer.exit_code == 0 and answer.stdout.strip() == expected.strip()
    info = run(app, ["info", "--model", str(float_dir), "--quantize", "int4", "--json"])
    data = json.loads(info.stdout)
    assert data["quantization"]["scheme"] == "int4-weight-only-grouped"
    assert (
        data["bytes"]["language_model"]
        < json.loads(run(app, ["info", "--model", str(float_dir), "--json"]).stdout)["bytes"][
            "language_model"
        ]
    )
    refused = run(
        app, ["ask", str(picture), "--prompt", "hi", "--model", str(float_dir), "--quantize", "nf4"]
    )
    assert refused.exit_code == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "CUDA" in lines[0]


@pytest.mark.slow
def test_compiled_decode_of_a_quantized_model(quantized):
    """``compile=True`` (a torch.compile'd step over a static cache) runs the quantized layers: same answer."""
    for vlm in quantized.values():
        plain = vlm.ask(PROMPTS[1], max_new_tokens=6)
        vlm.set_decoding(compile=True)
        try:
            assert vlm.ask(PROMPTS[1], max_new_tokens=6) == plain
        finally:
            vlm.set_decoding()


def test_plan_cli_quantize(parts):
    from typer.testing import CliRunner

    from vlmkit.cli.main import app

    def plan(*extra: str):
        args = ["plan", "--vision", str(parts["clip"]), "--language", str(parts["llama"]), *extra]
        return CliRunner().invoke(app, args)

    lora, qlora = plan("--stage", "lora", "--json"), plan("--stage", "lora", "--quantize", "int8", "--json")
    assert lora.exit_code == qlora.exit_code == 0
    assert json.loads(qlora.stdout)["settings"]["quantize"] == "int8"
    assert json.loads(qlora.stdout)["weights"] < json.loads(lora.stdout)["weights"]
    refused = plan("--stage", "full", "--quantize", "int8")
    assert refused.exit_code == 2 and "needs stage 'lora'" in refused.stderr
