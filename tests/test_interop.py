"""Checkpoint interop: llava-hf and original LLaVA directories load exactly; export writes llava-hf.

The reference is transformers itself: a tiny random ``LlavaForConditionalGeneration`` (CLIP 336/14 -> 576
image tokens, Llama LM) with a LLaVA-1.5 style processor is saved by path, then logits, greedy generation and
processor outputs of vlmkit are compared with transformers' on the same weights and inputs.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken, processors

import tiny
from conftest import make_image, png_bytes
from vlmkit.api import VLM
from vlmkit.models.convert.export import export_hf_llava
from vlmkit.models.io import ModelDirError
from vlmkit.processing.processor import Sample
from vlmkit.processing.prompting import normalize_messages

TOLERANCE = 1e-5
# llava-hf's llava-1.5 processor template: images of a turn first, then its text
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------- fixtures


def llama_like_tokenizer(*, image_token: bool):
    """tiny's byte-level BPE with a Llama-style BOS post-processor (and ``<image>`` as llava-hf adds it)."""
    tokenizer = tiny.build_tokenizer(chat_template=False)
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    if image_token:
        tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return tokenizer


def save_llava_hf(
    directory: Path,
    *,
    image_size: int = 336,
    patch_size: int = 14,
    language: str = "llama",
    tie: bool = False,
):
    """A random (but not tiny-valued) llava-hf checkpoint + LlavaProcessor, as the hub's llava-1.5 has them."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = llama_like_tokenizer(image_token=True)
    text_config = tiny.language_config(language)
    text_config.tie_word_embeddings = tie
    config = LlavaConfig(
        vision_config=tiny.vision_config("clip", image_size=image_size, patch_size=patch_size),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # large enough weights that logits are O(1) and images change them
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    size = {"shortest_edge": image_size}, {"height": image_size, "width": image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size=size[0], crop_size=size[1]),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15_TEMPLATE,
    )
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return save_llava_hf(tmp_path_factory.mktemp("llava-hf") / "llava")


@pytest.fixture(scope="module")
def hf_model(llava_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()


@pytest.fixture(scope="module")
def hf_processor(llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(llava_dir)


@pytest.fixture(scope="module")
def vlm(llava_dir) -> VLM:
    return VLM.from_pretrained(llava_dir)


@pytest.fixture(scope="module")
def pics() -> list[Image.Image]:
    return [make_image(seed=10 + i, size=(300 + 60 * i, 240 + 90 * i)) for i in range(3)]


def parts_message(text: str, images: list[Image.Image]) -> list[dict]:
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def hf_inputs(processor, conversations: list[list[dict]], images: list[Image.Image], **kwargs):
    texts = [
        processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations
    ]
    return processor(images=images or None, text=texts, return_tensors="pt", padding=True, **kwargs)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def both_logits(hf_model, vlm, inputs, **extra) -> tuple[torch.Tensor, torch.Tensor]:
    expected = hf_model(**inputs, **extra).logits
    got = vlm.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs.get("pixel_values"), **extra).logits  # fmt: skip
    return expected, got


# ---------------------------------------------------------------------------------------- llava-hf load


@pytest.mark.parametrize("case", ["one image", "two images", "right-padded batch", "left-padded batch"])
def test_logits_equal_transformers(hf_model, hf_processor, vlm, pics, case):
    convs = {
        "one image": ([parts_message("What colour is the circle?", pics[:1])], pics[:1]),
        "two images": ([parts_message("Which image has more circles?", pics[:2])], pics[:2]),
    }
    batch = [
        parts_message("Describe the image.", pics[:1]),
        parts_message("Compare left and right.", pics[1:]),
    ]
    convs["right-padded batch"] = convs["left-padded batch"] = (batch, pics)
    conversations, images = convs[case]
    side = "left" if case.startswith("left") else "right"
    inputs = hf_inputs(hf_processor, conversations, images, padding_side=side)
    assert int((inputs["input_ids"] == vlm.model.image_token_id).sum()) == 576 * len(images)
    extra = {}
    if side == "left":  # both models would count positions from the pads otherwise
        extra["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    expected, got = both_logits(hf_model, vlm, inputs, **extra)
    assert max_diff(expected, got) <= TOLERANCE
    assert float(expected.std()) > 0.1  # the comparison is not between near-zero logits


def test_images_change_the_logits(hf_model, hf_processor, vlm, pics):
    first = hf_inputs(hf_processor, [parts_message("Describe.", pics[:1])], pics[:1])
    second = hf_inputs(hf_processor, [parts_message("Describe.", pics[1:2])], pics[1:2])
    assert max_diff(both_logits(hf_model, vlm, first)[1], both_logits(hf_model, vlm, second)[1]) > 1e-2


def test_greedy_generation_equals_transformers(hf_model, hf_processor, vlm, pics):
    inputs = hf_inputs(hf_processor, [parts_message("What colour is the circle?", pics[:1])], pics[:1])
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=20, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    result = vlm.generate([Sample(messages=vlm.processor.user_prompt("What colour is the circle?", num_images=1),
                                  images=pics[:1])], max_new_tokens=20)  # fmt: skip
    assert result.token_ids[0] == expected
    assert len(expected) == 20  # eos never fired: all 20 steps were compared
    answer = vlm.ask("What colour is the circle?", images=pics[:1], max_new_tokens=20)
    assert answer == result.texts[0] == vlm.tokenizer.decode(expected, skip_special_tokens=True)


def test_processor_parity_with_llava_processor(hf_processor, vlm, pics):
    conversation = parts_message("Compare these.", pics[:2]) + [
        {"role": "assistant", "content": [{"type": "text", "text": "The first is red."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "image": pics[2]}],
        },
    ]
    expected = hf_inputs(hf_processor, [conversation], pics)
    plain, images = normalize_messages(conversation, image_token=vlm.config.prompt.image_token)
    got = vlm.processor([Sample(messages=plain, images=images)], add_generation_prompt=True)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert int((got["input_ids"] == vlm.model.image_token_id).sum()) == 3 * 576
    assert vlm.processor.image_processor.image_size == 336 and vlm.model.num_image_tokens == 576


def test_chat_with_data_urls_matches_ask(vlm, pics):
    url = "data:image/png;base64," + base64.b64encode(png_bytes(pics[0])).decode()
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What colour is it?"},
    ]
    chat = vlm.chat([{"role": "user", "content": content}], max_new_tokens=8)
    assert chat == vlm.ask("What colour is it?", images=[pics[0]], max_new_tokens=8)


def test_tied_qwen2_llava_keeps_its_tie_through_a_vlmkit_save(tmp_path, pics):
    from transformers import LlavaForConditionalGeneration

    source = save_llava_hf(tmp_path / "tied", image_size=32, patch_size=8, language="qwen2", tie=True)
    loaded = VLM.from_pretrained(source)
    lm = loaded.model.language_model
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    reloaded = VLM.from_pretrained(loaded.save_pretrained(tmp_path / "vlmkit"))
    lm = reloaded.model.language_model
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    hf = LlavaForConditionalGeneration.from_pretrained(source).eval()
    batch = reloaded.processor(
        [Sample(messages=reloaded.processor.user_prompt("Hi", num_images=1), images=pics[:1])]
    )
    expected, got = both_logits(hf, reloaded, batch)
    assert max_diff(expected, got) <= TOLERANCE


# --------------------------------------------------------------------------------------------- export


def test_export_round_trip_gives_identical_logits_and_inputs(hf_model, hf_processor, vlm, pics, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = export_hf_llava(vlm, out=tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_feature_select_strategy"] == "default"
    assert config["image_seq_length"] == 576 and (out / "preprocessor_config.json").exists()
    assert not list(out.glob("*.bin"))
    exported = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    conversation = [parts_message("Which image has more circles?", pics[:2])]
    inputs = hf_inputs(processor, conversation, pics[:2])
    reference = hf_inputs(hf_processor, conversation, pics[:2])
    assert torch.equal(inputs["input_ids"], reference["input_ids"])
    assert torch.equal(inputs["pixel_values"], reference["pixel_values"])
    with torch.no_grad():
        assert max_diff(exported(**inputs).logits, hf_model(**reference).logits) <= TOLERANCE


@pytest.mark.parametrize(
    ("vision", "template", "resize_mode", "select", "system"),
    [("clip", "auto", None, "patch", None), ("clip", "llava-v1", "pad", "full", None),
     ("siglip", "auto", None, "patch", "Be brief.")],
)  # fmt: skip
def test_export_of_a_built_model_matches_vlmkit(
    parts, pics, tmp_path, vision, template, resize_mode, select, system
):
    """Tokenizer (chatml) and built-in templates, crop / pad / resize, CLS kept, a system override; then the
    exported directory loads back into vlmkit unchanged."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    built = VLM.build(vision=parts[vision], language=parts["llama"], template=template, resize_mode=resize_mode,
                      select=select, system=system)  # fmt: skip
    out = export_hf_llava(built, out=tmp_path / "out")
    exported = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "Left"}, {"type": "image", "image": pics[0]},
                                     {"type": "image", "image": pics[1]}, {"type": "text", "text": "right?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The left one."}]},
        {"role": "user", "content": "Why?"},
    ]  # fmt: skip
    inputs = hf_inputs(processor, [conversation], pics[:2])
    plain, images = normalize_messages(conversation, image_token="<image>")
    for ours in (built, VLM.from_pretrained(out)):
        batch = ours.processor([Sample(messages=plain, images=images)])
        assert torch.equal(batch["input_ids"], inputs["input_ids"])
        assert torch.equal(batch["pixel_values"], inputs["pixel_values"])
        expected, got = both_logits(exported, ours, inputs)
        assert max_diff(expected, got) <= TOLERANCE


