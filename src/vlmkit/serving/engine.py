"""The model worker: one thread owns the model and serves a bounded queue with dynamic batching.

Non-streaming requests: the worker takes what is queued (waiting ``batch_wait`` for more to arrive, up to
``max_batch``), groups requests whose generation settings are identical, and runs one ``vlm.generate``
per group. Seeded sampling runs alone, so a seed reproduces the same answer however busy the server is.
If a batch fails, its requests are retried one by one so a single bad request cannot fail the others.

Streaming requests (``stream: true``) are not batched: each gets its own per-token generator
(``VLM.stream_sample``, what ``VLM.stream`` uses), and the worker advances every open stream by one
step between batches, up to ``max_batch`` streams at once, so streams interleave rather than queue behind
each other. Generators are resumable, which is what makes this possible on one thread.

Cancellation: a job whose client went away is dropped before it runs; an open stream is closed at its
next step (its KV cache freed). ``stop()`` refuses new jobs and lets the worker drain the queue first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from vlmkit.processing.processor import Sample

log = logging.getLogger("vlmkit.serving")


class QueueFull(Exception):
    """The waiting queue is at its limit (answered 429)."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new work (answered 503)."""


class JobCancelled(Exception):
    """The client went away before its job finished."""


@dataclass
class Completion:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class TextStream(Protocol):
    """Text deltas of one answer; after exhaustion, ``completion()`` describes the whole answer."""

    def __iter__(self) -> Iterator[str]: ...

    def close(self) -> None: ...

    def completion(self, text: str) -> Completion: ...


class Runner(Protocol):
    """What the engine needs from a model (``VLMRunner`` adapts a ``VLM``; tests use fakes)."""

    def generate(self, samples: Sequence[Sample], generation: dict[str, Any]) -> list[Completion]: ...

    def stream(self, sample: Sample, generation: dict[str, Any]) -> TextStream: ...


