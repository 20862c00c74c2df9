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
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vlmkit.models.vlm import VisionLanguageModel

GROUP_ORDER = ("vision", "vision_lora", "projector", "language", "lora")


@dataclass(frozen=True)
class StageSpec:
    """A stage: its default base learning rate and the LR scale of every group it trains."""

    base_lr: float
    lr_scales: dict[str, float]


STAGES: dict[str, StageSpec] = {
    "projector": StageSpec(base_lr=1e-3, lr_scales={"projector": 1.0}),
    "lora": StageSpec(base_lr=2e-4, lr_scales={"lora": 1.0, "projector": 0.1, "vision_lora": 1.0}),
    "full": StageSpec(base_lr=2e-5, lr_scales={"language": 1.0, "projector": 1.0, "vision": 0.1}),
}


@dataclass(frozen=True)
class StageConfig:
    """What the user chose: the stage and its options (LoRA shape, vision freezing, LR overrides)."""

    stage: str = "projector"
    freeze_vision: bool = True  # full stage: keep the tower frozen, as LLaVA does
    lora_vision: bool = False  # lora stage: also put LoRA on the vision tower
    lora_rank: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lr: float | None = None  # base LR; None = the stage default
    lr_scales: dict[str, float] = field(default_factory=dict)  # per-group overrides of the scale

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        if self.lora_vision and self.stage != "lora":
            raise ValueError("--lora-vision only applies to --stage lora")
        if not self.freeze_vision and self.stage != "full":
            raise ValueError("an unfrozen vision tower (--train-vision) needs --stage full")
        if self.stage == "lora" and self.lora_rank < 1:
            raise ValueError(f"--lora-rank must be >= 1, got {self.lora_rank}")
        unknown = set(self.lr_scales) - set(GROUP_ORDER)
        if unknown:
            raise ValueError(f"unknown parameter group(s) {sorted(unknown)}; known: {', '.join(GROUP_ORDER)}")

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else STAGES[self.stage].base_lr

    def trainable_groups(self) -> dict[str, float]:
        """group -> learning rate, for the groups this configuration trains."""
        scales = dict(STAGES[self.stage].lr_scales) | self.lr_scales
        if self.stage == "lora" and not self.lora_vision:
            scales.pop("vision_lora", None)
        if self.stage == "full" and self.freeze_vision:
            scales.pop("vision", None)
        return {group: self.base_lr * scales[group] for group in GROUP_ORDER if group in scales}

    @property
    def vision_frozen(self) -> bool:
        """True when the tower's output never changes during training (its features can be cached)."""
        return "vision" not in self.trainable_groups() and "vision_lora" not in self.trainable_groups()


def group_of(name: str) -> str:
    """The group of a parameter of ``VisionLanguageModel`` by its name."""
    lora = ".lora_" in name
    if name.startswith("vision."):
        return "vision_lora" if lora else "vision"
    if name.startswith("projector."):
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
