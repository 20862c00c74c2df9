"""The training loop: accelerate-based, one code path for 1 CPU process, 1 GPU, and DDP/FSDP launches
(FSDP: PyTorch's FSDP2, see ``fsdp.py``).

What one optimizer step does (``Trainer.train_step``):

1. The step's global batch is ``batch_size x grad_accum x processes`` records taken from an endless
   stream of per-epoch permutations (seeded), so the data order depends only on the step number: a
   resumed run and a run with a different process count see the same records at the same step.
2. The target tokens of the whole global batch are counted first (all-reduced across processes), and
   each micro-batch's summed token loss is divided by that total. The accumulated gradient is therefore
   exactly the gradient of ``sum(token losses) / total target tokens`` (not a mean of micro-batch means),
   whatever the split into micro-batches and processes.
3. Gradient clipping, the warmup + cosine learning rate, AdamW.

With a frozen vision tower, tower outputs come from the on-disk ``FeatureCache`` and only the projector
runs on them. Checkpoints (``checkpoint.py``) hold everything an exact resume needs.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.data.dataset import Batch, ConversationDataset, collate, read_records
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.prompting import IGNORE_INDEX
from vlmkit.training import checkpoint as ckpt
from vlmkit.training import fsdp
from vlmkit.training.feature_cache import FeatureCache, encoder_identity
from vlmkit.training.stages import StageConfig, apply_stage, iter_trainable, param_groups

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


# ------------------------------------------------------------------------------------------ data order


@functools.lru_cache(maxsize=4)
def epoch_order(size: int, *, seed: int, epoch: int, shuffle: bool) -> tuple[int, ...]:
    if not shuffle:
        return tuple(range(size))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(size, generator=generator).tolist())


@dataclass(frozen=True)
class BatchLayout:
    """Which records process ``rank`` trains on at each step: its slice of the step's global batch."""

    size: int
    batch_size: int
    grad_accum: int
    world: int
    rank: int
    seed: int
    shuffle: bool = True

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    def step_indices(self, step: int) -> list[list[int]]:
        """-> grad_accum micro-batches of record indices for this process at optimizer step ``step``."""
        per_rank = self.batch_size * self.grad_accum
        start = step * self.global_batch + self.rank * per_rank
        flat = [self.record(position) for position in range(start, start + per_rank)]
        return [flat[i : i + self.batch_size] for i in range(0, per_rank, self.batch_size)]

    def record(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        return epoch_order(self.size, seed=self.seed, epoch=epoch, shuffle=self.shuffle)[offset]


class StepSampler:
    """A DataLoader batch sampler over steps [start, stop): yields each step's micro-batches in order."""

    def __init__(self, layout: BatchLayout, *, start: int, stop: int) -> None:
        self.layout, self.start, self.stop = layout, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield from self.layout.step_indices(step)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.layout.grad_accum


def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` (never exactly 0)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ loss


class TokenLoss(nn.Module):
    """Wraps the VLM so DDP (or FSDP's root unit) sees one forward per micro-batch; returns the summed
    next-token loss.

    ``blank_images``: a micro-batch without images still runs the tower on one blank image (at zero weight).
    FSDP needs this for a sharded tower: every process must gather the same units in the same order.
    ``where_weight`` > 0 adds ``where_loss`` on the image tokens, weighted per target token so that after the
    trainer's division by the global target count it stands at ``where_weight`` x its mean.
    """

    def __init__(
        self, model: VisionLanguageModel, *, blank_images: bool = False, where_weight: float = 0.0
    ) -> None:
        super().__init__()
        self.model = model
        self.blank_images = blank_images
        self.where_weight = where_weight
        self.where_part: torch.Tensor | None = None  # the weighted where term inside the last returned loss
        self.where_mean: torch.Tensor | None = None  # its unweighted mean cross-entropy

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids/attention_mask/labels [batch, seq]; pixel_values [images, 3, S, S] or
        vision_features [images, vision_tokens, vision_dim] (cached tower output) -> scalar summed loss."""
        image_features, blank = None, None
        if vision_features is not None:
            projector = self.model.projector
            image_features = projector(vision_features.to(next(projector.parameters()).dtype))
        elif pixel_values is not None:
            image_features = self.model.encode_images(pixel_values)
        elif self.blank_images:  # before the LM, where a batch with images runs the tower
            size = self.model.config.vision.image_size
            blank = self.model.encode_images(torch.zeros((1, 3, size, size), device=input_ids.device))
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, image_features=image_features,
                            use_cache=False).logits  # fmt: skip
        loss = token_loss_sum(logits, labels=labels)
        self.where_part = self.where_mean = None
        if self.where_weight > 0 and image_features is not None:
            self.where_mean = where_loss(image_features)
            targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
            self.where_part = self.where_weight * targets * self.where_mean
            loss = loss + self.where_part
        if blank is not None:
            loss = loss + 0.0 * blank.float().sum()
        elif image_features is None and torch.is_grad_enabled():
            # text only: the projector (and a trainable tower) took no part. A zero link gives them zero
            # gradients, so every process reduces the same parameters (DDP without unused-parameter search),
            # and backward has a graph even when nothing else trains (projector stage)
            idle = [
                p
                for part in (self.model.projector, self.model.vision)
                for p in part.parameters()
                if p.requires_grad
            ]
            loss = loss + 0.0 * sum(p.sum() for p in idle) if idle else loss
        return loss


def where_readout(*, dim: int, grid: int, device: torch.device) -> torch.Tensor:
    """A fixed [dim, 2 * grid] readout with orthonormal columns (seeded, so a resumed run gets the same one):
    no parameters to train, save or shard; the features learn to meet it."""
    if dim < 2 * grid:
        raise ValueError(f"where_weight needs image tokens of at least {2 * grid} dims, got {dim}")
    return _orthonormal(dim, 2 * grid).to(device)


@functools.lru_cache(maxsize=8)
def _orthonormal(rows: int, cols: int) -> torch.Tensor:
    """Made once per shape, not on every micro-batch."""
    basis, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)))
    return basis


def where_loss(features: torch.Tensor, *, temperature: float = 20.0) -> torch.Tensor:
    """features [images, tokens, dim], the image tokens in the tower's raster order on a square patch grid ->
    mean cross-entropy (fp32 scalar) of naming each token's row and column from its direction.

    The LM sees image tokens in one sequence with relative positions, so a token's column is its index modulo
    the grid width, which attention must work out; this makes the column (and row) part of the token itself.
    The readout is cosine to fixed directions at ``temperature``: the loss saturates once a modest share of
    the feature points the right way, so the content is not crowded out.
    """
    images, tokens, dim = features.shape
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"where_weight needs a square grid of image tokens per image, got {tokens} tokens")
    readout = where_readout(dim=dim, grid=grid, device=features.device)
    logits = F.normalize(features.float(), dim=-1) @ readout * temperature  # [images, tokens, 2 * grid]
    index = torch.arange(tokens, device=features.device)
    rows, cols = (index // grid).repeat(images), (index % grid).repeat(images)
    flat = logits.flatten(0, 1)
    return (F.cross_entropy(flat[:, :grid], rows) + F.cross_entropy(flat[:, grid:], cols)) / 2


def token_loss_sum(logits: torch.Tensor, *, labels: torch.Tensor) -> torch.Tensor:
    """logits [batch, seq, vocab], labels [batch, seq] -> sum of next-token cross-entropies (fp32 scalar)."""
    shifted = logits[:, :-1].flatten(0, 1).float()
    targets = labels[:, 1:].flatten().to(shifted.device)
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def placeholder_batch(*, pad_token_id: int, image_size: int) -> Batch:
    """A one-row batch with nothing to learn: keeps DDP's collective calls in step when every record of a
    micro-batch was skipped."""
    return Batch(
        input_ids=torch.full((1, 2), pad_token_id, dtype=torch.long),
        attention_mask=torch.ones((1, 2), dtype=torch.long),
        labels=torch.full((1, 2), IGNORE_INDEX, dtype=torch.long),
        pixel_values=torch.empty((0, 3, image_size, image_size)),
        ids=[],
    )


# --------------------------------------------------------------------------------------------- trainer


def make_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    mixed = "bf16" if resolve_precision(config.precision, cpu=config.cpu) == "bf16-mixed" else "no"
    # every trainable parameter takes part in every forward (see TokenLoss), so no unused-parameter search
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    # accelerate only sets up multi-process CPU (gloo) training when told it runs on CPU
    cpu = config.cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(mixed_precision=mixed, cpu=cpu, kwargs_handlers=[ddp])
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(
            f"accelerate is configured for {kind}, which vlmkit train does not support; use DDP or FSDP"
        )
    return accelerator


def enable_checkpointing(model: nn.Module) -> None:
    """Per-layer activation checkpointing (non-reentrant, so frozen inputs need no requires_grad hack)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def resolve_precision(precision: str, *, cpu: bool = False) -> str:
    if precision != "auto":
        return precision
    gpu_bf16 = not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16-mixed" if gpu_bf16 else "fp32"


class Trainer:
    """Sets up a run (stage, data, optimizer, cache, resume) and trains it. ``run()`` does everything."""

    def __init__(
        self, vlm: Any, config: TrainConfig, *, on_step: Callable[[int], None] | None = None
    ) -> None:
        from accelerate.utils import set_seed

        config.validate()
        if config.where_weight > 0 and vlm.model.config.projector.type == "resampler":
            raise ValueError("where_weight needs a projector that keeps the tower's patch grid (linear, mlp); "
                             "a resampler's queries have no place on it")  # fmt: skip
        self.vlm, self.config, self.on_step = vlm, config, on_step
        self.out = Path(config.out).expanduser()
        self.accelerator = make_accelerator(config)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        set_seed(config.seed)
        if self.accelerator.device.type == "cpu":
            # a conv stem trained on CPU crawls on denormal values (shared/notes/from-scratch-findings.md)
            torch.set_flush_denormal(True)
        self.model: VisionLanguageModel = vlm.model
        self.saved_dtype = self.model.dtype
        self._prepare_model()
        self._prepare_data()
        # FSDP over one process would only add overhead; the plain path is the same computation
        self.fsdp = fsdp.fsdp_requested(flag=config.fsdp) and self.world > 1
        if self.fsdp:
            self._shard()
        else:
            self.token_loss = TokenLoss(self.model, where_weight=config.where_weight)
            self.wrapped, self.optimizer = self.accelerator.prepare(self.token_loss, self._optimizer())
        self.cache = self._feature_cache()
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.skipped: dict[str, str] = {}
        self.last_loss: float | None = None
        self.last_eval: float | None = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _prepare_model(self) -> None:
        precision = resolve_precision(self.config.precision, cpu=self.config.cpu)
        # pure bf16 casts before LoRA is added, so peft keeps the adapters in fp32
        self.train_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.model.to(self.train_dtype)
        self.param_groups = apply_stage(self.model, self.config.stage)
        if self.config.grad_ckpt:
            enable_checkpointing(self.model.language_model)
            if not self.config.stage.vision_frozen:
                enable_checkpointing(self.model.vision.model)
        self.train_mode()

    def _optimizer(self) -> torch.optim.Optimizer:
        groups = [{**g, "base_lr": g["lr"]} for g in self.param_groups]
        return torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)

    def _shard(self) -> None:
        """FSDP2 in place (see fsdp.py); the optimizer is built on the sharded parameters, not prepared by
        accelerate, whose DDP wrapping would not apply."""
        stage = self.config.stage
        # fully_shard moves what it shards to the device, but leaves the ignored (frozen) tower where it is
        self.model.to(self.accelerator.device)
        self.wrapped = self.token_loss = TokenLoss(
            self.model, blank_images=not stage.vision_frozen, where_weight=self.config.where_weight
        )
        fsdp.shard(self.wrapped, vision=self.model.vision, vision_frozen=stage.vision_frozen)
        self.param_groups = param_groups(self.model, config=stage)
        self.optimizer = self._optimizer()

    def train_mode(self) -> None:
        self.model.train()
        if self.config.stage.vision_frozen:
            self.model.vision.eval()

    def _prepare_data(self) -> None:
        config = self.config
        records = read_records(config.data)
        folder = config.image_folder if config.image_folder is not None else Path(config.data).parent
        self.dataset = ConversationDataset(records, processor=self.vlm.processor, image_folder=folder,
                                           max_length=config.max_length)  # fmt: skip
        self.layout = BatchLayout(size=len(records), batch_size=config.batch_size, grad_accum=config.grad_accum,
                                  world=self.world, rank=self.rank, seed=config.seed, shuffle=config.shuffle)  # fmt: skip
        per_epoch = len(records) / self.layout.global_batch
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
        self.schedule_steps = config.schedule_steps or self.total_steps
        if self.schedule_steps < self.total_steps:
            raise ValueError(
                f"schedule_steps={self.schedule_steps} is shorter than the run ({self.total_steps} steps)"
            )
        self.warmup = int(config.warmup_ratio * self.schedule_steps)
        self.eval_dataset = None
        if config.eval_data is not None:
            eval_folder = config.eval_image_folder or (config.image_folder or Path(config.eval_data).parent)
            self.eval_dataset = ConversationDataset(read_records(config.eval_data), processor=self.vlm.processor,
                                                    image_folder=eval_folder, max_length=config.max_length)  # fmt: skip

    def _collate(self) -> Callable[[list[Any]], Batch]:
        processor = self.vlm.processor
        return functools.partial(collate, pad_token_id=processor.pad_token_id,
                                 image_size=processor.image_processor.image_size)  # fmt: skip

    def _loader(self, dataset: ConversationDataset, batches: Any) -> torch.utils.data.DataLoader:
        # a private generator: creating the loader must not consume the global RNG (exact resume)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=self._collate(),
                                           num_workers=self.config.workers, generator=torch.Generator())  # fmt: skip

    def _feature_cache(self) -> FeatureCache | None:
        if not (self.config.feature_cache and self.config.stage.vision_frozen):
            return None
        vision = self.model.vision
        dtype = (
            torch.bfloat16 if self.accelerator.mixed_precision == "bf16" else next(vision.parameters()).dtype
        )
        identity = encoder_identity(vision, config=asdict(vision.config), dtype=dtype)
        directory = self.config.feature_cache_dir or self.out / "feature_cache"
        return FeatureCache(
            directory, identity=identity, preprocess=self.vlm.processor.image_processor.to_dict()
        )

    # ---------------------------------------------------------------------------------------- one step

    def batch_stream(self, *, start: int, stop: int) -> Iterator[list[Batch]]:
        """The micro-batches of each step in [start, stop), loaded by the DataLoader (``--workers``)."""
        loader = iter(self._loader(self.dataset, StepSampler(self.layout, start=start, stop=stop)))
        for _ in range(start, stop):
            yield [next(loader) for _ in range(self.layout.grad_accum)]

    def step_batches(self, step: int) -> list[Batch]:
        """The micro-batches of optimizer step ``step`` for this process (without a DataLoader)."""
        collate_fn = self._collate()
        return [collate_fn([self.dataset[i] for i in indices]) for indices in self.layout.step_indices(step)]

    def train_step(self, batches: list[Batch]) -> StepStats:
        stats = self.backward(batches)
        stats.grad_norm = self.optimizer_step()
        return stats

    def backward(self, batches: list[Batch]) -> StepStats:
        """Accumulate gradients of sum(token losses) / (target tokens of the global batch) over ``batches``."""
        self._record_skipped(batches)
        processor = self.vlm.processor
        empty = placeholder_batch(
            pad_token_id=processor.pad_token_id, image_size=processor.image_processor.image_size
        )
        batches = [b if b.ids else empty for b in batches]
        local = torch.tensor(
            [sum(b.num_target_tokens for b in batches), sum(int(b.attention_mask.sum()) for b in batches)]
        )
        targets, tokens = (int(x) for x in self.all_sum(local))
        # DDP averages gradients over processes, so scale by the process count to get a global sum
        scale = self.world / max(targets, 1)
        loss_sum = torch.zeros((), dtype=torch.float64)
        where = []
        for i, batch in enumerate(batches):
            sync = nullcontext() if i == len(batches) - 1 else self._no_sync()
            with sync:
                with self.accelerator.autocast():
                    loss = self.wrapped(**self.inputs(batch))
                self.accelerator.backward(loss * scale)
            part = self.token_loss.where_part  # the logged loss stays the next-token loss alone
            loss_sum += (loss.detach() - (0 if part is None else part.detach())).double().cpu()
            if self.token_loss.where_mean is not None:
                where.append(float(self.token_loss.where_mean.detach()))
        return StepStats(loss_sum=float(self.all_sum(loss_sum)), target_tokens=targets, tokens=tokens,
                         where_loss=sum(where) / len(where) if where else None)  # fmt: skip

    def _no_sync(self) -> AbstractContextManager[None]:
        return fsdp.no_sync(self.wrapped) if self.fsdp else self.accelerator.no_sync(self.wrapped)

    def optimizer_step(self) -> float | None:
        factor = lr_factor(
            self.step, total=self.schedule_steps, warmup=self.warmup, min_ratio=self.config.min_lr_ratio
        )
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        norm = None
        if self.config.max_grad_norm:
            params = [p for _, p in iter_trainable(self.model)]
            norm = fsdp.as_float(self.accelerator.clip_grad_norm_(params, self.config.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device),
                  "labels": batch.labels.to(device)}  # fmt: skip
        if batch.pixel_values.shape[0]:
            if self.cache is not None:
                inputs["vision_features"] = self.cache(batch.pixel_values, encode=self._encode, device=device)
            else:
                inputs["pixel_values"] = batch.pixel_values.to(device)
        return inputs

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, S, S] -> tower features [n, tokens, dim] (frozen tower, no graph)."""
        with torch.no_grad(), self.accelerator.autocast():
            return self.model.vision(pixel_values.to(self.accelerator.device))

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return value
        return self.accelerator.reduce(value.to(self.accelerator.device), reduction="sum").cpu()

    def _record_skipped(self, batches: list[Batch]) -> None:
        for batch in batches:
            for item in batch.skipped:
                self.skipped.setdefault(item.id, item.reason)

    # --------------------------------------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over the held-out set (each process takes every N-th record)."""
        if self.eval_dataset is None:
            return None
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        for batch in self._eval_batches():
            with self.accelerator.autocast():
                loss = self.wrapped(**self.inputs(batch))
            totals += torch.tensor([float(loss), batch.num_target_tokens], dtype=torch.float64)
        self.train_mode()
        loss_sum, targets = self.all_sum(totals).tolist()
        self.last_eval = loss_sum / targets if targets else None
        return self.last_eval

    def _eval_batches(self) -> Iterator[Batch]:
        """This process's eval batches. Under FSDP every process runs the same number of forwards (each one
        gathers sharded weights), so empty batches become placeholders and short shares are padded with them."""
        assert self.eval_dataset is not None
        size = self.config.batch_size
        indices = list(range(self.rank, len(self.eval_dataset), self.world))
        chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
        processor = self.vlm.processor
        empty = placeholder_batch(
            pad_token_id=processor.pad_token_id, image_size=processor.image_processor.image_size
        )
        for batch in self._loader(self.eval_dataset, chunks):
            if batch.ids:
                yield batch
            elif self.fsdp:
                yield empty
        if self.fsdp:
            most = math.ceil(math.ceil(len(self.eval_dataset) / self.world) / size)
            for _ in range(most - len(chunks)):
                yield empty

    # ------------------------------------------------------------------------------------ state to save

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full trainable weights by name (complete on the main process; collective under FSDP)."""
        if self.fsdp:
            return fsdp.full_state(self.wrapped, trainable_only=True)
        return dict(iter_trainable(self.model))

    def optimizer_state(self) -> dict[str, Any]:
        """``optimizer.state_dict()`` with full tensors (complete on the main process; collective under FSDP)."""
        if self.fsdp:
            return fsdp.full_optimizer_state(self.wrapped, optimizer=self.optimizer)
        return self.optimizer.state_dict()

    def load_state(self, directory: Path) -> None:
        """Trainable weights and optimizer state from a checkpoint (every process reads it)."""
        if not self.fsdp:
            ckpt.load_model_state(directory, model=self.model)
            self.optimizer.load_state_dict(ckpt.read_optimizer_state(directory))
            return
        names = {name for name, _ in iter_trainable(self.model)}
        fsdp.load_trainable(self.wrapped, weights=ckpt.read_trainable(directory, names=names))
        fsdp.load_optimizer_state(
            self.wrapped, optimizer=self.optimizer, state=ckpt.read_optimizer_state(directory)
        )

    def trained_vlm(self) -> Any:
        """The VLM to save: ``self.vlm``; under FSDP (collective) a new VLM holding the gathered weights on the
        main process (``None`` elsewhere), since the sharded model cannot be saved or used on its own."""
        if not self.fsdp:
            return self.vlm
        from vlmkit.api import VLM

        state = fsdp.full_state(self.wrapped, trainable_only=False)
        if not self.is_main:
            return None
        model = VisionLanguageModel(config=copy.deepcopy(self.model.config))
        model.to(self.train_dtype)  # as _prepare_model: the dtype before LoRA is added
        apply_stage(model, self.config.stage)
        model.load_state_dict(state)
        return VLM(model=model, tokenizer=self.vlm.tokenizer)

    # ------------------------------------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        """Train until ``max_steps`` (or ``max_minutes``), checkpointing, logging and saving as configured."""
        from vlmkit.training.session import RunSession

        return RunSession(self).run()

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between an interrupted run and its resumption."""
        c = self.config
        return {"stage": asdict(c.stage), "batch_size": c.batch_size, "grad_accum": c.grad_accum,
                "processes": self.world, "seed": c.seed, "shuffle": c.shuffle,
                "precision": resolve_precision(c.precision, cpu=c.cpu), "records": len(self.dataset),
                "data_sha256": self.data_sha256}  # fmt: skip

    @functools.cached_property
    def data_sha256(self) -> str:
        return file_sha256(Path(self.config.data))  # once per run: data files can be gigabytes


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def train(vlm: Any, config: TrainConfig, *, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``vlm`` in place as ``config`` says and write the result to ``config.out``.

    ``on_step(step)`` runs after every optimizer step (and its logging/checkpointing).
    """
    return Trainer(vlm, config=config, on_step=on_step).run()


def skipped_summary(skipped: dict[str, str], *, limit: int = 5) -> str:
    """One line per skipped record (the first ``limit``), for the end-of-run report."""
    lines = [f"skipped {len(skipped)} record(s) with missing/corrupt images or over-long text:"]
    lines += [f"  {record_id}: {reason}" for record_id, reason in list(skipped.items())[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)


__all__ = ["BatchLayout", "StepStats", "TrainConfig", "TrainResult", "Trainer", "train"]
