"""The result of an evaluation run: per-sample predictions, per-task and overall scores, JSON and a table.

``EvalReport.to_dict()`` is the ``vlmkit eval --json`` schema::

    {"metric", "score", "n", "skipped", "tasks": {task: {"score", "n", "skipped"}},
     "skipped_samples": [{"id", "task", "reason"}], "model", "data", "seconds", "samples_per_second",
     "batch_size", "max_new_tokens"}

Multi-turn data (a record with several scored gpt turns, or turn labels) adds ``"turns"`` (turn position ->
``{"score", "n"}``), ``"kinds"`` (turn label, e.g. new_image / follow_up / reference -> the same) and
``"task_turns"`` (task -> turn position -> score); each prediction then carries its ``turn`` and ``kind``.

``score`` is null where nothing was evaluated. A task's score is the mean of its samples' scores, except for
BLEU, a corpus statistic, which is recomputed on the task's samples alone. CIDEr's per-sample scores use the
idf of the whole evaluated set, so the overall CIDEr is the mean of the per-task scores weighted by n.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass(frozen=True)
class Prediction:
    id: str
    task: str
    prediction: str
    references: tuple[str, ...]
    score: float  # this sample's score (per-sentence for BLEU / CIDEr)
    turn: int = 1  # which gpt turn of its record (1-based)
    kind: str | None = None  # the record's label for that turn

    def to_dict(self) -> dict[str, Any]:
        extra = {"turn": self.turn, "kind": self.kind} if self.turn != 1 or self.kind else {}
        return {"id": self.id, "task": self.task, "prediction": self.prediction,
                "references": list(self.references), "score": self.score} | extra  # fmt: skip


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
    turns: dict[str, TaskScore] = field(default_factory=dict)  # turn position -> score (multi-turn data)
    kinds: dict[str, TaskScore] = field(default_factory=dict)  # turn label -> score (multi-turn data)

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
                "batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens} | self._turn_dict() | self.extra  # fmt: skip

    def _turn_dict(self) -> dict[str, Any]:
        if not self.turns:
            return {}
        task_turns: dict[str, dict[str, float]] = {}
        for task in sorted({p.task for p in self.predictions}):
            cells = group_scores([p for p in self.predictions if p.task == task], by=lambda p: str(p.turn))
            task_turns[task] = {turn: cell.score for turn, cell in cells.items() if cell.score is not None}
        return {"turns": {k: {"score": v.score, "n": v.n} for k, v in self.turns.items()},
                "kinds": {k: {"score": v.score, "n": v.n} for k, v in self.kinds.items()},
                "task_turns": task_turns}  # fmt: skip


def group_scores(
    predictions: list[Prediction], *, by: Callable[[Prediction], str | None]
) -> dict[str, TaskScore]:
    """Mean per-sample score of each group (``by`` -> its name; None: not grouped), groups in sorted order."""
    groups: dict[str, list[float]] = {}
    for prediction in predictions:
        name = by(prediction)
        if name is not None:
            groups.setdefault(name, []).append(prediction.score)
    order = sorted(groups, key=lambda name: (len(name), name))  # "2" before "10"
    return {name: TaskScore(score=sum(groups[name]) / len(groups[name]), n=len(groups[name]), skipped=0)
            for name in order}  # fmt: skip


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
    if report.turns:
        console.print(_turn_table(report))
    console.print(f"{report.n} samples in {report.seconds:.1f} s ({report.samples_per_second:.2f} samples/s)")


def _turn_table(report: EvalReport) -> Any:
    """Task x turn position, then a row per turn label (first, new_image, ...) and one per turn position."""
    from rich.table import Table

    turns = list(report.turns)
    table = Table(title=f"{report.metric} by task and turn", title_justify="left")
    table.add_column("task / turn label", no_wrap=True)
    table.add_column("all", justify="right")
    for turn in turns:
        table.add_column(turn, justify="right")
    for task in sorted({p.task for p in report.predictions}):
        subset = [p for p in report.predictions if p.task == task]
        cells = group_scores(subset, by=lambda p: str(p.turn))
        table.add_row(task, _fmt(report.tasks[task].score), *(_cell(cells.get(turn)) for turn in turns))
    table.add_section()
    for kind, total in report.kinds.items():
        cells = group_scores([p for p in report.predictions if p.kind == kind], by=lambda p: str(p.turn))
        table.add_row(f"{kind} ({total.n})", _fmt(total.score), *(_cell(cells.get(turn)) for turn in turns))
    table.add_section()
    table.add_row(
        "all turns", _fmt(report.score), *(_cell(report.turns[turn]) for turn in turns), style="bold"
    )
    table.add_row("n", str(report.n), *(str(report.turns[turn].n) for turn in turns))
    return table


def _cell(score: TaskScore | None) -> str:
    return "" if score is None else f"{score.score:.2f}"