def test_export_refuses_unrepresentable_composition_listing_every_reason(parts, tmp_path):
    built = VLM.build(vision=parts["dinov2"], language=parts["llama"], projector="resampler")
    with pytest.raises(ValueError, match="cannot export") as info:
        export_hf_llava(built, out=tmp_path / "out")
    assert "'resampler'" in str(info.value) and "'dinov2'" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_export_refuses_unmerged_lora(parts, tmp_path):
    peft = pytest.importorskip("peft")
    built = VLM.build(vision=parts["clip"], language=parts["llama"])
    config = peft.LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")
    built.model.language_model = peft.get_peft_model(built.model.language_model, config)
    with pytest.raises(ValueError, match="unmerged LoRA adapters on the language model"):
        export_hf_llava(built, out=tmp_path / "out")


def test_export_refuses_a_non_empty_target(vlm, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ModelDirError, match="refusing"):
        export_hf_llava(vlm, out=tmp_path / "out")


def test_cli_export(llava_dir, parts, tmp_path):
    import typer
    from typer.testing import CliRunner

    from vlmkit.cli.export import export
    from vlmkit.cli.main import VlmkitGroup

    app = typer.Typer(cls=VlmkitGroup, add_completion=False)
    app.command("export")(export)
    app.command("noop")(lambda: None)  # two commands, so "export" is a subcommand as in the real app
    runner = CliRunner()
    ok = runner.invoke(
        app, ["export", "--model", str(llava_dir), "--format", "hf-llava", "--out", str(tmp_path / "a")]
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == "llava"
    bad_dir = VLM.build(
        vision=parts["dinov2"], language=parts["llama"], projector="resampler"
    ).save_pretrained(tmp_path / "bad")
    for args, needle in [(["--model", str(bad_dir)], "resampler"), (["--model", str(llava_dir), "--format", "gguf"],
                                                                    "unknown --format")]:  # fmt: skip
        result = runner.invoke(app, ["export", *args, "--out", str(tmp_path / "b")])
        lines = result.stderr.strip().splitlines()
        assert (
            result.exit_code == 2
            and len(lines) == 1
            and lines[0].startswith("error: ")
            and needle in lines[0]
        )


# ------------------------------------------------------------------------------------------ original LLaVA


def save_original_llava(
    directory: Path, *, hf_model, projector: str = "mlp2x_gelu", **fields
) -> tuple[Path, Path]:
    """The llava-hf model's weights laid out as haotian-liu/LLaVA saves them, plus the tower as its own dir."""
    from transformers import CLIPImageProcessor

    tower = directory / "clip-tower"
    hf_model.model.vision_tower.save_pretrained(tower)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(
        tower
    )
    root = directory / "llava-v1.5"
    root.mkdir()
    state = {f"model.{k}": v for k, v in hf_model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = hf_model.lm_head.weight
    mlp = hf_model.model.multi_modal_projector
    if projector == "linear":
        state |= {
            "model.mm_projector.weight": mlp.linear_1.weight,
            "model.mm_projector.bias": mlp.linear_1.bias,
        }
    else:
        state |= {"model.mm_projector.0.weight": mlp.linear_1.weight, "model.mm_projector.0.bias": mlp.linear_1.bias,
                  "model.mm_projector.2.weight": mlp.linear_2.weight, "model.mm_projector.2.bias": mlp.linear_2.bias}  # fmt: skip
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(root / "model.safetensors"))
    config = hf_model.config.text_config.to_dict() | {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_projector_type": projector,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_hidden_size": 32, "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, **fields,
    }  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))
    llama_like_tokenizer(image_token=False).save_pretrained(root)
    return root, tower