_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One request for the worker. Results go back to the event loop that submitted it."""

    sample: Sample
    generation: dict[str, Any]  # GenerationConfig keywords, max_new_tokens included
    stream: bool
    loop: asyncio.AbstractEventLoop
    future: Future[Completion] = field(default_factory=Future)
    # stream jobs: ("delta", str), then ("done", Completion) or ("error", Exception)
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    number: int = field(default_factory=lambda: next(_ids))
    # called once when the job ends however it ends (answered, failed, cancelled): frees what the request held
    on_end: Callable[[], None] | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share a batch; a seeded sampling job shares with nobody."""
        if self.generation.get("temperature", 0) > 0 and self.generation.get("seed") is not None:
            return ("alone", self.number)
        return tuple(sorted(self.generation.items()))

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, kind: str, value: Any) -> None:
        """Hand a stream event to the request's event loop (thread-safe; a closed loop drops it)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:
            pass  # the loop is gone: nobody is listening any more

    def end(self) -> None:
        callback, self.on_end = self.on_end, None
        if callback is not None:
            callback()

    def finish(self, *, result: Completion | None = None, error: BaseException | None = None) -> None:
        self.end()
        if self.stream:
            self.emit("done", result) if error is None else self.emit("error", error)
        elif not self.future.done():
            if error is not None:
                self.future.set_exception(error)
            else:  # callers pass exactly one of result / error
                self.future.set_result(cast(Completion, result))


@dataclass
class EngineStats:
    """Counters the metrics endpoint reads (written by the worker only)."""

    batches: int = 0
    batched_requests: int = 0
    cancelled: int = 0
    failed: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class Engine:
    """Bounded queue + one worker thread that runs the model."""

    def __init__(
        self,
        *,
        runner: Runner,
        max_batch: int = 8,
        queue_size: int = 64,
        batch_wait_s: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.runner = runner
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.batch_wait_s = batch_wait_s
        self.stats = EngineStats()
        self._on_batch = on_batch
        self._waiting: deque[Job] = deque()
        self._streams: list[_OpenStream] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vlmkit-engine", daemon=True)

    # ------------------------------------------------------------------------------------------- control

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, timeout: float | None = None) -> bool:
        """Refuse new jobs, finish queued and open ones, stop the worker; False if it did not end in time."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    # -------------------------------------------------------------------------------------------- worker

    def _run(self) -> None:
        while True:
            jobs = self._collect()
            if jobs is None:
                return
            batch = [job for job in jobs if not job.stream]
            self._streams.extend(_OpenStream(job=job) for job in jobs if job.stream)
            if batch:
                self._run_batch(batch)
            self._step_streams()

    def _collect(self) -> list[Job] | None:
        """Block for work when idle; gather a batch window's worth; None once stopped and drained."""
        with self._cond:
            if not self._streams:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if not self._waiting:
                    return None
                deadline = time.monotonic() + self.batch_wait_s
                # a short wait lets concurrent requests join one batch instead of running one by one
                while len(self._waiting) < self.max_batch and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            return self._take_locked()

    def _take_locked(self) -> list[Job]:
        """Up to max_batch batchable jobs and as many streams as there are free slots, in FIFO order."""
        taken: list[Job] = []
        kept: deque[Job] = deque()
        batchable, stream_slots = 0, self.max_batch - len(self._streams)
        while self._waiting:
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                self._drop(job)
            elif job.stream and stream_slots > 0:
                taken.append(job)
                stream_slots -= 1
            elif not job.stream and batchable < self.max_batch:
                taken.append(job)
                batchable += 1
            else:
                kept.append(job)
        self._waiting = kept
        return taken

    def _drop(self, job: Job) -> None:
        self.stats.cancelled += 1
        job.finish(error=JobCancelled())

    def _run_batch(self, jobs: list[Job]) -> None:
        groups: dict[tuple[Any, ...], list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.key, []).append(job)
        for group in groups.values():
            live = [job for job in group if not job.cancelled.is_set()]
            for job in group:
                if job.cancelled.is_set():
                    self._drop(job)
            if live:
                self._generate(live)

    def _generate(self, jobs: list[Job]) -> None:
        try:
            results = self.runner.generate([job.sample for job in jobs], jobs[0].generation)
        except Exception as exc:  # noqa: BLE001 - isolate the culprit, keep the worker alive
            if len(jobs) > 1:
                for job in jobs:
                    self._generate([job])
                return
            log.exception("generation failed")
            self.stats.failed += 1
            jobs[0].finish(error=exc)
            return
        self.stats.batches += 1
        self.stats.batched_requests += len(jobs)
        if self._on_batch is not None:
            self._on_batch(len(jobs))
        for job, result in zip(jobs, results, strict=True):
            job.finish(result=result)

    def _step_streams(self) -> None:
        """Advance every open stream by one delta; finished or cancelled ones are closed and removed."""
        still_open: list[_OpenStream] = []
        for stream in self._streams:
            if stream.step(self):
                still_open.append(stream)
        self._streams = still_open


@dataclass(eq=False)
class _OpenStream:
    """A stream job and its generator (created on the first step: that is where prefill happens)."""

    job: Job
    text: TextStream | None = None
    deltas: Iterator[str] | None = None
    emitted: list[str] = field(default_factory=list)

    def step(self, engine: Engine) -> bool:
        """One delta; False once this stream is finished (its final event already sent)."""
        if self.job.cancelled.is_set():
            self._close()
            self.job.end()
            engine.stats.cancelled += 1
            return False
        try:
            if self.deltas is None:
                self.text = engine.runner.stream(self.job.sample, self.job.generation)
                self.deltas = iter(self.text)
            delta = next(self.deltas)
        except StopIteration:
            assert self.text is not None
            self.job.finish(result=self.text.completion("".join(self.emitted)))
            return False
        except Exception as exc:  # noqa: BLE001 - one failed stream must not stop the worker
            log.exception("streaming generation failed")
            engine.stats.failed += 1
            self._close()
            self.job.finish(error=exc)
            return False
        self.emitted.append(delta)
        self.job.emit("delta", delta)
        return True

    def _close(self) -> None:
        if self.text is not None:
            self.text.close()
