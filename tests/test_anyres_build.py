"""AnyRes composed from parts: ``VLM.build(..., resolution="anyres")`` / ``vlmkit build --anyres``, the
token counts ``vlmkit info`` and ``vlmkit plan`` report, and exports that transformers computes identically."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import tiny
from anyres_fixtures import onevision_processor
from conftest import make_image
from vlmkit.api import VLM
from vlmkit.cli.main import app
from vlmkit.config import ConfigError
from vlmkit.models.convert.export_anyres import export_hf_anyres

PROMPT = "What colour is the circle?"


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("anyres-parts")
    return {"clip": tiny.save_vision(root / "clip", "clip"), "siglip": tiny.save_vision(root / "siglip", "siglip"),
            "llama": tiny.save_language(root / "llama", "llama")}  # fmt: skip


@pytest.fixture(scope="module")
def next_like(parts):
    vlm = VLM.build(
        vision=parts["clip"], language=parts["llama"], resolution="anyres", tiling={"max_tiles": 4}
    )
    _sharpen(vlm)
    return vlm


@pytest.fixture(scope="module")
def onevision_like(parts):
    tiling = {"max_tiles": 6, "max_tile_tokens": 2, "multi_image_base_only": True}
    vlm = VLM.build(vision=parts["siglip"], language=parts["llama"], resolution="anyres", tiling=tiling,
                    resize_mode="pad")  # fmt: skip
    _sharpen(vlm)
    return vlm


def _sharpen(vlm) -> None:
    """Random weights at a scale where images change the answers (and newline / projector matter)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in [*vlm.model.projector.parameters(), vlm.model.tiling.image_newline]:
            param.normal_(0.0, 0.5)
    vlm.clear_caches()


def pics(*sizes, seed=0):
    return [make_image(seed=seed + i, size=size) for i, size in enumerate(sizes)]


def test_built_model_counts_tokens_by_image_size(next_like):
    counts = {size: next_like.image_token_count(width=size[0], height=size[1])
              for size in [(32, 32), (64, 32), (32, 64), (64, 64), (128, 16), (8, 8)]}  # fmt: skip
    assert counts[(32, 32)] == 16 + 4 * 5  # base 4x4, one tile: 4 rows of 4 + newline
    assert counts[(64, 64)] == 16 + 8 * 9
    assert counts[(64, 32)] == 16 + 4 * 9  # landscape: a 4x8 map, 4 newlines
    assert counts[(32, 64)] == 16 + 8 * 5  # portrait: an 8x4 map, 8 newlines
    # the most: a 4-tile column, 16 rows of 4 tokens + newline
    assert (
        next_like.info()["image_tokens"] == 16 + 16 * 5 == next_like.image_token_count(width=32, height=128)
    )
    assert max(counts.values()) <= 96
    assert next_like.info(image_size=(64, 32))["image_tokens"] == counts[(64, 32)]


@pytest.mark.slow
def test_built_model_answers_batches_as_alone_and_round_trips(next_like, tmp_path):
    images = [pics((90, 40), seed=1), pics((20, 200), seed=2), pics((64, 64), (8, 8), seed=3)]
    prompts = [PROMPT, "Describe it.", "<image> or <image>?"]
    alone = [next_like.ask(p, images=im, max_new_tokens=8) for p, im in zip(prompts, images, strict=True)]
    assert next_like.ask_batch(prompts, images=images, max_new_tokens=8) == alone
    assert len(set(alone)) > 1  # images change the answers
    again = VLM.from_pretrained(next_like.save_pretrained(tmp_path / "saved"))
    assert again.config.vision.tiling == next_like.config.vision.tiling
    assert [again.ask(p, images=im, max_new_tokens=8) for p, im in zip(prompts, images, strict=True)] == alone


@torch.no_grad()
def _vlmkit_logits(vlm, prompts):
    from vlmkit.processing.processor import Sample
    from vlmkit.processing.prompting import normalize_messages

    samples = []
    for text, images in prompts:  # the same content parts transformers' processor renders
        parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
        messages, found = normalize_messages([{"role": "user", "content": parts}], image_token="<image>")
        samples.append(Sample(messages=messages, images=found))
    batch = vlm.processor(samples, padding_side="left")
    logits = vlm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], image_layouts=batch["image_layouts"]).logits  # fmt: skip
    return batch, logits


def _hf_inputs(processor, prompts, *, nested):
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"} for _ in im]
                                             + [{"type": "text", "text": t}]}], add_generation_prompt=True,
                                           tokenize=False) for t, im in prompts]  # fmt: skip
    images = [im for _, im in prompts] if nested else [x for _, im in prompts for x in im]
    return processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")


@pytest.mark.parametrize("kind", ["next", "onevision"])
def test_export_of_a_built_model_matches_vlmkit(kind, next_like, onevision_like, tmp_path):
    from transformers import AutoProcessor, AutoTokenizer

    vlm = next_like if kind == "next" else onevision_like
    out = export_hf_anyres(vlm, out=tmp_path / "out", format=f"hf-llava-{kind}")
    prompts = [(PROMPT, pics((90, 40), seed=5)), ("Compare.", pics((30, 100), (64, 64), seed=6))]
    if kind == "next":
        from transformers import LlavaNextForConditionalGeneration as Model

        processor = AutoProcessor.from_pretrained(out)
    else:
        from transformers import LlavaOnevisionForConditionalGeneration as Model
        from transformers import LlavaOnevisionImageProcessor

        settings = json.loads((out / "processor_config.json").read_text())
        processor = onevision_processor(tokenizer=AutoTokenizer.from_pretrained(out),
                                        image_processor=LlavaOnevisionImageProcessor.from_pretrained(out),
                                        num_image_tokens=settings["num_image_tokens"],
                                        aspect=settings["vision_aspect_ratio"])  # fmt: skip
        processor.chat_template = (out / "chat_template.jinja").read_text()
    inputs = _hf_inputs(processor, prompts, nested=kind == "onevision")
    batch, ours = _vlmkit_logits(vlm, prompts)
    assert torch.equal(inputs["input_ids"], batch["input_ids"])
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = Model.from_pretrained(out).eval()(**inputs, position_ids=positions).logits
    assert float((theirs - ours).abs().max()) <= 1e-5


