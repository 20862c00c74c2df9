"""The result of an evaluation run: per-sample predictions, per-task and overall scores, JSON and a table.

``EvalReport.to_dict()`` is the ``vlmkit eval --json`` schema::

    {"metric", "score", "n", "skipped", "tasks": {task: {"score", "n", "skipped"}},
     "skipped_samples": [{"id", "task", "reason"}], "model", "data", "seconds", "samples_per_second",
     "batch_size", "max_new_tokens"}

``score`` is null where nothing was evaluated. A task's score is the mean of its samples' scores, except for
BLEU, a corpus statistic, which is recomputed on the task's samples alone. CIDEr's per-sample scores use the
idf of the whole evaluated set, so the overall CIDEr is the mean of the per-task scores weighted by n.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass(frozen=True)
class Prediction:
    id: str
    task: str
    prediction: str
    references: tuple[str, ...]
    score: float  # this sample's score (per-sentence for BLEU / CIDEr)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "prediction": self.prediction,
                "references": list(self.references), "score": self.score}  # fmt: skip


@dataclass(frozen=True)
class Skipped:
    id: str
    task: str
    reason: str
    index: int = -1  # position in the data file


@dataclass(frozen=True)
class TaskScore:
    score: float | None
    n: int
    skipped: int


@dataclass
class EvalReport:
    metric: str
    score: float | None
    tasks: dict[str, TaskScore]
    predictions: list[Prediction]
    skipped_samples: list[Skipped]
    seconds: float
    batch_size: int
    max_new_tokens: int
    model: str | None = None
    data: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.predictions)

    @property
    def skipped(self) -> int:
        return len(self.skipped_samples)

    @property
    def samples_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        tasks = {name: {"score": t.score, "n": t.n, "skipped": t.skipped} for name, t in self.tasks.items()}
        skipped = [{"id": s.id, "task": s.task, "reason": s.reason} for s in self.skipped_samples]
        return {"metric": self.metric, "score": self.score, "n": self.n, "skipped": self.skipped,
                "tasks": tasks, "skipped_samples": skipped, "model": self.model, "data": self.data,
                "seconds": round(self.seconds, 3), "samples_per_second": round(self.samples_per_second, 3),
                "batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens} | self.extra  # fmt: skip


def _fmt(score: float | None) -> str:
    return "-" if score is None else f"{score:.4f}"


def print_table(report: EvalReport, *, file: TextIO | None = None) -> None:
    """A per-task table plus the overall row, with rich, to ``file`` (default: stderr)."""
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report.metric} on {report.data or 'data'}", title_justify="left")
    table.add_column("task")
    table.add_column("n", justify="right")
    table.add_column("skipped", justify="right")
    table.add_column(report.metric, justify="right")
    for name, task in sorted(report.tasks.items()):
        table.add_row(name, str(task.n), str(task.skipped), _fmt(task.score))
    table.add_section()
    table.add_row("overall", str(report.n), str(report.skipped), _fmt(report.score), style="bold")
    console = Console(file=file or sys.stderr, highlight=False)
    console.print(table)
    console.print(f"{report.n} samples in {report.seconds:.1f} s ({report.samples_per_second:.2f} samples/s)")
