"""AnyRes (LLaVA-NeXT / LLaVA-OneVision): exact parity with transformers on the same weights and inputs.

The reference is transformers itself: tiny random ``LlavaNextForConditionalGeneration`` (CLIP, "default") and
``LlavaOnevisionForConditionalGeneration`` (SigLIP, "full", anyres_max_2 so the cap really downsamples)
checkpoints are saved by path and loaded with ``VLM.from_pretrained``; token ids, pixels, image sizes and
logits (fp32) must equal what transformers' own processors and models give.
"""

from __future__ import annotations

import json

import pytest
import torch

from anyres_fixtures import save_llava_next, save_llava_onevision
from conftest import make_image
from vlmkit.api import VLM
from vlmkit.config import ConfigError, TilingConfig, VLMConfig
from vlmkit.models.io import ModelDirError
from vlmkit.processing.processor import Sample

TOLERANCE = 1e-5
PROMPT = "What colour is the circle?"
# (width, height): landscape, portrait, a wide strip, extreme aspect ratios, a tiny image
SIZES = {"landscape": (90, 40), "portrait": (40, 90), "strip": (200, 30), "wide": (800, 20), "tall": (20, 800),
         "tiny": (8, 8), "square": (64, 64)}  # fmt: skip
MAX_DIFF: dict[str, float] = {}  # largest logits difference per family (printed at the end with -s)


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def family(request, tmp_path_factory):
    """(name, checkpoint dir, transformers model, transformers processor, vlmkit VLM)."""
    directory = tmp_path_factory.mktemp(request.param) / "model"
    directory.mkdir()
    if request.param == "llava_next":
        from transformers import AutoProcessor, LlavaNextForConditionalGeneration

        save_llava_next(directory)
        hf, processor = LlavaNextForConditionalGeneration, AutoProcessor.from_pretrained(directory)
    else:
        from transformers import LlavaOnevisionForConditionalGeneration

        _, processor = save_llava_onevision(directory)
        hf = LlavaOnevisionForConditionalGeneration
    model = hf.from_pretrained(directory).eval()
    yield request.param, directory, model, processor, VLM.from_pretrained(directory)
    print(f"\nlargest logits difference {request.param}: {MAX_DIFF.get(request.param, 0.0):.3g}")


def pics(*names: str, seed: int = 0):
    return [make_image(seed=seed + i, size=SIZES[name]) for i, name in enumerate(names)]


def hf_inputs(processor, prompts: list[tuple[str, list]], *, side: str = "left"):
    """transformers' processor on [(text, images), ...]: its chat template, then text + images."""
    texts = []
    for text, images in prompts:
        conv = [
            {
                "role": "user",
                "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}],
            }
        ]
        texts.append(processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False))
    images = [list(images) for _, images in prompts]
    flat = [im for row in images for im in row]
    kwargs = {"images": images} if "Onevision" in type(processor).__name__ else {"images": flat or None}
    return processor(text=texts, return_tensors="pt", padding=True, padding_side=side, **kwargs)


def vlm_inputs(vlm, prompts: list[tuple[str, list]]):
    samples = [Sample(messages=vlm.processor.user_prompt(text, num_images=len(images)), images=images)
               for text, images in prompts]  # fmt: skip
    return vlm.processor(samples, padding_side="left")


def check_processor_parity(expected, got) -> None:
    assert torch.equal(expected["input_ids"], got["input_ids"])
    assert torch.equal(expected["attention_mask"], got["attention_mask"])
    assert torch.equal(expected["image_sizes"], got["image_sizes"])
    tiles = [lay.num_tiles for lay in got["image_layouts"]]
    hf_pixels = torch.cat([row[:n] for row, n in zip(expected["pixel_values"], tiles, strict=True)])
    assert torch.equal(hf_pixels, got["pixel_values"])  # bit-identical preprocessing


@torch.no_grad()
def check_logits(name, model, vlm, expected, got) -> None:
    positions = (expected["attention_mask"].cumsum(-1) - 1).clamp(
        min=0
    )  # both count from the first real token
    reference = model(**expected, position_ids=positions).logits
    ours = vlm.model(input_ids=got["input_ids"], attention_mask=got["attention_mask"], position_ids=positions,
                     pixel_values=got["pixel_values"], image_layouts=got["image_layouts"]).logits  # fmt: skip
    diff = float((reference - ours).abs().max())
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), diff)
    assert diff <= TOLERANCE
    assert float(reference.std()) > 0.1  # not a comparison of near-zero logits


CASES = {
    "one image": [(PROMPT, ["landscape"])],
    "two aspect ratios in one prompt": [("Which is taller?", ["landscape", "portrait"])],
    "left-padded batch, different counts": [
        (PROMPT, ["strip"]),
        ("Describe it.", ["portrait"]),
        ("Compare.", ["square", "landscape"]),
    ],  # fmt: skip
    "extreme aspect ratios": [(PROMPT, ["wide"]), (PROMPT, ["tall"])],
    "tiny image": [(PROMPT, ["tiny"])],
}


