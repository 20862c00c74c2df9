"""The convolutional stem that replaces a tower's patch embedding (``models/vision/stem.py``)."""

import json

import pytest
import torch
from torch import nn

from vlmkit.api import VLM
from vlmkit.config import ConfigError, VisionConfig
from vlmkit.models.convert.export import export_hf_llava
from vlmkit.models.parts import load_vision_tower, vision_config_for
from vlmkit.models.vision import VisionEncoder
from vlmkit.models.vision.stem import ConvStem, check_stem


def _encoder(path, **overrides):
    tower = load_vision_tower(path)
    return VisionEncoder(config=vision_config_for(tower=tower, source=path, overrides=overrides), model=tower)


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_stem_replaces_the_patch_convolution_and_keeps_the_token_grid(parts, kind):
    plain = _encoder(parts[kind], image_size=32)
    stem = _encoder(parts[kind], image_size=32, conv_stem=(4, 8, 16))  # 3 stride-2 stages = the 8 px patch
    convs = [m for m in stem.model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (8, 8)]
    assert not convs and sum(isinstance(m, ConvStem) for m in stem.model.modules()) == 1
    pixels = torch.randn(2, 3, 32, 32)
    out = stem(pixels)
    assert out.shape == plain(pixels).shape == (2, 16, 32)
    assert torch.isfinite(out).all()


def test_stem_sees_local_structure_a_patch_embedding_cannot_mix(parts):
    """Pixels in one patch reach only that patch's token through a plain embedding; the stem's 3x3 convs overlap
    patch borders, so a change at one patch's edge reaches its neighbour's token too (far tokens move only a
    little, through the GroupNorm statistics)."""
    pixels = torch.randn(1, 3, 32, 32)
    changed = pixels.clone()
    changed[..., 0:8, 7] += 5.0  # the right edge column of patch (0, 0)
    deltas = []
    for stem in ((), (4, 8, 16)):
        embed = _encoder(parts["clip"], image_size=32, conv_stem=stem).model.embeddings.patch_embedding
        with torch.no_grad():
            deltas.append((embed(changed) - embed(pixels)).abs().sum(1)[0])  # [4, 4] grid
    plain, stem = deltas
    assert plain[0, 0] > 0 and plain[0, 1] == 0
    assert stem[0, 1] > 0 and stem[0, 1] > 5 * stem[3, 3]


def test_stem_round_trips_through_a_model_directory(parts, tmp_path):
    built = VLM.build(vision=parts["clip"], language=parts["llama"], conv_stem=[4, 8, 16], seed=3)
    assert built.model.config.vision.conv_stem == (4, 8, 16)
    out = built.save_pretrained(tmp_path / "model")
    assert json.loads((out / "config.json").read_text())["vision"]["conv_stem"] == [4, 8, 16]
    loaded = VLM.from_pretrained(out)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.vision(pixels), built.model.vision(pixels), rtol=0, atol=0)


def test_stem_trains_the_tower_through_its_convolutions(parts):
    stem = _encoder(parts["clip"], image_size=32, conv_stem=(4, 8, 16))
    stem.train()
    stem(torch.randn(2, 3, 32, 32)).square().mean().backward()
    first_conv = stem.model.embeddings.patch_embedding.layers[0]
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("channels", "message"),
    [((8, 16), "2 stride-2 stages, which embed 4 px patches.*patch size is 8: use 3 stages"),
     ((8, 16, 32, 64, 128, 256, 512), "1..6 positive channel counts"),
     ((8, 0, 16), "positive channel counts")],
)  # fmt: skip
def test_bad_stems_are_refused_with_the_reason(parts, channels, message):
    with pytest.raises(ValueError, match=message):
        _encoder(parts["clip"], conv_stem=channels)


def test_stem_needs_a_power_of_two_patch():
    with pytest.raises(ValueError, match="power-of-two patch size, the tower's is 14"):
        check_stem(channels=(8, 16, 32), patch_size=14)


def test_config_rejects_non_positive_stem_widths():
    config = VisionConfig(hf_config={"model_type": "clip_vision_model"}, conv_stem=(8, -1))
    with pytest.raises(ConfigError, match="vision.conv_stem"):
        config.validate()


def test_export_to_llava_hf_names_the_stem(parts, tmp_path):
    built = VLM.build(vision=parts["clip"], language=parts["llama"], conv_stem=(4, 8, 16))
    with pytest.raises(ValueError, match="convolutional stem"):
        export_hf_llava(built, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
