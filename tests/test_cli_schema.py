"""``vlmkit train``'s options are derived from the training config's fields: every field is reachable with the
same default, ``--config FILE`` fills what the command line leaves out, and errors name the flag."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from vlmkit.cli.main import VlmkitGroup
from vlmkit.cli.train import FIELDS, STAGE_FIELDS, TRAIN_FIELDS
from vlmkit.config import ConfigError
from vlmkit.training.config import StageConfig, TrainConfig


@pytest.fixture
def record(monkeypatch):
    import vlmkit.cli.train as train_cli

    seen: list[TrainConfig] = []
    monkeypatch.setattr(train_cli, "_run", lambda config, **_: seen.append(config))
    app = typer.Typer(cls=VlmkitGroup, add_completion=False)
    app.command("train")(train_cli.train_command)
    app.command("noop")(lambda: None)

    def invoke(*args: object):
        return CliRunner().invoke(app, ["train", *map(str, args)]), seen

    return invoke


def test_every_config_field_is_an_option_with_the_same_default() -> None:
    command = get_command(_app())
    params = {p.name: p for p in command.commands["train"].params}  # type: ignore[attr-defined]
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"stage"}
    names |= {f.name for f in dataclasses.fields(StageConfig)}
    assert names == {d.name for d in FIELDS}, "a config field without a setting() declaration"
    defaults = TrainConfig(data=Path("d"), out=Path("o"))
    for derived in TRAIN_FIELDS + STAGE_FIELDS:
        owner = defaults.stage if derived in STAGE_FIELDS else defaults
        expected = getattr(owner, derived.name)
        param = params[derived.name]
        if derived.name in ("data", "out"):
            assert (
                param.default is None and "required" in param.help
            )  # or from --config: checked after merging
            continue
        default = param.default if not isinstance(expected, dict) else (param.default or {})
        assert default == expected, derived.name
        assert param.help.startswith(derived.field.metadata["doc"])


def _app() -> typer.Typer:
    from vlmkit.cli.train import train_command

    app = typer.Typer(cls=VlmkitGroup, add_completion=False)
    app.command("train")(train_command)
    app.command("noop")(lambda: None)
    return app


def test_flags_reach_the_config(record, tmp_path) -> None:
    result, seen = record("--data", "d.json", "--out", tmp_path / "o", "--stage", "lora", "--lora-rank", 8,
                          "--lr-scale", "projector=0.5", "--no-shuffle", "--max-grad-norm", 0, "--batch-size", 3)  # fmt: skip
    assert result.exit_code == 0, result.output
    config = seen[0]
    assert (config.stage.stage, config.stage.lora_rank, config.stage.lr_scales) == (
        "lora",
        8,
        {"projector": 0.5},
    )
    assert config.shuffle is False and config.max_grad_norm is None and config.batch_size == 3


def test_config_file_fills_what_the_command_line_leaves_out(record, tmp_path) -> None:
    recipe = tmp_path / "recipes" / "mine.json"
    recipe.parent.mkdir()
    recipe.write_text(json.dumps({"data": "train.jsonl", "batch_size": 16, "stage": "full", "freeze_vision": False,
                                  "lr_scales": {"vision": 0.05}, "max_steps": 7}))  # fmt: skip
    result, seen = record("--config", recipe, "--out", tmp_path / "o", "--batch-size", 2)
    assert result.exit_code == 0, result.output
    config = seen[0]
    assert config.data == recipe.parent / "train.jsonl"  # relative to the file
    assert config.batch_size == 2  # the command line wins
    assert (config.max_steps, config.stage.stage, config.stage.freeze_vision) == (7, "full", False)
    assert config.stage.lr_scales == {"vision": 0.05}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"batch_sise": 4}, "unknown option(s) ['batch_sise']"),
        ({"batch_size": 0}, "bad.json: batch_size: 0 is out of range (must be >= 1)"),
        ({"batch_size": "four"}, "bad.json: batch_size: 'four' is not a valid value"),
        ({"stage": "everything"}, "bad.json: stage: 'everything' is not one of projector, lora, full"),
        ({"warmup_ratio": 1.5}, "warmup_ratio: 1.5 is out of range (must be >= 0.0 and <= 0.99)"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_config_file_is_one_clear_error(record, tmp_path, content, message) -> None:
    recipe = tmp_path / "bad.json"
    recipe.write_text(json.dumps(content))
    result, seen = record("--config", recipe, "--data", "d.json", "--out", tmp_path / "o")
    assert result.exit_code == 2 and not seen
    assert (
        result.stderr.startswith("error: ") and message in result.stderr and "Traceback" not in result.output
    )


def test_library_errors_name_fields_and_the_cli_shows_flags(record, tmp_path) -> None:
    with pytest.raises(ConfigError) as caught:
        StageConfig(stage="projector", lora_vision=True).validate()
    assert caught.value.field == "lora_vision" and "--" not in str(caught.value)
    result, seen = record("--data", "d.json", "--out", tmp_path / "o", "--lora-vision")
    assert result.exit_code == 2 and not seen
    assert result.stderr.startswith("error: --lora-vision: lora_vision only applies to stage 'lora'")
    result, _ = record("--out", tmp_path / "o")
    assert (
        result.exit_code == 2
        and "missing option --data (on the command line or in --config)" in result.stderr
    )
    result, _ = record("--data", "d.json", "--out", tmp_path / "o", "--lr-scale", "vision")
    assert result.exit_code == 2 and "--lr-scale 'vision': expected KEY=NUMBER" in result.stderr


def test_build_options_are_the_build_command_and_match_vlm_build() -> None:
    """``vlmkit build``'s options are BuildOptions' fields; their defaults are VLM.build's."""
    import inspect

    from vlmkit.api import VLM
    from vlmkit.cli.build import build_command
    from vlmkit.models.options import BuildOptions

    app = typer.Typer(cls=VlmkitGroup, add_completion=False)
    app.command("build")(build_command)
    app.command("noop")(lambda: None)
    params = {p.name: p for p in get_command(app).commands["build"].params}  # type: ignore[attr-defined]
    fields = {f.name: f for f in dataclasses.fields(BuildOptions)}
    assert set(fields) <= set(params)
    for name, f in fields.items():
        if f.default is dataclasses.MISSING:
            assert params[name].default is None and "required" in params[name].help
        else:
            assert params[name].default == f.default, name
    kwargs = BuildOptions(vision="v", language="l").build_kwargs()
    signature = inspect.signature(VLM.build).parameters
    assert set(kwargs) <= set(signature)
    for name in ("feature_layer", "select", "image_size", "resize_mode", "template", "system", "seed"):
        assert kwargs[name] == signature[name].default, name
    assert kwargs["resolution"] == signature["resolution"].default and kwargs["tiling"] is None


def test_build_tiling_options_map_to_vlm_build() -> None:
    from vlmkit.models.options import BuildOptions

    tiled = BuildOptions(vision="v", language="l", anyres=True, grid_pinpoints="32x64, 64x32", unpad=False)
    assert tiled.build_kwargs()["tiling"] == {"grid_pinpoints": [[32, 64], [64, 32]], "max_tiles": None,
                                              "max_tile_tokens": None, "unpad": False, "image_newline": True,
                                              "multi_image_base_only": False}  # fmt: skip
    assert BuildOptions(vision="v", language="l", anyres=True).build_kwargs()["tiling"]["max_tiles"] == 4
    for bad, field in ((dict(max_tiles=2), "max_tiles"), (dict(anyres=True, max_tiles=2, grid_pinpoints="32x32"),
                       "grid_pinpoints"), (dict(anyres=True, grid_pinpoints="32x"), "grid_pinpoints")):  # fmt: skip
        with pytest.raises(ConfigError) as caught:
            BuildOptions(vision="v", language="l", **bad).build_kwargs()
        assert caught.value.field == field
