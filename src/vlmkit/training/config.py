"""What a training run is told and what it reports: ``TrainConfig`` (every option of ``vlmkit train``),
``TrainResult``, per-step statistics, the run directory's file names, the precision a run resolves to."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmkit.training.stages import StageConfig

PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


@dataclass
class TrainConfig:
    """Everything ``vlmkit train`` accepts. Sizes are per process: global batch = batch_size x grad_accum x N."""

    data: Path
    out: Path
    image_folder: Path | None = None  # default: the data file's directory
    stage: StageConfig = field(default_factory=StageConfig)
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None  # default: ``epochs`` over the data
    # the LR schedule's length when it differs from the run's: stop at max_steps partway down a longer
    # schedule (how a time-limited run ended, reproduced by steps); default: the run's own steps
    schedule_steps: int | None = None
    epochs: float = 1.0
    max_minutes: float | None = None  # stop (checkpoint + save) after this much wall time
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    grad_ckpt: bool = False
    precision: str = "auto"  # auto: bf16-mixed on a bf16 GPU, fp32 on CPU
    eval_data: Path | None = None
    eval_image_folder: Path | None = None
    eval_every: int = 0  # 0: evaluate only at the end (when eval_data is given)
    save_every: int = 0  # 0: checkpoint only at the end
    keep_last: int = 2
    log_every: int = 1
    seed: int = 0
    resume: bool = False
    feature_cache: bool = True  # used only while the tower is frozen
    feature_cache_dir: Path | None = None  # default: OUT/feature_cache
    workers: int = 0
    max_length: int | None = None  # longer samples are skipped (and counted)
    shuffle: bool = True
    progress: bool = True
    plot: bool = True
    cpu: bool = False
    fsdp: bool = False  # shard with FSDP2 (also on under an accelerate FSDP config); needs >= 2 processes
    # > 0: each image token, as the LM receives it, must also name its row and column on the tower's patch
    # grid (a fixed readout, see ``where_loss``), at this weight next to the mean next-token loss
    where_weight: float = 0.0

    def validate(self) -> None:
        self.stage.validate()
        checks = {
            "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1, "keep_last": self.keep_last >= 1,
            "log_every": self.log_every >= 1, "epochs": self.epochs > 0, "workers": self.workers >= 0,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "schedule_steps": self.schedule_steps is None or self.schedule_steps >= 1,
            "warmup_ratio": 0 <= self.warmup_ratio < 1, "precision": self.precision in PRECISIONS,
            "where_weight": math.isfinite(self.where_weight) and self.where_weight >= 0,
        }  # fmt: skip
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training option {bad[0]}={getattr(self, bad[0])!r}")


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


@dataclass
class StepStats:
    loss_sum: float  # summed token loss over the global batch
    target_tokens: int  # tokens scored, all processes
    tokens: int  # non-padding tokens processed, all processes
    grad_norm: float | None = None
    where_loss: float | None = None  # mean grid-position cross-entropy of this process (where_weight > 0)


def resolve_precision(precision: str, *, cpu: bool = False) -> str:
    if precision != "auto":
        return precision
    gpu_bf16 = not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16-mixed" if gpu_bf16 else "fp32"


def skipped_summary(skipped: dict[str, str], *, limit: int = 5) -> str:
    """One line per skipped record (the first ``limit``), for the end-of-run report."""
    lines = [f"skipped {len(skipped)} record(s) with missing/corrupt images or over-long text:"]
    lines += [f"  {record_id}: {reason}" for record_id, reason in list(skipped.items())[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)
