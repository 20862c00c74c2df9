"""``vlmkit eval --model DIR --data FILE --image-folder DIR``: score a model's greedy answers on a data set.

A per-task table goes to stderr; stdout gets one summary line, or the full report with ``--json``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vlmkit.cli.common import (
    CLIError,
    DeviceOption,
    DType,
    DTypeOption,
    ImageFolderOption,
    JsonOption,
    ModelOption,
    QuantizeOption,
    load_model,
    write_json,
)

if TYPE_CHECKING:
    from vlmkit.evaluation.report import EvalReport
    from vlmkit.evaluation.runner import Progress


class Turns(str, Enum):
    all = "all"
    last = "last"


class Metric(str, Enum):
    exact_match = "exact_match"
    vqa = "vqa"
    anls = "anls"
    bleu = "bleu"
    cider = "cider"


def eval_command(
    data: Annotated[
        Path, typer.Option("--data", "-d", help="LLaVA-format JSON array or JSONL to evaluate on.")
    ],
    model: ModelOption = None,
    image_folder: ImageFolderOption = None,
    metric: Annotated[Metric, typer.Option("--metric", help="How answers are scored.")] = Metric.exact_match,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Records generated together.")] = 8,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Evaluate only the first N records.")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Most tokens generated per answer.")
    ] = 128,
    turns: Annotated[
        Turns,
        typer.Option(
            "--turns", help="Multi-turn records: score every gpt turn (history as context) or the last."
        ),
    ] = Turns.all,
    save_predictions: Annotated[
        Path | None, typer.Option("--save-predictions", help="Write one JSON line per evaluated sample here.")
    ] = None,
    as_json: JsonOption = False,
    dtype: DTypeOption = DType.auto,
    device: DeviceOption = None,
    quantize: QuantizeOption = None,
) -> None:
    """Answer every record greedily and score the answers; missing or corrupt images are skipped and counted."""
    from vlmkit.evaluation.records import read_records
    from vlmkit.evaluation.report import print_table
    from vlmkit.evaluation.runner import evaluate

    folder = _check_paths(data=data, image_folder=image_folder)
    records = read_records(data)  # a malformed file fails before the slow model load
    vlm = load_model(model, dtype=dtype, device=device, quantize=quantize)
    with _progress() as progress:
        report = evaluate(vlm, records, image_folder=folder, metric=metric.value, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, limit=limit, progress=progress,
                          model=str(model) if model else None, data=str(data),
                          last_turn_only=turns is Turns.last)  # fmt: skip
    print_table(report)
    if save_predictions is not None:
        _write_predictions(save_predictions, report)
    if as_json:
        write_json(report.to_dict())
    else:
        score = "-" if report.score is None else f"{report.score:.4f}"
        typer.echo(f"{report.metric}: {score} ({report.n} evaluated, {report.skipped} skipped)")


def _check_paths(*, data: Path, image_folder: Path | None) -> Path:
    if not data.is_file():
        raise CLIError(f"--data {data}: no such file")
    folder = image_folder if image_folder is not None else data.parent
    if not folder.is_dir():
        raise CLIError(f"--image-folder {folder}: no such directory")
    return folder


def _write_predictions(path: Path, report: EvalReport) -> None:
    lines = [json.dumps(p.to_dict(), ensure_ascii=False) for p in report.predictions]
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


@contextlib.contextmanager
def _progress() -> Iterator[Progress]:
    """A transient rich progress bar on stderr (silent when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import Progress as Bar

    console = Console(stderr=True)
    with Bar(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("evaluating", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
