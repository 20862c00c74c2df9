"""One training run around a ``Trainer``: output-dir checks, resume, progress, metrics, checkpoints, final save.

``OUT`` after a run::

    config.json, model.safetensors, tokenizer files   the trained model (LoRA merged): VLM.from_pretrained(OUT)
    adapter/                                          LoRA runs only: peft adapters + projector (see lora.py)
    training_state/                                   the final checkpoint (``--resume`` continues from it)
    checkpoints/step-N/                               the last K periodic checkpoints (``--save-every``)
    metrics.jsonl                                     one JSON object per logged step: step, loss, lr, ...
    loss.png                                          the loss curve
    feature_cache/                                    cached vision features (frozen tower only)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from vlmkit.data.dataset import DataError
from vlmkit.training import checkpoint as ckpt
from vlmkit.training import fsdp
from vlmkit.training.config import (
    METRICS_FILE,
    PLOT_FILE,
    StepStats,
    TrainConfig,
    TrainResult,
    skipped_summary,
)
from vlmkit.training.loop import Trainer, resolve_precision
from vlmkit.training.stages import parameter_table

# what an output directory may already hold when a fresh (non-resume) run starts in it
_REUSABLE = {"feature_cache"}


class Interval:
    """Sums since the last log line."""

    def __init__(self) -> None:
        self.loss_sum, self.targets, self.tokens, self.since = 0.0, 0, 0, time.monotonic()

    def add(self, stats: StepStats) -> None:
        self.loss_sum += stats.loss_sum
        self.targets += stats.target_tokens
        self.tokens += stats.tokens

    @property
    def loss(self) -> float | None:
        return self.loss_sum / self.targets if self.targets else None

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.monotonic() - self.since, 1e-9)


class RunSession:
    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer
        self.config = trainer.config
        self.out = trainer.out
        self.metrics = self.out / METRICS_FILE
        from rich.console import Console

        self.console = Console(stderr=True, quiet=not trainer.is_main)
        self.start = time.monotonic()
        self.tps = 0.0  # tokens/s over the last log interval
        self.first_step, self.targets = 0, 0  # this session's: target tokens trained on

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def run(self) -> TrainResult:
        t = self.t
        self._check_out()
        self._resume()
        self.first_step = t.step
        self._describe()
        self.start, stopped, interval = time.monotonic(), "done", Interval()
        with self._progress() as (progress, task):
            for batches in t.batch_stream(start=t.step, stop=t.total_steps):
                if self._out_of_time():
                    stopped = "max_minutes"
                    break
                stats = t.train_step(batches)
                t.step += 1
                interval = self._after_step(stats, interval)
                progress.update(task, completed=t.step, loss=_fmt(t.last_loss), tps=f"{self.tps:,.0f}")
        return self._finish(stopped)

    # ---------------------------------------------------------------------------------------- set-up

    def _check_out(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
        if not self.config.resume:
            if ckpt.latest_checkpoint(out) is not None:
                raise ValueError(
                    f"{out} already holds a training run; pass --resume to continue it or choose another --out"
                )
            if out.is_dir() and {p.name for p in out.iterdir()} - _REUSABLE:
                raise ValueError(f"refusing to train into {out}: it is not empty (choose a new --out)")
        self.t.accelerator.wait_for_everyone()  # every process checked before any writes
        if self.t.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if not self.config.resume:
                self.metrics.unlink(missing_ok=True)

    def _resume(self) -> None:
        t = self.t
        path = ckpt.latest_checkpoint(self.out) if self.config.resume else None
        if path is None:
            if self.config.resume:
                self.note(f"no checkpoint in {self.out}; starting from step 0")
                if t.is_main:  # killed before its first checkpoint: the lines it logged are logged again
                    self._truncate_metrics(0)
            return
        state = ckpt.read_json(path / ckpt.TRAINER_FILE)
        current = t.fingerprint()
        changed = sorted(k for k in current if state["fingerprint"].get(k) != current[k])
        if changed:
            raise ckpt.CheckpointError(
                f"cannot resume from {path}: {', '.join(changed)} differ from the interrupted run; "
                "resume with the same data, stage, batch sizes, seed, precision and process count"
            )
        t.load_state(path)
        ckpt.load_rng(path, rank=t.rank)
        t.step, t.tokens_seen, t.skipped = state["step"], state["tokens_seen"], dict(state["skipped"])
        t.elapsed_before, t.last_loss = state["elapsed_s"], state.get("loss")
        if t.is_main:
            self._truncate_metrics(t.step)
        self.note(f"resumed from {path} at step {t.step}")

    def _truncate_metrics(self, step: int) -> None:
        """Drop lines logged after the checkpoint, so the resumed run's lines are not duplicated."""
        if not self.metrics.is_file():
            return
        keep = [line for line in self.metrics.read_text().splitlines() if _line_step(line) <= step]
        self.metrics.write_text("".join(line + "\n" for line in keep))

    def _describe(self) -> None:
        t, c = self.t, self.config
        self.console.print(
            parameter_table(t.model, param_groups=t.param_groups, title=f"stage {c.stage.stage}: parameters")
        )
        precision = resolve_precision(c.precision, cpu=c.cpu)
        self.note(
            f"{len(t.dataset)} records, global batch {t.layout.global_batch} ({c.batch_size} x {c.grad_accum} "
            f"accumulation x {t.world} process(es){', FSDP' if t.fsdp else ''}), {t.total_steps} steps, "
            f"{precision} on {t.accelerator.device}, vision features {'cached' if t.cache else 'computed every step'}"
        )
        data = t.dataset
        if data.skip_reasons or data.truncated:
            self.note(f"before training: {len(data.skip_reasons)} record(s) skipped, {data.truncated} truncated "
                      f"to {data.max_length} tokens (--max-length, --too-long)")  # fmt: skip
        note = fsdp.accelerate_note() if t.fsdp else None
        if note:
            self.note(note)

    @contextmanager
    def _progress(self) -> Iterator[tuple[Any, Any]]:
        """A rich progress bar on stderr (main process only): step, loss, tokens/s, elapsed, ETA."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]  # fmt: skip
        disable = not (self.t.is_main and self.config.progress)
        with Progress(*columns, console=self.console, disable=disable) as progress:
            yield (
                progress,
                progress.add_task(
                    "train", total=self.t.total_steps, completed=self.t.step, loss="-", tps="-"
                ),
            )

    # ------------------------------------------------------------------------------------------ steps

    def _after_step(self, stats: StepStats, interval: Interval) -> Interval:
        t, c = self.t, self.config
        t.tokens_seen += stats.tokens
        interval.add(stats)
        self.targets += stats.target_tokens
        evaluate = bool(t.eval_dataset is not None and c.eval_every and t.step % c.eval_every == 0)
        eval_loss = t.evaluate() if evaluate else None
        if evaluate or t.step % c.log_every == 0 or t.step == t.total_steps:
            self._log(interval, stats=stats, eval_loss=eval_loss)
            interval = Interval()
        if c.save_every and t.step % c.save_every == 0 and t.step < t.total_steps:
            self.save_checkpoint(ckpt.checkpoint_dir(self.out, step=t.step))
        if t.on_step is not None:
            t.on_step(t.step)
        return interval

    def _log(self, interval: Interval, *, stats: StepStats, eval_loss: float | None) -> None:
        t = self.t
        t.last_loss = interval.loss
        self.tps = tps = interval.tokens_per_s()
        row = {"step": t.step, "epoch": round(t.step * t.layout.global_batch / len(t.dataset), 4),
               "loss": interval.loss, "lr": {g["name"]: g["lr"] for g in t.optimizer.param_groups},
               "grad_norm": stats.grad_norm, "tokens_per_s": round(tps, 1), "target_tokens": interval.targets,
               "elapsed_s": round(self.elapsed(), 3)}  # fmt: skip
        if eval_loss is not None:
            row["eval_loss"] = eval_loss
        if stats.where_loss is not None:
            row["where_loss"] = round(stats.where_loss, 5)
        self._append_metrics(row)

    def _append_metrics(self, row: dict[str, Any]) -> None:
        if self.t.is_main:
            with open(self.metrics, "a") as handle:
                handle.write(json.dumps(row, separators=(",", ":")) + "\n")

    def elapsed(self) -> float:
        """Training seconds over all sessions of this run."""
        return self.t.elapsed_before + time.monotonic() - self.start

    def _out_of_time(self) -> bool:
        limit = self.config.max_minutes
        if limit is None:
            return False
        over = torch.tensor([float(time.monotonic() - self.start > limit * 60)])
        return bool(self.t.all_sum(over)[0] > 0)  # every process stops at the same step

    # ------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, final: Path) -> None:
        """Atomic: every process writes into the staging dir; the main process renames it when complete."""
        t = self.t
        staging = ckpt.staging_dir(final)
        skipped = self._gathered_skipped()
        # FSDP gathers the full tensors here, so every process calls these
        weights, optimizer = t.trainable_state(), t.optimizer_state()
        if t.is_main:
            ckpt.remove_tree(staging)
            staging.mkdir(parents=True)
        t.accelerator.wait_for_everyone()
        ckpt.write_rng(staging, rank=t.rank)
        if t.is_main:
            state = self._scheduler_state()
            ckpt.write_main_state(staging, weights=weights, optimizer=optimizer, scheduler=state)
        t.accelerator.wait_for_everyone()
        if t.is_main:
            # trainer.json last: its presence marks a complete checkpoint
            ckpt.write_json(staging / ckpt.TRAINER_FILE, data=self._trainer_state(skipped))
            ckpt.commit(staging, final=final)
            ckpt.prune(self.out, keep=self.config.keep_last)
        t.accelerator.wait_for_everyone()

    def _scheduler_state(self) -> dict[str, Any]:
        t = self.t
        return {"type": "warmup_cosine", "step": t.step, "total_steps": t.schedule_steps, "warmup_steps": t.warmup,
                "min_lr_ratio": self.config.min_lr_ratio,
                "base_lrs": {g["name"]: g["base_lr"] for g in t.optimizer.param_groups}}  # fmt: skip

    def _trainer_state(self, skipped: dict[str, str]) -> dict[str, Any]:
        t = self.t
        return {"step": t.step, "total_steps": t.total_steps, "tokens_seen": t.tokens_seen, "loss": t.last_loss,
                "elapsed_s": self.elapsed(), "skipped": skipped, "fingerprint": t.fingerprint()}  # fmt: skip

    def _gathered_skipped(self) -> dict[str, str]:
        if self.t.world == 1:
            return dict(self.t.skipped)
        from accelerate.utils import gather_object

        merged: dict[str, str] = {}
        for part in gather_object([self.t.skipped]):
            merged.update(part)
        return merged

    # -------------------------------------------------------------------------------------------- end

    def _finish(self, stopped: str) -> TrainResult:
        t = self.t
        # every record of every step was skipped: nothing was learned, so nothing is saved as if it had been
        if self.first_step == 0 and t.step > 0 and self.targets == 0:
            raise DataError(f"no record could be trained on: {skipped_summary(self._gathered_skipped())}")
        evaluated_now = self.config.eval_every and t.step % self.config.eval_every == 0
        if t.eval_dataset is not None and not evaluated_now and t.evaluate() is not None:
            self._append_metrics({"step": t.step, "loss": t.last_loss, "eval_loss": t.last_eval})
        self.save_checkpoint(self.out / ckpt.FINAL_STATE)
        skipped = self._gathered_skipped()
        vlm = t.trained_vlm()  # FSDP gathers the full model here: every process calls
        if t.is_main:
            self._save_model(vlm)
            if self.config.plot and self.metrics.is_file():
                from vlmkit.training.plot import plot_loss

                plot_loss(self.metrics, out=self.out / PLOT_FILE)
        t.accelerator.wait_for_everyone()
        elapsed = time.monotonic() - self.start
        if skipped:
            self.note(skipped_summary(skipped))
        how = "done" if stopped == "done" else "stopped by --max-minutes"
        self.note(f"saved the trained model to {self.out} (step {t.step}, {how})")
        return TrainResult(out=self.out, steps=t.step, loss=t.last_loss, eval_loss=t.last_eval, tokens=t.tokens_seen,
                           tokens_per_s=self.tps, elapsed_s=elapsed, stopped=stopped,
                           skipped=skipped, main_process=t.is_main, truncated=t.dataset.truncated)  # fmt: skip

    def _save_model(self, vlm: Any) -> None:
        """Merge LoRA (keeping the adapter aside), restore the input dtype, and add the model files to OUT."""
        from vlmkit.training.lora import ADAPTER_DIR, has_adapters, merge_lora, save_adapters

        if has_adapters(vlm):
            save_adapters(vlm, directory=self.out / ADAPTER_DIR)
            merge_lora(vlm)
        vlm.model.to(self.t.saved_dtype).eval()
        staging = vlm.save_pretrained(self.out / f".model-{os.getpid()}.tmp")
        for old in self.out.glob("model*.safetensors*"):
            old.unlink()
        for item in staging.iterdir():
            os.replace(item, self.out / item.name)
        staging.rmdir()


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a torn line from the crash: drop it


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def train(vlm: Any, config: TrainConfig, *, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``vlm`` in place as ``config`` says and write the result to ``config.out``.

    ``on_step(step)`` runs after every optimizer step (and its logging/checkpointing).
    """
    return RunSession(Trainer(vlm, config=config, on_step=on_step)).run()