@pytest.mark.parametrize("case", list(CASES))
def test_inputs_and_logits_equal_transformers(family, case):
    name, _, model, processor, vlm = family
    prompts = [(text, pics(*names, seed=3 * i)) for i, (text, names) in enumerate(CASES[case])]
    expected, got = hf_inputs(processor, prompts), vlm_inputs(vlm, prompts)
    check_processor_parity(expected, got)
    counts = [vlm.processor.anyres.num_tokens(lay) for lay in got["image_layouts"]]
    assert int((got["input_ids"] == vlm.model.image_token_id).sum()) == sum(counts)
    if case == "left-padded batch, different counts":
        per_row = (got["input_ids"] == vlm.model.image_token_id).sum(-1).tolist()
        assert len(set(per_row)) == len(per_row)  # every row has its own image-token count
    check_logits(name, model, vlm, expected, got)


def test_token_counts_depend_on_the_image(family):
    vlm = family[4]
    counts = {key: vlm.processor.token_counts(vlm.processor.image_layouts(pics(key)))[0] for key in SIZES}
    assert len(set(counts.values())) >= 4, counts
    assert counts["tiny"] > 0


def test_greedy_generation_equals_transformers(family):
    _, _, model, processor, vlm = family
    images = pics("portrait", seed=5)
    inputs = hf_inputs(processor, [(PROMPT, images)])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(expected) == 20  # eos never fired: all 20 steps were compared
    result = vlm.generate([Sample(messages=vlm.processor.user_prompt(PROMPT, num_images=1), images=images)],
                          max_new_tokens=20)  # fmt: skip
    assert result.token_ids[0] == expected
    assert vlm.ask(PROMPT, images=images, max_new_tokens=20) == result.texts[0]


def test_batch_answers_equal_single_answers(family):
    """ask_batch (left padding, different image-token counts) answers each prompt as ask does alone."""
    vlm = family[4]
    images = [pics("landscape", seed=1), pics("tall", seed=2), pics("square", "tiny", seed=3)]
    prompts = [PROMPT, "Describe it.", "<image> or <image>?"]
    alone = [vlm.ask(p, images=im, max_new_tokens=8) for p, im in zip(prompts, images, strict=True)]
    assert vlm.ask_batch(prompts, images=images, max_new_tokens=8) == alone


def test_feature_and_prefix_caches_keep_answers(family):
    """A second prompt sharing the first image reuses its KV (a cut after a variable-length image span) and
    answers as without caches; so do streaming and a repeated prompt."""
    vlm = family[4]
    a, b, c = pics("strip", "portrait", "tall", seed=7)
    prompt = "<image> then <image>: which?"
    vlm.enable_caches(feature_cache_bytes=0, prefix_cache_bytes=0)
    plain = [vlm.ask(prompt, images=pair, max_new_tokens=6) for pair in ([a, b], [a, c])]
    vlm.enable_caches()
    cached = [vlm.ask(prompt, images=pair, max_new_tokens=6) for pair in ([a, b], [a, c], [a, c])]
    assert cached == plain + plain[1:]
    assert vlm.prefix_cache.stats()["hits"] >= 2
    assert "".join(vlm.stream(prompt, images=[a, b], max_new_tokens=6)) == plain[0]


# ---------------------------------------------------------------------------------------- config, refusals


def test_tiling_config_round_trips_and_validates(family):
    config = family[4].config
    again = VLMConfig.from_dict(json.loads(config.to_json()))
    assert again.vision.tiling == config.vision.tiling and again == config
    data = json.loads(config.to_json())
    data["vision"]["tiling"]["grid_pinpoints"] = [[32, 50]]
    with pytest.raises(ConfigError, match="grid_pinpoints.*multiples"):
        VLMConfig.from_dict(data)
    data["vision"]["tiling"] |= {"grid_pinpoints": [], "max_tiles": None}
    with pytest.raises(ConfigError, match="exactly one of grid_pinpoints and max_tiles"):
        VLMConfig.from_dict(data)


def test_max_tiles_lists_every_grid_up_to_the_count():
    assert TilingConfig(max_tiles=4).pinpoints(10) == [(10, 10), (10, 20), (10, 30), (10, 40), (20, 10),
                                                       (20, 20), (30, 10), (40, 10)]  # fmt: skip


def test_vlmkit_save_and_load_keeps_the_model(family, tmp_path):
    _, _, _, _, vlm = family
    vlm.save_pretrained(tmp_path / "saved")
    again = VLM.from_pretrained(tmp_path / "saved")
    images = pics("wide", seed=9)
    assert again.ask(PROMPT, images=images, max_new_tokens=6) == vlm.ask(
        PROMPT, images=images, max_new_tokens=6
    )


def test_unsupported_onevision_aspect_is_refused(tmp_path):
    directory = tmp_path / "ov"
    directory.mkdir()
    save_llava_onevision(directory)
    config = json.loads((directory / "config.json").read_text())
    config |= {"vision_aspect_ratio": "pad", "projector_hidden_act": "relu"}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="projector_hidden_act.*vision_aspect_ratio='pad'"):
        VLM.from_pretrained(directory)