def test_bad_resolution_settings_are_refused(parts):
    with pytest.raises(ValueError, match="resolution must be 'fixed' or 'anyres'"):
        VLM.build(vision=parts["clip"], language=parts["llama"], resolution="hd")
    with pytest.raises(ValueError, match="tiling settings need resolution='anyres'"):
        VLM.build(vision=parts["clip"], language=parts["llama"], tiling={"max_tiles": 2})
    with pytest.raises(ConfigError, match="vision.tiling.max_tilez"):
        VLM.build(vision=parts["clip"], language=parts["llama"], resolution="anyres", tiling={"max_tilez": 2})
    with pytest.raises(ValueError, match="resampler"):
        VLM.build(vision=parts["clip"], language=parts["llama"], projector="resampler", resolution="anyres")


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_build_info_and_plan(parts, tmp_path):
    out = tmp_path / "m"
    built = run("build", "--vision", parts["clip"], "--language", parts["llama"], "--projector", "mlp",
                "--anyres", "--grid-pinpoints", "32x64,64x32,64x64", "--out", out)  # fmt: skip
    assert built.exit_code == 0, built.output
    vlm = VLM.from_pretrained(out)
    assert vlm.config.vision.tiling.grid_pinpoints == ((32, 64), (64, 32), (64, 64))
    shown = run("info", "--model", out, "--image-size", "90x40", "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["resolution"] == "anyres" and data["image_tokens"] == vlm.image_token_count(
        width=90, height=40
    )
    plans = {}
    for extra in ([], ["--anyres", "--max-tiles", "4"]):
        result = run("plan", "--vision", parts["clip"], "--language", parts["llama"], "--json", *extra)
        assert result.exit_code == 0, result.output
        plans[bool(extra)] = json.loads(result.stdout)
    assert plans[True]["settings"]["seq"] == 16 + 16 * 5 + 256 and plans[False]["settings"]["seq"] == 16 + 256
    assert plans[True]["activations"] > plans[False]["activations"]


@pytest.mark.parametrize(
    "args, message",
    [(["--anyres", "--grid-pinpoints", "32x"], "not HEIGHTxWIDTH"), (["--max-tiles", "2"], "--max-tiles: tiling options need anyres"),
     (["--anyres", "--grid-pinpoints", "32x50"], "multiples of vision.image_size=32")],
)  # fmt: skip
def test_cli_build_refuses_bad_tiling_options(parts, tmp_path, args, message):
    result = run("build", "--vision", parts["clip"], "--language", parts["llama"], "--projector", "mlp",
                 "--out", tmp_path / "m", *args)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0]


@pytest.mark.slow
def test_server_answers_anyres_requests_as_the_library_does(next_like):
    """Images of different sizes in one request: the server counts each image's tokens and answers as ``chat``."""
    import base64
    import io

    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from vlmkit.serving.app import create_app

    def url(image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    images = pics((90, 40), (20, 120), seed=11)
    content = [{"type": "image_url", "image_url": {"url": url(im)}} for im in images]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": "Which is taller?"}]}]
    expected = next_like.chat(messages, max_new_tokens=6)
    with TestClient(create_app(next_like)) as http:
        response = http.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == expected
    counts = sum(next_like.image_token_count(width=im.width, height=im.height) for im in images)
    assert body["usage"]["prompt_tokens"] > counts


def test_cli_export_formats(next_like, tmp_path):
    model = next_like.save_pretrained(tmp_path / "m")
    done = run("export", "--model", model, "--format", "hf-llava-next", "--out", tmp_path / "next")
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "next" / "config.json").read_text())["model_type"] == "llava_next"
    refused = run("export", "--model", model, "--format", "hf-llava", "--out", tmp_path / "plain")
    lines = refused.stderr.strip().splitlines()
    assert refused.exit_code == 2 and len(lines) == 1 and "AnyRes tiling" in lines[0], refused.output


@pytest.mark.slow
def test_feature_cache_key_includes_the_tiling(parts, tmp_path):
    """Two models that differ only in their tiling share a disk feature cache without reading each other's
    entries: each answers as it does with no cache at all."""
    images = pics((128, 32), seed=21)  # a 1x2 grid under max_tiles=2, 1x4 under max_tiles=4
    answers = {}
    for max_tiles in (2, 4):
        vlm = VLM.build(vision=parts["clip"], language=parts["llama"], resolution="anyres",
                        tiling={"max_tiles": max_tiles}, feature_cache_dir=tmp_path / "cache")  # fmt: skip
        _sharpen(vlm)
        cached = vlm.ask(PROMPT, images=images, max_new_tokens=6)
        vlm.enable_caches(feature_cache_bytes=0, prefix_cache_bytes=0)
        assert vlm.ask(PROMPT, images=images, max_new_tokens=6) == cached
        answers[max_tiles] = vlm.image_token_count(width=128, height=32)
    assert answers[2] != answers[4]
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
