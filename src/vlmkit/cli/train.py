"""``vlmkit train``: fine-tune a model on LLaVA-format data (projector / LoRA / full stage).

Runs the same way as one process (``vlmkit train ...``) or many (``accelerate launch -m vlmkit
train ...`` / ``torchrun --nproc_per_node N -m vlmkit train ...``): batch sizes are per process.
Many processes use DDP, or FSDP2 with ``--fsdp`` (or an accelerate FSDP config).
Progress and the parameter table go to stderr; ``--json`` prints the run summary on stdout.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vlmkit.cli.common import (
    CLIError,
    ImageFolderOption,
    JsonOption,
    ModelOption,
    load_model,
    note,
    quiet_libraries,
    write_json,
)

if TYPE_CHECKING:
    from vlmkit.training.config import TrainConfig


class Stage(str, Enum):
    projector = "projector"
    lora = "lora"
    full = "full"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16_mixed = "bf16-mixed"
    bf16 = "bf16"


def train_command(
    data: Annotated[Path, typer.Option("--data", help="LLaVA-format JSON array or JSONL file.")],
    out: Annotated[Path, typer.Option("--out", help="Output dir: the trained model, checkpoints, metrics.")],
    image_folder: ImageFolderOption = None,
    model: ModelOption = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe", help="Train a new model from scratch by a named recipe (e.g. tiny-scratch)."
        ),
    ] = None,
    stage: Annotated[
        Stage, typer.Option("--stage", help="What trains: projector, lora or full.")
    ] = Stage.projector,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Optimizer steps (default: --epochs).")
    ] = None,
    epochs: Annotated[
        float, typer.Option("--epochs", min=0.0, help="Passes over the data without --max-steps.")
    ] = 1.0,
    max_minutes: Annotated[
        float | None,
        typer.Option("--max-minutes", min=0.0, help="Stop, checkpoint and save after this long."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint.")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Micro-batch per process.")] = 4,
    grad_accum: Annotated[
        int, typer.Option("--grad-accum", min=1, help="Micro-batches per optimizer step.")
    ] = 1,
    lr: Annotated[
        float | None, typer.Option("--lr", min=0.0, help="Base learning rate (default: per stage).")
    ] = None,
    warmup_ratio: Annotated[
        float, typer.Option("--warmup-ratio", min=0.0, max=0.99, help="Warmup share.")
    ] = 0.03,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 0.0,
    max_grad_norm: Annotated[
        float, typer.Option("--max-grad-norm", min=0.0, help="0 disables clipping.")
    ] = 1.0,
    grad_ckpt: Annotated[
        bool, typer.Option("--grad-ckpt", help="Gradient checkpointing (less memory).")
    ] = False,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=1)] = 128,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", min=1)] = 256,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", min=0.0, max=1.0)] = 0.05,
    lora_vision: Annotated[bool, typer.Option("--lora-vision", help="LoRA on the vision tower too.")] = False,
    freeze_vision: Annotated[
        bool, typer.Option("--freeze-vision/--train-vision", help="Full stage: keep the tower frozen.")
    ] = True,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Held-out file for eval loss.")
    ] = None,
    eval_image_folder: Annotated[Path | None, typer.Option("--eval-image-folder")] = None,
    eval_every: Annotated[
        int, typer.Option("--eval-every", min=0, help="Steps between evals (0: at end).")
    ] = 0,
    save_every: Annotated[int, typer.Option("--save-every", min=0, help="Steps between checkpoints.")] = 0,
    keep_last: Annotated[int, typer.Option("--keep-last", min=1, help="Checkpoints to keep.")] = 2,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="Steps per metrics.jsonl line.")] = 1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    precision: Annotated[
        Precision, typer.Option("--precision", help="auto: bf16-mixed on GPU, fp32 on CPU.")
    ] = Precision.auto,
    feature_cache: Annotated[
        bool, typer.Option("--feature-cache/--no-feature-cache", help="Cache frozen vision features on disk.")
    ] = True,
    feature_cache_dir: Annotated[
        Path | None, typer.Option("--feature-cache-dir", help="Default: OUT/feature_cache.")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes.")] = 0,
    max_length: Annotated[
        int | None, typer.Option("--max-length", min=8, help="Skip longer samples.")
    ] = None,
    where_weight: Annotated[
        float,
        typer.Option(
            "--where-weight",
            min=0.0,
            help="Also teach each image token its row and column on the patch grid, at this weight.",
        ),
    ] = 0.0,
    cpu: Annotated[bool, typer.Option("--cpu", help="Train on CPU even when a GPU is present.")] = False,
    fsdp: Annotated[
        bool,
        typer.Option("--fsdp", help="Shard weights, grads and optimizer state (FSDP2) across processes."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Train a model on LLaVA-format conversations and save it (plus checkpoints and metrics) to --out."""
    from vlmkit.data.dataset import read_records
    from vlmkit.training.config import TrainConfig
    from vlmkit.training.session import train
    from vlmkit.training.stages import StageConfig

    if recipe is not None:
        if model is not None:
            raise CLIError("--recipe trains a new model from scratch; it cannot be combined with --model")
        _run_recipe(name=recipe, data=data, image_folder=image_folder, out=out, eval_data=eval_data,
                    max_minutes=max_minutes, max_steps=max_steps, seed=seed, as_json=as_json)  # fmt: skip
        return
    stage_config = StageConfig(stage=stage.value, freeze_vision=freeze_vision, lora_vision=lora_vision, lora_rank=lora_rank,
                               lora_alpha=lora_alpha, lora_dropout=lora_dropout, lr=lr)  # fmt: skip
    stage_config.validate()
    config = TrainConfig(
        data=data, out=out, image_folder=image_folder, stage=stage_config, batch_size=batch_size, grad_accum=grad_accum,
        max_steps=max_steps, epochs=epochs, max_minutes=max_minutes, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm or None, grad_ckpt=grad_ckpt, precision=precision.value,
        eval_data=eval_data, eval_image_folder=eval_image_folder, eval_every=eval_every, save_every=save_every,
        keep_last=keep_last, log_every=log_every, seed=seed, resume=resume, feature_cache=feature_cache,
        feature_cache_dir=feature_cache_dir, workers=workers, max_length=max_length, cpu=cpu, fsdp=fsdp,
        where_weight=where_weight,
    )  # fmt: skip
    config.validate()
    _check_paths(config)
    read_records(data)  # a malformed record fails now, before the slow model load
    if eval_data is not None:
        read_records(eval_data)
    vlm = load_model(model)
    result = train(vlm, config=config)
    if not result.main_process:  # one summary per run, not one per process
        return
    summary = {"out": str(result.out), "steps": result.steps, "loss": result.loss, "eval_loss": result.eval_loss,
               "tokens": result.tokens, "tokens_per_s": round(result.tokens_per_s, 1),
               "elapsed_s": round(result.elapsed_s, 2), "stopped": result.stopped, "skipped": len(result.skipped)}  # fmt: skip
    if as_json:
        write_json(summary | {"skipped_ids": sorted(result.skipped)})
    else:
        note(
            f"trained {result.steps} steps, final loss {summary['loss']}, {summary['tokens_per_s']} tokens/s"
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
    for option, path in (("--data", config.data), ("--eval-data", config.eval_data)):
        if path is not None and not Path(path).expanduser().is_file():
            raise CLIError(f"{option} {path}: file not found")
    folders = (("--image-folder", config.image_folder), ("--eval-image-folder", config.eval_image_folder))
    for option, path in folders:
        if path is not None and not Path(path).expanduser().is_dir():
            raise CLIError(f"{option} {path}: directory not found")
