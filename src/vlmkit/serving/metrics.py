"""Prometheus text-format metrics (exposition format 0.0.4), written by hand: no client library needed.

Requests by route and status, a latency histogram per route, prompt/completion token counters, batch
sizes, queue depth and open streams, cancellations, and, when the model exposes them, cache counters
(the VLM's ``feature_cache`` / ``prefix_cache`` ``stats()``, or a ``cache_stats()`` on it or its model).
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Cumulative buckets + sum + count, one series per label value."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0] * (len(self.buckets) + 1))
        self.sums: dict[str, float] = defaultdict(float)

    def observe(self, label: str, value: float) -> None:
        counts = self.counts[label]
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                counts[index] += 1
        counts[-1] += 1  # +Inf
        self.sums[label] += value

    def lines(self, name: str, label_name: str) -> Iterable[str]:
        for label, counts in sorted(self.counts.items()):
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                le = "+Inf" if bound == math.inf else f"{bound:g}"
                yield f'{name}_bucket{{{label_name}="{label}",le="{le}"}} {count}'
            yield f'{name}_sum{{{label_name}="{label}"}} {self.sums[label]:.6f}'
            yield f'{name}_count{{{label_name}="{label}"}} {counts[-1]}'


class Metrics:
    """Thread-safe: the event loop records requests, the worker records batches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        # values read at scrape time: name -> (type, help, read), e.g. queue depth from the engine
        self.live: dict[str, tuple[str, str, Callable[[], float]]] = {}
        # cache name -> its stats() (hits, misses, entries, bytes ...), read at scrape time
        self.cache_sources: dict[str, Callable[[], dict[str, Any]]] = {}

    def observe_request(self, *, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.latency.observe(route, seconds)

    def observe_tokens(self, *, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self.batch_size.observe("generate", size)

    def add_live(self, name: str, *, kind: str, help_text: str, read: Callable[[], float]) -> None:
        self.live[name] = (kind, help_text, read)

    def render(self) -> str:
        with self._lock:
            lines = [*self._request_lines(), *self._token_lines(), *self._live_lines(), *self._cache_lines()]
        return "\n".join(lines) + "\n"

    def _request_lines(self) -> Iterable[str]:
        yield "# HELP vlmkit_requests_total HTTP requests by route and status code."
        yield "# TYPE vlmkit_requests_total counter"
        for (route, status), count in sorted(self.requests.items()):
            yield f'vlmkit_requests_total{{route="{route}",status="{status}"}} {count}'
        yield "# HELP vlmkit_request_duration_seconds Time to the end of the response (streams: last chunk)."
        yield "# TYPE vlmkit_request_duration_seconds histogram"
        yield from self.latency.lines("vlmkit_request_duration_seconds", "route")
        yield "# HELP vlmkit_batch_size Requests per batched generate call."
        yield "# TYPE vlmkit_batch_size histogram"
        yield from self.batch_size.lines("vlmkit_batch_size", "kind")

    def _token_lines(self) -> Iterable[str]:
        counters = (("prompt_tokens", "Prompt tokens (image tokens included) of answered requests.",
                     self.prompt_tokens),
                    ("completion_tokens", "Generated tokens of answered requests.",
                     self.completion_tokens))  # fmt: skip
        for name, help_text, value in counters:
            yield f"# HELP vlmkit_{name}_total {help_text}"
            yield f"# TYPE vlmkit_{name}_total counter"
            yield f"vlmkit_{name}_total {value}"

    def _live_lines(self) -> Iterable[str]:
        for name, (kind, help_text, read) in sorted(self.live.items()):
            yield f"# HELP vlmkit_{name} {help_text}"
            yield f"# TYPE vlmkit_{name} {kind}"
            yield f"vlmkit_{name} {_number(read())}"

    def _cache_lines(self) -> Iterable[str]:
        """``vlmkit_cache_<stat>{cache="<name>"}`` for every numeric stat of every cache the model has."""
        by_stat: dict[str, dict[str, float]] = defaultdict(dict)
        for cache, read in sorted(self.cache_sources.items()):
            try:
                stats = read()
            except Exception:  # noqa: BLE001 - a scrape must never fail on an optional source
                continue
            for key, value in stats.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    by_stat[_metric_name(str(key))][cache] = value
        for stat, values in sorted(by_stat.items()):
            yield f"# TYPE vlmkit_cache_{stat} gauge"
            for cache, value in sorted(values.items()):
                yield f'vlmkit_cache_{stat}{{cache="{cache}"}} {_number(value)}'


def _number(value: float) -> str:
    """Integers exactly (no 2.68435e+08 for a byte count), other values as Python's shortest repr."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _metric_name(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key).lower()


def find_cache_stats(vlm: Any) -> dict[str, Callable[[], dict[str, Any]]]:
    """The model's cache counters: ``vlm.feature_cache`` / ``vlm.prefix_cache`` (``.stats()``), or a
    ``cache_stats()`` on the VLM or its model; name -> stats callable."""
    sources: dict[str, Callable[[], dict[str, Any]]] = {}
    for name in ("feature_cache", "prefix_cache"):
        stats = getattr(getattr(vlm, name, None), "stats", None)
        if callable(stats):
            sources[name.removesuffix("_cache")] = stats
    for owner in (vlm, getattr(vlm, "model", None)):
        stats = getattr(owner, "cache_stats", None)
        if callable(stats) and "model" not in sources:
            sources["model"] = stats
    return sources
