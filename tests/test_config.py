import json

import pytest

from vlmkit.config import ConfigError, LanguageConfig, ProjectorConfig, VisionConfig, VLMConfig


def _config() -> VLMConfig:
    return VLMConfig(
        vision=VisionConfig(hf_config={"model_type": "clip_vision_model", "hidden_size": 32}, image_size=336),
        projector=ProjectorConfig(type="resampler", num_queries=16),
        language=LanguageConfig(hf_config={"model_type": "llama"}),
    )


def test_round_trip_through_json(tmp_path):
    config = _config()
    config.to_json(tmp_path / "config.json")
    loaded = VLMConfig.from_json(tmp_path / "config.json")
    assert loaded == config
    assert isinstance(loaded.vision.image_mean, tuple)
    assert json.loads((tmp_path / "config.json").read_text())["vlmkit_version"] == 1


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"vision": {"colour": 1}}, "vision.colour"),
        ({"bogus": 1}, "bogus"),
        ({"vision": {"select": "cls"}}, "vision.select"),
        ({"vision": {"resize_mode": "stretch"}}, "vision.resize_mode"),
        ({"vision": {"image_size": "224"}}, "vision.image_size"),
        ({"vision": {"image_size": True}}, "vision.image_size"),
        ({"vision": {"image_std": [0.5, 0.5]}}, "vision.image_std"),
        ({"projector": {"depth": 0}}, "projector.depth"),
        ({"projector": "mlp"}, "projector"),
        ({"language": {"hf_config": {}}}, "language.hf_config"),
        ({"vlmkit_version": 99}, "vlmkit_version"),
    ],
)
def test_invalid_field_is_named(patch, field):
    data = _config().to_dict()
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    with pytest.raises(ConfigError, match=f"'{field}'"):
        VLMConfig.from_dict(data)


def test_bad_json_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        VLMConfig.from_json(tmp_path / "config.json")


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, vlmkit.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
