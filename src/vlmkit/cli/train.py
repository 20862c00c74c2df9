"""``vlmkit train``: fine-tune a model on LLaVA-format data (projector / LoRA / full stage).

Runs the same way as one process (``vlmkit train ...``) or many (``accelerate launch -m vlmkit
train ...`` / ``torchrun --nproc_per_node N -m vlmkit train ...``): batch sizes are per process.
Many processes use DDP, or FSDP2 with ``--fsdp`` (or an accelerate FSDP config).
Progress and the parameter table go to stderr; ``--json`` prints the run summary on stdout.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from vlmkit.cli.common import (
    CLIError,
    JsonOption,
    ModelOption,
    load_model,
    note,
    quiet_libraries,
    write_json,
)
from vlmkit.cli.schema import (
    ConfigFileOption,
    derived_command,
    derived_fields,
    flag_message,
    merge_config_file,
    option,
    values_of,
)
from vlmkit.config import ConfigError
from vlmkit.training.config import STAGE_NAMES, StageConfig, TrainConfig

# ``vlmkit plan`` takes a stage too
Stage = Enum("Stage", {name: name for name in STAGE_NAMES}, type=str)  # type: ignore[misc]

TRAIN_FIELDS = derived_fields(TrainConfig, skip=("stage",))
STAGE_FIELDS = derived_fields(StageConfig)
FIELDS = [*TRAIN_FIELDS, *STAGE_FIELDS]

RecipeOption = Annotated[
    str | None,
    typer.Option("--recipe", help="Train a new model from scratch by a named recipe (e.g. tiny-scratch)."),
]


def _train(
    *, ctx: typer.Context, model: Path | None, recipe: str | None, config: Path | None, as_json: bool,
    **values: object,
) -> None:  # fmt: skip
    """Train a model on LLaVA-format conversations and save it (plus checkpoints and metrics) to --out."""
    try:
        values = merge_config_file(values, path=config, fields=FIELDS, ctx=ctx)
        parsed = values_of(FIELDS, values)
        if recipe is not None:
            if model is not None:
                raise CLIError("--recipe trains a new model from scratch; it cannot be combined with --model")
            _run_recipe(name=recipe, data=parsed["data"], image_folder=parsed["image_folder"], out=parsed["out"],
                        eval_data=parsed["eval_data"], max_minutes=parsed["max_minutes"],
                        max_steps=parsed["max_steps"], seed=parsed["seed"], as_json=as_json)  # fmt: skip
            return
        stage = StageConfig(**{d.name: parsed[d.name] for d in STAGE_FIELDS})
        train_config = TrainConfig(stage=stage, **{d.name: parsed[d.name] for d in TRAIN_FIELDS})
        if not train_config.max_grad_norm:
            train_config.max_grad_norm = None  # 0 disables clipping
        train_config.validate()
    except ConfigError as exc:
        raise CLIError(flag_message(exc, FIELDS)) from None
    _run(train_config, model=model, as_json=as_json)


def _run(config: TrainConfig, *, model: Path | None, as_json: bool) -> None:
    from vlmkit.data.dataset import read_records
    from vlmkit.training.session import train

    _check_paths(config)
    read_records(config.data)  # a malformed record fails now, before the slow model load
    if config.eval_data is not None:
        read_records(config.eval_data)
    vlm = load_model(model)
    result = train(vlm, config=config)
    if not result.main_process:  # one summary per run, not one per process
        return
    summary = {"out": str(result.out), "steps": result.steps, "loss": result.loss, "eval_loss": result.eval_loss,
               "tokens": result.tokens, "tokens_per_s": round(result.tokens_per_s, 1),
               "elapsed_s": round(result.elapsed_s, 2), "stopped": result.stopped, "skipped": len(result.skipped),
               "truncated": result.truncated}  # fmt: skip
    if as_json:
        write_json(summary | {"skipped_ids": sorted(result.skipped)})
    else:
        note(
            f"trained {result.steps} steps, final loss {summary['loss']}, {summary['tokens_per_s']} tokens/s"
        )


train_command = derived_command(
    _train,
    fields=FIELDS,
    extra=[
        option("ctx", typer.Context),
        option("model", ModelOption, None),
        option("recipe", RecipeOption, None),
        option("config", ConfigFileOption, None),
        option("as_json", JsonOption, False),
    ],
    doc=_train.__doc__ or "",
)


def _run_recipe(
    *, name: str, data: Path, image_folder: Path | None, out: Path, eval_data: Path | None,
    max_minutes: float | None, max_steps: int | None, seed: int, as_json: bool,
) -> None:  # fmt: skip
    """``--recipe``: both stages of a from-scratch recipe; --max-minutes scales its time budget."""
    from vlmkit.data.dataset import read_records
    from vlmkit.training.recipes.tiny_scratch import Recipe, run_recipe

    quiet_libraries()
    try:
        chosen = Recipe.load(name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if not Path(data).expanduser().is_file():
        raise CLIError(f"--data {data}: file not found")
    read_records(data)
    budget = chosen.stage1["minutes"] + chosen.stage2["minutes"]
    result = run_recipe(recipe=chosen, data=data, image_folder=image_folder or Path(data).parent, out=out,
                        eval_data=eval_data, minutes_scale=(max_minutes / budget) if max_minutes else 1.0,
                        stage2_steps=max_steps, seed=seed, log=note)  # fmt: skip
    summary = {"out": str(result.out), "recipe": chosen.name, "stage1": result.stage1,
               "stage2_steps": result.stage2_steps, "loss": result.stage2_loss,
               "elapsed_s": round(result.seconds, 2), "skipped": result.skipped}  # fmt: skip
    if as_json:
        write_json(summary)
    else:
        note(f"recipe {chosen.name}: {result.stage2_steps} stage-2 steps, final loss {result.stage2_loss}")


def _check_paths(config: TrainConfig) -> None:
    """Cheap path checks before the model load: data files and image folders must exist."""
    for flag, path in (("--data", config.data), ("--eval-data", config.eval_data)):
        if path is not None and not Path(path).expanduser().is_file():
            raise CLIError(f"{flag} {path}: file not found")
    folders = (("--image-folder", config.image_folder), ("--eval-image-folder", config.eval_image_folder))
    for flag, path in folders:
        if path is not None and not Path(path).expanduser().is_dir():
            raise CLIError(f"{flag} {path}: directory not found")