def test_original_llava_layout_equals_llava_hf(hf_model, hf_processor, vlm, pics, tmp_path):
    root, tower = save_original_llava(tmp_path, hf_model=hf_model)
    original = VLM.from_pretrained(root, vision_tower=tower)
    assert original.config.vision.resize_mode == "pad" and original.processor.template == "llava-v1"
    assert original.model.image_token_id == vlm.model.image_token_id
    inputs = hf_inputs(hf_processor, [parts_message("Which image has more circles?", pics[:2])], pics[:2])
    expected, got = both_logits(hf_model, original, inputs)
    assert max_diff(expected, got) <= TOLERANCE


def test_original_llava_linear_projector(hf_model, tmp_path):
    root, tower = save_original_llava(tmp_path, hf_model=hf_model, projector="linear")
    original = VLM.from_pretrained(root, vision_tower=tower)
    assert original.config.projector.type == "linear"
    assert torch.equal(
        original.model.projector.linear.weight, hf_model.model.multi_modal_projector.linear_1.weight
    )


def test_original_llava_without_vision_tower_is_refused_with_the_hint(hf_model, tmp_path):
    root, _ = save_original_llava(tmp_path, hf_model=hf_model)
    with pytest.raises(ModelDirError, match="--vision-tower DIR"):
        VLM.from_pretrained(root)


