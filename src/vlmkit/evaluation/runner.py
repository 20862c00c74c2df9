"""Run a VLM over evaluation records: batched greedy generation, then per-task and overall scores.

Records are batched in order of (image count, prompt length) so padding stays small; results are reported
in file order. A record whose images are missing or corrupt, or that cannot be turned into a prompt, is
skipped and listed in the report with its reason; it never stops the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmkit.evaluation.metrics import METRIC_NAMES, compute_metric
from vlmkit.evaluation.records import EvalItem, RecordError, record_id, to_items
from vlmkit.evaluation.report import EvalReport, Prediction, Skipped, TaskScore, group_scores

if TYPE_CHECKING:
    from PIL.Image import Image

    from vlmkit.api import VLM

Progress = Callable[[int, int], None]  # (items done, items to run)
Key = tuple[int, int]  # (record index, turn): one scored reply


def evaluate(
    vlm: VLM,
    records: Iterable[dict[str, Any]],
    *,
    image_folder: Path | str,
    metric: str = "exact_match",
    batch_size: int = 8,
    max_new_tokens: int = 128,
    limit: int | None = None,
    progress: Progress | None = None,
    model: str | None = None,
    data: str | None = None,
    last_turn_only: bool = False,
) -> EvalReport:
    """Answer every record greedily and score the answers against the references with ``metric``.

    Every ``gpt`` turn of a multi-turn record is scored, the conversation before it (reference replies as
    history) given as context; ``last_turn_only`` scores only each record's last one.
    """
    if metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRIC_NAMES)}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    start = time.perf_counter()
    chosen = list(records)[:limit] if limit is not None else list(records)
    items, skipped = prepare_items(
        chosen, image_token=vlm.config.prompt.image_token, last_only=last_turn_only
    )
    answers: dict[Key, str] = {}
    ordered = sorted(
        items, key=lambda item: (len(item.images), sum(len(m["content"]) for m in item.messages))
    )
    for start_row in range(0, len(ordered), batch_size):
        batch = ordered[start_row : start_row + batch_size]
        answers |= _run_batch(vlm, batch, image_folder=Path(image_folder), max_new_tokens=max_new_tokens,
                              skipped=skipped)  # fmt: skip
        if progress is not None:
            progress(min(start_row + batch_size, len(ordered)), len(ordered))
    return score(
        [item for item in items if _key(item) in answers], answers=answers, skipped=skipped, metric=metric,
        seconds=time.perf_counter() - start, batch_size=batch_size, max_new_tokens=max_new_tokens,
        model=model, data=data,
    )  # fmt: skip


def _key(item: EvalItem) -> Key:
    return item.index, item.turn


def prepare_items(
    records: Sequence[dict[str, Any]], *, image_token: str, last_only: bool = False
) -> tuple[list[EvalItem], list[Skipped]]:
    items, skipped = [], []
    for index, record in enumerate(records):
        try:
            items.extend(to_items(record, index=index, image_token=image_token, last_only=last_only))
        except RecordError as exc:
            skipped.append(Skipped(id=record_id(record, index=index), task=str(record.get("task") or "default"),
                                   reason=str(exc), index=index))  # fmt: skip
    return items, skipped


def _run_batch(
    vlm: VLM, batch: list[EvalItem], *, image_folder: Path, max_new_tokens: int, skipped: list[Skipped]
) -> dict[Key, str]:
    """{item key: answer} for the items whose images load; the others are appended to ``skipped``."""
    from vlmkit.processing.processor import Sample

    ready: list[tuple[EvalItem, list[Image]]] = []
    for item in batch:
        try:
            ready.append((item, _load_images(item, image_folder=image_folder)))
        except (ValueError, OSError) as exc:  # ImageLoadError is a ValueError
            skipped.append(Skipped(id=item.id, task=item.task, reason=str(exc), index=item.index))
    if not ready:
        return {}
    samples = [Sample(messages=[dict(m) for m in item.messages], images=images) for item, images in ready]
    texts = vlm.generate(samples, max_new_tokens=max_new_tokens, temperature=0.0).texts
    return {_key(item): text.strip() for (item, _), text in zip(ready, texts, strict=True)}


def _load_images(item: EvalItem, *, image_folder: Path) -> list[Image]:
    from vlmkit.processing.image import load_image

    return [load_image(image_folder / path) for path in item.images]


def score(
    items: list[EvalItem],
    *,
    answers: dict[Key, str],
    skipped: list[Skipped],
    metric: str,
    seconds: float,
    batch_size: int,
    max_new_tokens: int,
    model: str | None = None,
    data: str | None = None,
) -> EvalReport:
    """Overall and per-task scores of ``answers`` (keyed by item index) as an ``EvalReport``."""
    overall = compute_metric(metric, predictions=[answers[_key(i)] for i in items],
                             references=[i.references for i in items])  # fmt: skip
    predictions = [Prediction(id=i.id, task=i.task, prediction=answers[_key(i)], references=i.references,
                              score=s, turn=i.turn, kind=i.kind)
                   for i, s in zip(items, overall.per_sample, strict=True)]  # fmt: skip
    tasks = {}
    for task in sorted({i.task for i in items} | {s.task for s in skipped}):
        subset = [p for p in predictions if p.task == task]
        tasks[task] = TaskScore(score=_task_score(metric, subset), n=len(subset),
                                skipped=sum(s.task == task for s in skipped))  # fmt: skip
    multi_turn = any(i.turn > 1 or i.kind for i in items)
    return EvalReport(metric=metric, score=overall.score if items else None, tasks=tasks, predictions=predictions,
                      skipped_samples=sorted(skipped, key=lambda s: s.index), seconds=seconds, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, model=model, data=data,
                      turns=group_scores(predictions, by=lambda p: str(p.turn)) if multi_turn else {},
                      kinds=group_scores(predictions, by=lambda p: p.kind) if multi_turn else {})  # fmt: skip


def _task_score(metric: str, subset: list[Prediction]) -> float | None:
    """BLEU is a corpus statistic: recomputed on the task's samples. The others average per-sample scores
    (for CIDEr those use the idf of the whole evaluated set, so a task with one sample still scores)."""
    if not subset:
        return None
    if metric == "bleu":
        return compute_metric(metric, predictions=[p.prediction for p in subset],
                              references=[p.references for p in subset]).score  # fmt: skip
    return sum(p.score for p in subset) / len(subset)
