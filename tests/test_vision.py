import pytest
import torch

import tiny
from vlmkit.models.io import ModelDirError
from vlmkit.models.parts import load_vision_tower, vision_config_for
from vlmkit.models.vision import VisionEncoder


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {kind: tiny.save_vision(root / kind, kind) for kind in ("clip", "siglip", "dinov2")}


def _encoder(path, **overrides):
    tower = load_vision_tower(path)
    return VisionEncoder(config=vision_config_for(tower=tower, source=path, overrides=overrides), model=tower)


# tiny towers: 32px images, 8px patches -> 16 patches; CLIP and DINOv2 add one CLS token
@pytest.mark.parametrize(("kind", "prefix"), [("clip", 1), ("siglip", 0), ("dinov2", 1)])
def test_feature_layer_and_select(towers, kind, prefix):
    encoder = _encoder(towers[kind], feature_layer=-2, select="patch", image_size=32)
    pixels = torch.randn(2, 3, 32, 32)
    hidden = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    out = encoder(pixels)
    assert out.shape == (2, 16, 32) and encoder.num_tokens == 16
    torch.testing.assert_close(out, hidden[-2][:, prefix:])
    encoder.config.select = "full"
    encoder.config.feature_layer = 1
    assert encoder.num_tokens == 16 + prefix
    torch.testing.assert_close(encoder(pixels), hidden[1])


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_double_resolution_gives_four_times_the_tokens(towers, kind):
    encoder = _encoder(towers[kind], image_size=64)
    out = encoder(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 64, 32) and encoder.num_tokens == 64
    assert torch.isfinite(out).all()


def test_preprocessing_settings_come_from_the_checkpoint(towers):
    clip = vision_config_for(tower=load_vision_tower(towers["clip"]), source=towers["clip"], overrides={})
    siglip = vision_config_for(
        tower=load_vision_tower(towers["siglip"]), source=towers["siglip"], overrides={}
    )
    assert clip.resize_mode == "crop" and clip.image_mean[0] == pytest.approx(0.481)
    assert siglip.resize_mode == "resize" and siglip.image_mean == (0.5, 0.5, 0.5)
    assert vision_config_for(tower=load_vision_tower(towers["clip"]), source=towers["clip"],
                             overrides={"image_size": 64}).image_size == 64  # fmt: skip


def test_full_clip_checkpoint_loads_its_vision_half(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    vision = tiny.vision_config("clip").to_dict()
    config = CLIPConfig(
        vision_config=vision,
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 50},
    )  # fmt: skip
    full = CLIPModel(config)
    full.save_pretrained(tmp_path)
    tower = load_vision_tower(tmp_path)
    assert type(tower).__name__ == "CLIPVisionModel"
    torch.testing.assert_close(
        tower.get_input_embeddings().weight, full.vision_model.get_input_embeddings().weight
    )


def test_feature_layer_out_of_range(towers):
    with pytest.raises(ValueError, match="feature_layer=7 is out of range"):
        _encoder(towers["clip"], feature_layer=7)


def test_unsupported_or_missing_tower(tmp_path):
    with pytest.raises(ModelDirError, match="not found"):
        load_vision_tower(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelDirError, match="'bert' is not supported"):
        load_vision_tower(tmp_path)