# -------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "config",
    [{"model_type": "llava_next_video", "image_grid_pinpoints": [[336, 672]]},
     {"model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "anyres"}],
)  # fmt: skip
def test_anyres_checkpoints_are_refused(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="anyres"):
        VLM.from_pretrained(tmp_path)


def test_unsupported_llava_hf_options_are_listed(llava_dir, tmp_path):
    shutil.copytree(llava_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config |= {"vision_feature_layer": [-2, -5], "multimodal_projector_bias": False}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="vision_feature_layer=.*multimodal_projector_bias"):
        VLM.from_pretrained(tmp_path / "m")


def test_pickle_only_llava_hf_is_refused(llava_dir, tmp_path):
    shutil.copytree(llava_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ModelDirError, match="pickle"):
        VLM.from_pretrained(tmp_path / "m")


def test_image_token_past_the_vocabulary_is_grown_on_export(hf_model, tmp_path, pics):
    """Original LLaVA's <image> id is len(tokenizer), past the LM's rows; llava-hf needs it to be a row."""
    from transformers import LlavaForConditionalGeneration

    root, tower = save_original_llava(tmp_path, hf_model=hf_model)
    config = json.loads((root / "config.json").read_text())
    tokens = len(llama_like_tokenizer(image_token=False))
    state = _read(root)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][:tokens].contiguous()  # vocab == tokenizer: <image> lands past the LM
    save_file(state, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(config | {"vocab_size": tokens}))
    original = VLM.from_pretrained(root, vision_tower=tower)
    assert original.model.image_token_id == tokens
    exported = LlavaForConditionalGeneration.from_pretrained(
        export_hf_llava(original, out=tmp_path / "x")
    ).eval()
    batch = original.processor(
        [Sample(messages=original.processor.user_prompt("Hi", num_images=1), images=pics[:1])]
    )
    expected, got = both_logits(exported, original, batch)
    assert expected.shape[-1] == tokens + 1
    assert max_diff(expected[..., :tokens], got) <= TOLERANCE
    assert bool((expected[..., tokens] < expected[..., :tokens].max(-1).values).all())


def _read(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(root / "model.safetensors"))
