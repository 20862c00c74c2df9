"""open_clip and timm towers: vlmkit's read-out equals the library's own forward on the same tiny random weights."""

from __future__ import annotations

import sys

import pytest
import torch

import libtowers
from vlmkit.api import VLM
from vlmkit.models.io import ModelDirError
from vlmkit.models.vision import LibraryVisionEncoder, load_vision

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = (-1, -2, 1, 0)  # last, penultimate (LLaVA's), first block, and the embeddings


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib-towers")
    return {"open_clip": libtowers.save_open_clip(root / "open_clip"),
            "timm": libtowers.save_timm(root / "timm", kind="vit"),
            "eva": libtowers.save_timm(root / "eva", kind="eva"),
            "open_clip_timm": libtowers.save_open_clip_timm(root / "open_clip_timm")}  # fmt: skip


def _oracle_open_clip(directory, x, *, index):
    """The library's own loader and forward: hidden state ``index`` with the class token first."""
    open_clip = libtowers.require("open_clip")
    visual = open_clip.create_model(f"local-dir:{directory}").visual.eval()
    if index == 0:
        return visual._embeds(x)
    out = visual.forward_intermediates(x, indices=[index - 1], intermediates_only=True, output_fmt="NLC",
                                       output_extra_tokens=True)  # fmt: skip
    return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)


def _oracle_timm(directory, x, *, index):
    if (directory / "open_clip_config.json").exists():  # open_clip's tower on a timm trunk: read the trunk
        open_clip = libtowers.require("open_clip")
        model = open_clip.create_model(f"local-dir:{directory}").visual.trunk.eval()
    else:
        timm = libtowers.require("timm")
        model = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    if index == 0:  # the input of the first block, from the library's forward
        seen = []
        hook = model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        model.forward_features(x)
        hook.remove()
        return seen[0]
    spatial, prefix = model.forward_intermediates(x, indices=[index - 1], return_prefix_tokens=True,
                                                  intermediates_only=True, output_fmt="NLC")[0]  # fmt: skip
    return torch.cat([prefix, spatial], dim=1)


@pytest.mark.parametrize("kind", ["open_clip", "timm", "eva", "open_clip_timm"])
@pytest.mark.parametrize("layer", LAYERS)
def test_features_equal_library_forward(towers, kind, layer):
    directory = towers[kind]
    full = load_vision(
        str(directory), dtype=None, overrides={"feature_layer": layer, "select": "full"}
    ).eval()
    patch = load_vision(
        str(directory), dtype=None, overrides={"feature_layer": layer, "select": "patch"}
    ).eval()
    assert isinstance(full, LibraryVisionEncoder)
    size = full.config.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    index = layer if layer >= 0 else len(full._blocks()) + 1 + layer
    oracle = (_oracle_open_clip if kind == "open_clip" else _oracle_timm)(directory, x, index=index)
    with torch.no_grad():
        got_full, got_patch = full(x), patch(x)
    assert got_full.shape == oracle.shape and got_full.shape[1] == full.num_tokens
    assert (got_full - oracle).abs().max() <= 1e-6
    assert torch.equal(got_patch, got_full[:, full.num_prefix :]) and got_patch.shape[1] == patch.num_tokens


def test_preprocessing_follows_each_tower(towers):
    clip = load_vision(str(towers["open_clip"]), dtype=None, overrides={})
    vit = load_vision(str(towers["timm"]), dtype=None, overrides={})
    eva = load_vision(f"timm:{towers['eva']}", dtype=None, overrides={})
    pre = libtowers.OPEN_CLIP_PRE
    assert clip.config.image_mean == tuple(pre["mean"]) and clip.config.image_std == tuple(pre["std"])
    assert clip.config.resize_mode == "resize" and clip.config.image_size == 32  # open_clip "squash"
    assert vit.config.image_mean == (0.5, 0.5, 0.5) and vit.num_prefix == 3  # class + 2 register tokens
    assert eva.config.image_size == 28 and eva.num_tokens == 16


def test_vlm_with_library_towers_round_trips(towers, parts, tmp_path, images):
    for kind, spec in (("open_clip", f"open_clip:{towers['open_clip']}"), ("timm", str(towers["timm"]))):
        vlm = VLM.build(vision=spec, language=parts["llama"], projector="mlp")
        processor = vlm.processor.image_processor
        assert tuple(processor.to_dict()["image_mean"]) == vlm.config.vision.image_mean
        assert vlm.info()["vision"].startswith(f"{kind}:") and vlm.model.num_image_tokens == 16
        answer = vlm.ask("What is it?", images=[images[0]], max_new_tokens=4)
        loaded = VLM.from_pretrained(vlm.save_pretrained(tmp_path / kind))
        assert loaded.ask("What is it?", images=[images[0]], max_new_tokens=4) == answer
        for a, b in zip(vlm.model.state_dict().values(), loaded.model.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_missing_extra_names_the_pip_command(towers, parts, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    with pytest.raises(ModelDirError, match=r"pip install 'vlmkit\[open_clip\]'"):
        VLM.build(vision=towers["open_clip"], language=parts["llama"])
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ModelDirError, match=r"pip install 'vlmkit\[timm\]'"):
        load_vision(f"timm:{towers['timm']}", dtype=None, overrides={})


def test_bad_tower_directories_are_refused(towers, tmp_path):
    with pytest.raises(ModelDirError, match="not a timm tower"):
        load_vision(f"timm:{towers['open_clip']}", dtype=None, overrides={})
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "open_clip_config.json").write_text(
        (towers["open_clip"] / "open_clip_config.json").read_text()
    )
    (pickled / "open_clip_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelDirError, match="never unpickles"):
        load_vision(str(pickled), dtype=None, overrides={})
    with pytest.raises(ValueError, match="native square size"):
        load_vision(str(towers["timm"]), dtype=None, overrides={"image_size": 64})
    with pytest.raises(ValueError, match="out of range"):
        load_vision(str(towers["timm"]), dtype=None, overrides={"feature_layer": 9})


def test_open_clip_model_name_and_weights_file(towers, tmp_path):
    """``open_clip:NAME@FILE``: a config from open_clip's registry (here one added the library's way) + weights."""
    import json

    open_clip = libtowers.require("open_clip")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "vlmkit-test-tiny.json").write_text(json.dumps(libtowers.OPEN_CLIP_CFG))
    open_clip.add_model_config(tmp_path / "configs")
    weights = towers["open_clip"] / "open_clip_model.safetensors"
    named = load_vision(f"open_clip:vlmkit-test-tiny@{weights}", dtype=None, overrides={}).eval()
    from_dir = load_vision(str(towers["open_clip"]), dtype=None, overrides={}).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(named(x), from_dir(x))
    with pytest.raises(ModelDirError, match="no model config named"):
        load_vision(f"open_clip:no-such-model@{weights}", dtype=None, overrides={})
    with pytest.raises(ModelDirError, match="never unpickles"):
        load_vision(f"open_clip:vlmkit-test-tiny@{tmp_path / 'w.bin'}", dtype=None, overrides={})
