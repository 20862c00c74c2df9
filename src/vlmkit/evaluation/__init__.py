"""Evaluation: metrics (pure Python), the batched runner, and reports.

``evaluate`` needs torch (through the model); the metrics, record reader and report do not, so they import
eagerly and ``evaluate`` loads on first use.
"""

from typing import Any

from vlmkit.evaluation.metrics import METRIC_NAMES, MetricResult, compute_metric
from vlmkit.evaluation.records import EvalItem, read_records
from vlmkit.evaluation.report import EvalReport, Prediction, TaskScore

__all__ = ["METRIC_NAMES", "EvalItem", "EvalReport", "MetricResult", "Prediction", "TaskScore", "compute_metric",
           "evaluate", "read_records"]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from vlmkit.evaluation.runner import evaluate

        return evaluate
    raise AttributeError(f"module 'vlmkit.evaluation' has no attribute {name!r}")
