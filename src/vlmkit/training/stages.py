"""Training stages: which parameter groups train and at what learning rate, declared in one place.

=========  =====================================================  ========  ===========================
stage      trains                                                 base LR   group LR = base x scale
=========  =====================================================  ========  ===========================
projector  projector (vision tower and LM frozen; LLaVA stage 1)  1e-3      projector 1
lora       LoRA on every LM attention/MLP linear + projector      2e-4      lora 1, projector 0.1,
           (+ LoRA on the vision tower with ``lora_vision``)                vision_lora 1
full       LM + projector (+ vision tower unless frozen)          2e-5      language 1, projector 1,
                                                                            vision 0.1
=========  =====================================================  ========  ===========================

The defaults follow LLaVA-1.5 (projector pre-training 1e-3; LoRA 2e-4 with the projector at 2e-5; full
fine-tuning 2e-5) and LLaVA-NeXT (an unfrozen tower at a tenth of the LM's rate).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.training.config import GROUP_ORDER, StageConfig


def group_of(name: str) -> str:
    """The group of a parameter of ``VisionLanguageModel`` by its name."""
    lora = ".lora_" in name
    if name.startswith("vision."):
        return "vision_lora" if lora else "vision"
    if name.startswith(("projector.", "tiling.")):  # AnyRes' image_newline is part of the connector
        return "projector"
    return "lora" if lora else "language"


def apply_stage(model: VisionLanguageModel, config: StageConfig) -> list[dict[str, Any]]:
    """Add adapters if the stage needs them, freeze everything else; -> AdamW param groups (with ``name``)."""
    from vlmkit.training.lora import add_lora

    config.validate()
    if config.stage == "lora" and not has_lora(model):
        add_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                 vision=config.lora_vision)  # fmt: skip
    lrs = config.trainable_groups()
    for name, param in model.named_parameters():
        param.requires_grad_(group_of(name) in lrs)
    if config.vision_frozen:
        model.vision.eval()  # a frozen tower also gets no dropout, so its features are reproducible
    return param_groups(model, config=config)


def param_groups(model: nn.Module, *, config: StageConfig) -> list[dict[str, Any]]:
    """AdamW param groups (with ``name``) of the trainable parameters of a stage-prepared model.

    Called again after FSDP sharding, which replaces every sharded parameter by a new (DTensor) one.
    """
    lrs = config.trainable_groups()
    grouped: dict[str, list[nn.Parameter]] = {group: [] for group in lrs}
    for name, param in iter_trainable(model):
        grouped[group_of(name)].append(param)
    return [
        {"name": group, "params": grouped[group], "lr": lr} for group, lr in lrs.items() if grouped[group]
    ]


def has_lora(model: nn.Module) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())


def iter_trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """group -> {"trainable": n, "frozen": n} over every parameter group present in the model."""
    counts = {group: {"trainable": 0, "frozen": 0} for group in GROUP_ORDER}
    for name, param in model.named_parameters():
        counts[group_of(name)]["trainable" if param.requires_grad else "frozen"] += param.numel()
    return {group: c for group, c in counts.items() if c["trainable"] or c["frozen"]}


def parameter_table(model: nn.Module, *, param_groups: list[dict[str, Any]], title: str) -> Any:
    """A rich table of trainable and frozen parameter counts per group, with each group's learning rate."""
    from rich.table import Table

    lrs = {group["name"]: group["lr"] for group in param_groups}
    table = Table(title=title, title_justify="left")
    for column in ("group", "trainable", "frozen", "lr"):
        table.add_column(column, justify="left" if column == "group" else "right")
    counts = parameter_counts(model)
    for group, c in counts.items():
        table.add_row(
            group, f"{c['trainable']:,}", f"{c['frozen']:,}", f"{lrs[group]:.2e}" if group in lrs else "-"
        )
    total = {key: sum(c[key] for c in counts.values()) for key in ("trainable", "frozen")}
    table.add_row("total", f"{total['trainable']:,}", f"{total['frozen']:,}", "", style="bold")
    return table
