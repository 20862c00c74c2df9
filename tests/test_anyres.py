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


# ------------------------------------------------------------------------------------------------ export

FORMAT = {"llava_next": "hf-llava-next", "llava_onevision": "hf-llava-onevision"}


def test_export_round_trip_gives_identical_logits_and_inputs(family, tmp_path):
    """import -> export -> transformers: the same logits as the original checkpoint, the same processor output."""
    from vlmkit.models.convert.export_anyres import export_hf_anyres

    name, _, model, processor, vlm = family
    out = export_hf_anyres(vlm, out=tmp_path / "exported", format=FORMAT[name])
    reloaded = type(model).from_pretrained(out).eval()
    if name == "llava_next":
        from transformers import AutoProcessor

        exported_processor = AutoProcessor.from_pretrained(out)
    else:
        from transformers import AutoTokenizer, LlavaOnevisionImageProcessor

        from anyres_fixtures import onevision_processor

        settings = json.loads((out / "processor_config.json").read_text())
        exported_processor = onevision_processor(
            tokenizer=AutoTokenizer.from_pretrained(out), image_processor=LlavaOnevisionImageProcessor.from_pretrained(out),
            num_image_tokens=settings["num_image_tokens"], aspect=settings["vision_aspect_ratio"])  # fmt: skip
        exported_processor.chat_template = (out / "chat_template.jinja").read_text()
    prompts = [(PROMPT, pics("portrait", seed=2)), ("Compare.", pics("wide", "square", seed=4))]
    original, exported = hf_inputs(processor, prompts), hf_inputs(exported_processor, prompts)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert torch.equal(original[key], exported[key]), key
    positions = (original["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(**original, position_ids=positions).logits
        got = reloaded(**exported, position_ids=positions).logits
    assert float((expected - got).abs().max()) == 0.0


def test_export_refuses_what_the_format_cannot_express_listing_every_reason(family, tmp_path):
    from vlmkit.models.convert.export import export_hf_llava
    from vlmkit.models.convert.export_anyres import export_hf_anyres

    name, _, _, _, vlm = family
    other = "hf-llava-onevision" if name == "llava_next" else "hf-llava-next"
    with pytest.raises(ValueError, match="cannot export to hf-llava: AnyRes tiling"):
        export_hf_llava(vlm, out=tmp_path / "a")
    expected = (
        "no token cap.*tiled images in multi-image" if name == "llava_next" else "a token cap.*multi-image"
    )
    with pytest.raises(ValueError, match=f"cannot export to {other}: {expected}"):
        export_hf_anyres(vlm, out=tmp_path / "b", format=other)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------- original LLaVA-NeXT


def save_original_next(directory, *, hf_model, **fields):
    """The llava-hf NeXT weights laid out as haotian-liu/LLaVA saves LLaVA-1.6, plus the tower as its own dir."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    from anyres_fixtures import NEXT_PINPOINTS, TILE, llama_like_tokenizer

    tower = directory / "clip-tower"
    hf_model.model.vision_tower.save_pretrained(tower)
    CLIPImageProcessor(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}
    ).save_pretrained(tower)
    root = directory / "llava-v1.6"
    root.mkdir()
    mlp = hf_model.model.multi_modal_projector
    state = {f"model.{k}": v for k, v in hf_model.model.language_model.state_dict().items()}
    state |= {"lm_head.weight": hf_model.lm_head.weight, "model.image_newline": hf_model.model.image_newline,
              "model.mm_projector.0.weight": mlp.linear_1.weight, "model.mm_projector.0.bias": mlp.linear_1.bias,
              "model.mm_projector.2.weight": mlp.linear_2.weight, "model.mm_projector.2.bias": mlp.linear_2.bias}  # fmt: skip
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(root / "model.safetensors"))
    config = hf_model.config.text_config.to_dict() | {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_hidden_size": 32, "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": [[w, h] for h, w in NEXT_PINPOINTS], "mm_patch_merge_type": "spatial_unpad",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, **fields,
    }  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))
    llama_like_tokenizer().save_pretrained(root)
    return root, tower


def test_original_llava_next_layout_equals_llava_hf(family, tmp_path):
    name, _, model, processor, vlm = family
    if name != "llava_next":
        pytest.skip("LLaVA-1.6 layout")
    root, tower = save_original_next(tmp_path, hf_model=model)
    original = VLM.from_pretrained(root, vision_tower=tower)
    assert original.config.vision.tiling == vlm.config.vision.tiling
    prompts = [(PROMPT, pics("portrait", seed=1)), ("Compare.", pics("wide", "tiny", seed=2))]
    expected, got = hf_inputs(processor, prompts), vlm_inputs(vlm, prompts)
    check_logits(name, model, original, expected, got)


@pytest.mark.parametrize(
    "fields, message",
    [({"mm_patch_merge_type": "flat"}, "mm_patch_merge_type='flat'"),
     ({"image_aspect_ratio": "anyres_big", "image_grid_pinpoints": "(1x1)"}, "image_aspect_ratio.*image_grid_pinpoints")],
)  # fmt: skip
def test_original_llava_next_refusals(family, tmp_path, fields, message):
    name, _, model, _, _ = family
    if name != "llava_next":
        pytest.skip("LLaVA-1.6 layout")
    root, tower = save_original_next(tmp_path, hf_model=model, **fields)
    with pytest.raises(ModelDirError, match=message):
        VLM.from_pretrained(root, vision_tower=tower)


def test_original_grid_range_is_read_in_llava_order():
    from vlmkit.models.convert.llava_original import _original_pinpoints

    assert _original_pinpoints("(1x1),...,(2x3)", tile_size=10) == (
        (10, 10), (20, 10), (30, 10), (10, 20), (20, 20), (30, 20))  # fmt: skip
    assert _original_pinpoints([[20, 10]], tile_size=10) == ((10, 20),)  # LLaVA's (width, height)
