"""Fused towers (features concatenated per patch on one grid) and the CLI for every tower kind."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import libtowers
import tiny
from conftest import make_image
from vlmkit.api import VLM
from vlmkit.cli.main import app
from vlmkit.config import ConfigError, VisionConfig
from vlmkit.models.vision import FusedVisionEncoder, load_vision
from vlmkit.processing.image import ImageProcessor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused-towers")
    return {
        "clip": tiny.save_vision(root / "clip", "clip"),  # 32 px / 8: a 4 x 4 grid, CLIP mean/std, crop
        "siglip4": tiny.save_vision(root / "siglip4", "siglip", patch_size=4),
    }  # 8 x 8 grid, 0.5 mean/std


def _own_features(path, image, *, pool_to: int):
    """A tower alone, with its own preprocessing, area-pooled to ``pool_to`` x ``pool_to``."""
    encoder = load_vision(str(path), dtype=None, overrides={}).eval()
    pixels = ImageProcessor.from_vision_config(encoder.config)([image])
    with torch.no_grad():
        features = encoder(pixels)  # [1, side * side, dim]
    side = int(features.shape[1] ** 0.5)
    square = features.transpose(1, 2).reshape(1, -1, side, side)
    return F.adaptive_avg_pool2d(square, pool_to).flatten(2).transpose(1, 2)


def test_fused_equals_each_tower_on_its_own_preprocessing(towers):
    fused = load_vision([towers["clip"], towers["siglip4"]], dtype=None, overrides={}).eval()
    assert isinstance(fused, FusedVisionEncoder) and fused.num_tokens == 16 and fused.hidden_size == 64
    image = make_image(seed=5, size=(48, 48))  # square: crop and resize see the same pixels
    with torch.no_grad():
        got = fused(ImageProcessor.from_vision_config(fused.config)([image]))
    expected = torch.cat([_own_features(towers["clip"], image, pool_to=4),
                          _own_features(towers["siglip4"], image, pool_to=4)], dim=-1)  # fmt: skip
    assert got.shape == expected.shape == (1, 16, 64)
    assert (got - expected).abs().max() <= 1e-5


def test_fused_vlm_round_trips_and_names_its_parts(towers, parts, tmp_path, images):
    as_list = VLM.build(vision=[towers["clip"], towers["siglip4"]], language=parts["llama"], projector="mlp")
    as_text = VLM.build(
        vision=f"{towers['clip']},{towers['siglip4']}", language=parts["llama"], projector="mlp"
    )
    assert as_list.config.to_dict() == as_text.config.to_dict()
    assert as_list.info()["vision"] == "fused(clip_vision_model + siglip_vision_model)"
    answer = as_list.ask("What is it?", images=[images[1]], max_new_tokens=5)
    loaded = VLM.from_pretrained(as_list.save_pretrained(tmp_path / "fused"))
    assert loaded.ask("What is it?", images=[images[1]], max_new_tokens=5) == answer
    assert loaded.model.state_dict().keys() == as_list.model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(),
                                                 as_list.model.state_dict().values(), strict=True))  # fmt: skip


def test_fused_across_libraries(towers, parts, tmp_path):
    timm_dir = libtowers.save_timm(tmp_path / "timm", kind="vit")
    vlm = VLM.build(
        vision=[towers["clip"], f"timm:{timm_dir}"], language=parts["llama"], projector="pixel-shuffle"
    )
    assert vlm.model.vision.hidden_size == 64 and vlm.model.num_image_tokens == 4
    assert vlm.info()["vision"] == "fused(clip_vision_model + timm:vit_tiny_patch16_224)"


def test_fused_refuses_what_it_cannot_do(towers):
    with pytest.raises(ValueError, match="patch tokens only"):
        load_vision([towers["clip"], towers["siglip4"]], dtype=None, overrides={"select": "full"})
    member = load_vision(str(towers["clip"]), dtype=None, overrides={}).config
    with pytest.raises(ConfigError, match="at least two"):
        VisionConfig(hf_config={"model_type": "fused"}, towers=(member,)).validate()


@pytest.mark.slow
def test_fused_tower_trains_and_round_trips(towers, parts, tmp_path):
    from test_projectors_new import colour_data, train_and_round_trip

    vlm = VLM.build(vision=[towers["clip"], towers["siglip4"]], language=parts["llama"], projector="mlp")
    before, after, _loaded = train_and_round_trip(vlm, colour_data(tmp_path), tmp_path / "out")
    assert after < 0.2 * before, (before, after)


# --------------------------------------------------------------------------------------------------- CLI


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_build_info_plan_with_fused_and_library_towers(towers, parts, tmp_path):
    open_clip_dir = libtowers.save_open_clip(tmp_path / "oc")
    vision = f"{towers['clip']},open_clip:{open_clip_dir}"
    out = tmp_path / "model"
    result = run("build", "--vision", vision, "--language", parts["llama"], "--projector", "pixel-shuffle",
                 "--shuffle-factor", "2", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    info = run("info", "--model", out, "--json")
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["vision"].startswith("fused(clip_vision_model + open_clip:") and data["image_tokens"] == 4
    plan = run("plan", "--vision", vision, "--language", parts["llama"], "--stage", "projector",
               "--projector", "cross-attn", "--json")  # fmt: skip
    assert plan.exit_code == 0, plan.output
    model = VLM.from_pretrained(out).model
    assert json.loads(plan.stdout)["params"]["vision"]["frozen"] == sum(
        p.numel() for p in model.vision.parameters()
    )


def test_cli_missing_extra_is_one_error_line(towers, parts, tmp_path, monkeypatch):
    open_clip_dir = libtowers.save_open_clip(tmp_path / "oc")
    monkeypatch.setitem(sys.modules, "open_clip", None)
    result = run("build", "--vision", f"open_clip:{open_clip_dir}", "--language", parts["llama"],
                 "--projector", "mlp", "--out", tmp_path / "m")  # fmt: skip
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "pip install 'vlmkit[open_clip]'" in lines[0]
