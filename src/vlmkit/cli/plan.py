"""``vlmkit plan``: estimated training memory per stage, from the parts' configs alone (no weights loaded)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from vlmkit.cli.common import CLIError, JsonOption, Quantize, quiet_libraries, write_json
from vlmkit.cli.schema import flag_message
from vlmkit.cli.train import STAGE_FIELDS, Stage
from vlmkit.config import ConfigError


class PlanDType(str, Enum):
    bf16 = "bf16"
    bf16_mixed = "bf16-mixed"
    fp32 = "fp32"


def plan_command(
    vision: Annotated[str, typer.Option("--vision", help="Vision tower dir (or hub id when online).")],
    language: Annotated[str, typer.Option("--language", help="Causal LM dir (or hub id when online).")],
    stage: Annotated[Stage, typer.Option("--stage", help="projector, lora or full.")] = Stage["projector"],
    batch: Annotated[int, typer.Option("--batch", min=1, help="Sequences per step per GPU.")] = 8,
    seq: Annotated[
        int | None,
        typer.Option(
            "--seq", min=1, help="Tokens per sequence, image tokens included (default: images + 256)."
        ),
    ] = None,
    grad_ckpt: Annotated[bool, typer.Option("--grad-ckpt", help="Gradient checkpointing.")] = False,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=1)] = 128,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", min=0.0, max=1.0)] = 0.05,
    lora_vision: Annotated[bool, typer.Option("--lora-vision", help="LoRA on the vision tower too.")] = False,
    freeze_vision: Annotated[
        bool, typer.Option("--freeze-vision/--train-vision", help="Full stage only.")
    ] = True,
    dtype: Annotated[
        PlanDType,
        typer.Option("--dtype", help="bf16: weights+AdamW in bf16; bf16-mixed: fp32 weights, bf16 autocast."),
    ] = PlanDType.bf16,
    projector: Annotated[str, typer.Option("--projector", help="Projector type.")] = "mlp",
    image_size: Annotated[
        int | None, typer.Option("--image-size", min=1, help="Default: the tower's own.")
    ] = None,
    images: Annotated[int, typer.Option("--images", min=0, help="Images per sequence.")] = 1,
    anyres: Annotated[
        bool, typer.Option("--anyres", help="AnyRes tiling: plan for images at their largest token count.")
    ] = False,
    max_tiles: Annotated[int, typer.Option("--max-tiles", min=1, max=64, help="AnyRes: most tiles.")] = 4,
    max_tile_tokens: Annotated[
        int | None, typer.Option("--max-tile-tokens", min=1, help="AnyRes: OneVision's token cap in tiles.")
    ] = None,
    quantize: Annotated[
        Quantize | None,
        typer.Option("--quantize", help="QLoRA (lora stage): the base LM's linear layers quantized."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Estimate parameters, gradients, optimizer state, activations and peak memory for one training stage."""
    quiet_libraries()
    from rich.console import Console

    from vlmkit.training.plan import anyres_shape, plan_memory, shape_from_dirs, table
    from vlmkit.training.stages import StageConfig

    stage_config = StageConfig(stage=stage.value, lora_rank=lora_rank, lora_dropout=lora_dropout,
                               lora_vision=lora_vision, freeze_vision=freeze_vision,
                               quantize=quantize.value if quantize is not None else None)  # fmt: skip
    try:
        stage_config.validate()
    except ConfigError as exc:
        raise CLIError(flag_message(exc, STAGE_FIELDS)) from None
    shape = shape_from_dirs(vision=vision, language=language, projector=projector, image_size=image_size)
    if anyres:
        shape = anyres_shape(shape, max_tiles=max_tiles, max_tile_tokens=max_tile_tokens)
    length = seq if seq is not None else images * shape.image_tokens + 256
    plan = plan_memory(shape, stage=stage_config, batch=batch, seq=length, grad_ckpt=grad_ckpt, dtype=dtype.value,
                       images_per_sample=images)  # fmt: skip
    if as_json:
        write_json(plan.to_dict())
        return
    title = (f"stage {stage.value}{f' ({quantize.value} base)' if quantize else ''}, batch {batch} x {length} tokens, {dtype.value}"
             f"{', grad ckpt' if grad_ckpt else ''}: estimated memory per GPU (GB = 1e9 bytes)")  # fmt: skip
    Console().print(table(plan, title=title))
