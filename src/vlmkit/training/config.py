"""What a training run is told and what it reports: ``TrainConfig`` (every option of ``vlmkit train``),
``TrainResult``, per-step statistics, the run directory's file names. No torch import: the command line builds its options from these fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from vlmkit.config import QUANT_METHODS, ConfigError, setting

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


STAGE_NAMES = tuple(STAGES)


@dataclass(frozen=True)
class StageConfig:
    """What the user chose: the stage and its options (LoRA shape, vision freezing, LR overrides)."""

    stage: str = setting("projector", doc="What trains: projector, lora or full.", choices=STAGE_NAMES)
    freeze_vision: bool = setting(
        True, doc="Full stage: keep the tower frozen (as LLaVA does).", negation="--train-vision"
    )
    lora_vision: bool = setting(False, doc="LoRA on the vision tower too (lora stage).")
    lora_rank: int = setting(128, doc="LoRA rank.", low=1)
    lora_alpha: int = setting(256, doc="LoRA alpha (scale = alpha / rank).", low=1)
    lora_dropout: float = setting(0.05, doc="LoRA dropout.", low=0.0, high=1.0)
    lr: float | None = setting(None, doc="Base learning rate (default: per stage).", low=0.0)
    lr_scales: dict[str, float] = setting(
        default_factory=dict,
        doc="Per-group LR scale over the stage default, GROUP=SCALE (repeatable).",
        flag="--lr-scale",
    )
    quantize: str | None = setting(
        None,
        doc="QLoRA (lora stage): quantize the frozen base LM: int8 or int4 on CPU, nf4 or int8 on CUDA.",
        choices=QUANT_METHODS,
    )

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(
                f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}", field="stage"
            )
        if self.lora_vision and self.stage != "lora":
            raise ConfigError("lora_vision only applies to stage 'lora'", field="lora_vision")
        if not self.freeze_vision and self.stage != "full":
            raise ConfigError(
                "an unfrozen vision tower (freeze_vision false) needs stage 'full'", field="freeze_vision"
            )
        if self.quantize is not None and (self.stage != "lora" or self.quantize not in QUANT_METHODS):
            raise ConfigError(f"quantize={self.quantize!r} (QLoRA) needs stage 'lora' and one of {QUANT_METHODS}",
                              field="quantize")  # fmt: skip
        if self.stage == "lora" and self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be >= 1, got {self.lora_rank}", field="lora_rank")
        unknown = set(self.lr_scales) - set(GROUP_ORDER)
        if unknown:
            raise ConfigError(
                f"unknown parameter group(s) {sorted(unknown)}; known: {', '.join(GROUP_ORDER)}",
                field="lr_scales",
            )

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


PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


@dataclass
class TrainConfig:
    """Everything ``vlmkit train`` accepts (its options are derived from these fields, see ``vlmkit.cli.schema``).
    Sizes are per process: global batch = batch_size x grad_accum x N."""

    data: Path = setting(doc="LLaVA-format JSON array or JSONL file.")
    out: Path = setting(doc="Output dir: the trained model, checkpoints, metrics.")
    image_folder: Path | None = setting(
        None, doc="Image paths are relative to this (default: the data file's folder)."
    )
    stage: StageConfig = field(default_factory=StageConfig)  # its own fields are options too
    batch_size: int = setting(4, doc="Micro-batch per process.", low=1)
    grad_accum: int = setting(1, doc="Micro-batches per optimizer step.", low=1)
    max_steps: int | None = setting(None, doc="Optimizer steps (default: --epochs).", low=1)
    # the LR schedule's length when it differs from the run's: stop at max_steps partway down a longer
    # schedule (how a time-limited run ended, reproduced by steps)
    schedule_steps: int | None = setting(
        None, doc="LR schedule length when longer than the run (default: the run's own steps).", low=1
    )
    epochs: float = setting(1.0, doc="Passes over the data without --max-steps.", low=0.0)
    max_minutes: float | None = setting(None, doc="Stop, checkpoint and save after this long.", low=0.0)
    warmup_ratio: float = setting(0.03, doc="Warmup share.", low=0.0, high=0.99)
    min_lr_ratio: float = setting(
        0.0, doc="Cosine decay floor, as a share of the base LR.", low=0.0, high=1.0
    )
    weight_decay: float = setting(0.0, doc="AdamW weight decay.", low=0.0)
    max_grad_norm: float | None = setting(1.0, doc="Gradient clipping norm; 0 disables clipping.", low=0.0)
    grad_ckpt: bool = setting(False, doc="Gradient checkpointing (less memory).")
    precision: str = setting("auto", doc="auto: bf16-mixed on a bf16 GPU, fp32 on CPU.", choices=PRECISIONS)
    eval_data: Path | None = setting(None, doc="Held-out file for eval loss.")
    eval_image_folder: Path | None = setting(None, doc="Image folder of --eval-data (default: its folder).")
    eval_every: int = setting(0, doc="Steps between evals (0: at end).", low=0)
    save_every: int = setting(0, doc="Steps between checkpoints (0: at end).", low=0)
    keep_last: int = setting(2, doc="Checkpoints to keep.", low=1)
    log_every: int = setting(1, doc="Steps per metrics.jsonl line.", low=1)
    seed: int = setting(0, doc="Seed of data order and initialisation.")
    resume: bool = setting(False, doc="Continue the run in --out from its latest checkpoint.")
    feature_cache: bool = setting(
        True, doc="Cache frozen vision features on disk.", negation="--no-feature-cache"
    )  # used only while the tower is frozen
    feature_cache_dir: Path | None = setting(None, doc="Default: OUT/feature_cache.")
    workers: int = setting(0, doc="Data-loading processes.", low=0)
    max_length: int | None = setting(
        None, doc="Longest record in tokens (default: the LM's max positions, at most 4096).", low=8
    )
    too_long: str = setting(
        "skip", doc="A record longer than --max-length is skipped or truncated (and counted).",
        choices=("skip", "truncate"),
    )  # fmt: skip
    allow_outside_images: bool = setting(
        False, doc="Read images outside --image-folder (../, absolute paths, symlinks); refused by default."
    )
    shuffle: bool = setting(True, doc="Shuffle the records every epoch.", negation="--no-shuffle")
    progress: bool = setting(True, doc="Show a progress bar on stderr.", negation="--no-progress")
    plot: bool = setting(
        True, doc="Plot the loss curve to OUT/loss.png (needs matplotlib).", negation="--no-plot"
    )
    cpu: bool = setting(False, doc="Train on CPU even when a GPU is present.")
    fsdp: bool = setting(False, doc="Shard weights, grads and optimizer state (FSDP2) across processes.")
    # > 0: each image token, as the LM receives it, must also name its row and column on the tower's patch
    # grid (a fixed readout, see ``where_loss``), at this weight next to the mean next-token loss
    where_weight: float = setting(
        0.0, doc="Also teach each image token its row and column on the patch grid, at this weight.", low=0.0
    )

    def validate(self) -> None:
        self.stage.validate()
        if (
            self.fsdp and self.stage.quantize is not None
        ):  # FSDP shards parameters; a quantized base is buffers
            raise ConfigError(
                "quantize (QLoRA) cannot be combined with fsdp: run it with DDP", field="quantize"
            )
        checks = {
            "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1, "keep_last": self.keep_last >= 1,
            "log_every": self.log_every >= 1, "epochs": self.epochs > 0, "workers": self.workers >= 0,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "schedule_steps": self.schedule_steps is None or self.schedule_steps >= 1,
            "warmup_ratio": 0 <= self.warmup_ratio < 1, "precision": self.precision in PRECISIONS,
            "where_weight": math.isfinite(self.where_weight) and self.where_weight >= 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
        }  # fmt: skip
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid training option {bad[0]}={getattr(self, bad[0])!r}", field=bad[0])


@dataclass
class TrainResult:
    out: Path
    steps: int
    loss: float | None  # mean token loss over the last log interval
    eval_loss: float | None
    tokens: int
    tokens_per_s: float
    elapsed_s: float
    stopped: str  # "done" | "max_minutes"
    skipped: dict[str, str]
    main_process: bool = True  # False on the other processes of a distributed run
    truncated: int = 0  # records cut to max_length (--too-long truncate)


@dataclass
class StepStats:
    loss_sum: float  # summed token loss over the global batch
    target_tokens: int  # tokens scored, all processes
    tokens: int  # non-padding tokens processed, all processes
    grad_norm: float | None = None
    where_loss: float | None = None  # mean grid-position cross-entropy of this process (where_weight > 0)


def skipped_summary(skipped: dict[str, str], *, limit: int = 5) -> str:
    """One line per skipped record (the first ``limit``), for the end-of-run report."""
    lines = [f"skipped {len(skipped)} record(s) with missing/corrupt images or over-long text:"]
    lines += [f"  {record_id}: {reason}" for record_id, reason in list(skipped.items())[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)
