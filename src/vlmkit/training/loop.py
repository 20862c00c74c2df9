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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmkit.data.dataset import Batch, ConversationDataset, Record, collate, default_max_length, read_records
from vlmkit.models.language.protocols import lm_module
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.prompting import IGNORE_INDEX
from vlmkit.training import checkpoint as ckpt
from vlmkit.training import fsdp
from vlmkit.training.config import (
    METRICS_FILE,
    PLOT_FILE,
    PRECISIONS,
    StepStats,
    TrainConfig,
    TrainResult,
    skipped_summary,
)
from vlmkit.training.feature_cache import FeatureCache, encoder_identity
from vlmkit.training.objectives import TokenLoss, token_loss_sum, where_loss, where_readout
from vlmkit.training.qlora import quantize_base
from vlmkit.training.sampling import BatchLayout, StepSampler, epoch_order, lr_factor
from vlmkit.training.stages import apply_stage, iter_trainable, param_groups


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
    hf: Any = model  # a transformers model: its checkpointing methods are not nn.Module's
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def resolve_precision(precision: str, *, cpu: bool = False) -> str:
    if precision != "auto":
        return precision
    gpu_bf16 = not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16-mixed" if gpu_bf16 else "fp32"


class Trainer:
    """Sets up a run (stage, data, optimizer, cache, resume) and trains it, one step at a time; ``session.RunSession`` runs it
    (checks, resume, logging, checkpoints, final save) and ``session.train`` does both."""

    def __init__(
        self, vlm: Any, config: TrainConfig, *, on_step: Callable[[int], None] | None = None
    ) -> None:
        from accelerate.utils import set_seed

        config.validate()
        if config.where_weight > 0 and vlm.model.config.projector.type in ("resampler", "cross-attn"):
            raise ValueError("where_weight needs a projector that keeps the tower's patch grid (linear, mlp); "
                             f"a {vlm.model.config.projector.type}'s tokens have no fixed place on it")  # fmt: skip
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
        self.skipped: dict[str, str] = self.dataset.skipped()  # found before step 1
        self.last_loss: float | None = None
        self.last_eval: float | None = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _prepare_model(self) -> None:
        precision = resolve_precision(self.config.precision, cpu=self.config.cpu)
        # pure bf16 casts before LoRA is added, so peft keeps the adapters in fp32
        self.train_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if self.config.stage.quantize is not None:  # QLoRA: a quantized, frozen base LM under the adapters
            quantize_base(self.model, method=self.config.stage.quantize, device=self.accelerator.device)
        self.model.to(self.train_dtype)
        self.param_groups = apply_stage(self.model, self.config.stage)
        if self.config.grad_ckpt:
            enable_checkpointing(lm_module(self.model.language_model))
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
        self.dataset = self._dataset(records, folder=folder)
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
            self.eval_dataset = self._dataset(read_records(config.eval_data), folder=eval_folder)

    def _dataset(self, records: list[Record], *, folder: Path) -> ConversationDataset:
        """Records checked before step 1: image paths, chat template, length (``ConversationDataset.validate``)."""
        c = self.config
        max_length = c.max_length or default_max_length(self.model.language_model.config)
        dataset = ConversationDataset(records, processor=self.vlm.processor, image_folder=folder, max_length=max_length,
                                      too_long=c.too_long, allow_outside_images=c.allow_outside_images)  # fmt: skip
        dataset.validate()
        return dataset

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

    def inputs(self, batch: Batch) -> dict[str, Any]:
        """The loss's keyword arguments: tensors on the device (and AnyRes tile layouts)."""
        device = self.accelerator.device
        inputs: dict[str, Any] = {"input_ids": batch.input_ids.to(device),
                                  "attention_mask": batch.attention_mask.to(device),
                                  "labels": batch.labels.to(device)}  # fmt: skip
        if batch.pixel_values.shape[0]:
            if self.cache is not None:
                inputs["vision_features"] = self.cache(batch.pixel_values, encode=self._encode, device=device)
            else:
                inputs["pixel_values"] = batch.pixel_values.to(device)
            if batch.image_layouts:  # AnyRes: how each image's tiles pack into its tokens
                inputs["image_layouts"] = batch.image_layouts
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


# re-exported: the loop's vocabulary, defined in the modules of their own concern
__all__ = [
    "METRICS_FILE", "PLOT_FILE", "PRECISIONS", "BatchLayout", "StepSampler", "StepStats", "TokenLoss", "TrainConfig",
    "TrainResult", "Trainer", "epoch_order", "lr_factor", "resolve_precision", "skipped_summary", "token_loss_sum",
    "where_loss", "where_readout",
]  # fmt: skip
