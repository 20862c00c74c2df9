"""Which records each process trains on at each step, and the learning-rate schedule.

The data order depends only on the step number (seeded per-epoch permutations), so a resumed run and a run
with a different process count see the same records at the same step."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch


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
