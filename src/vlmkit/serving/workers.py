"""Request preparation's threads and the memory budget for decoded images.

``WorkerPool`` is a few daemon threads fed from one queue: a heavy request occupies one thread while the
others keep preparing, and a thread stuck in a library call can never keep the process alive at exit
(``ThreadPoolExecutor`` threads are joined at interpreter exit, so one stuck thread made SIGTERM hang).

``return_freed_memory`` hands memory freed by decoding back to the operating system: glibc keeps what each
thread freed in that thread's arena, so four threads decoding 25-megapixel images would otherwise leave the
process a gigabyte larger for good although no image is held any more.

``ImageMemory`` counts the bytes of decoded images that requests hold from decoding until their answer is
finished (prepared, queued, running); a request that would exceed the limit is refused up front (429), so
queued requests can never pile up decoded pixels without bound.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from vlmkit.serving.errors import APIError

MIB = 1024 * 1024


class WorkerPool:
    """``threads`` daemon threads; ``initializer`` runs once in each (per-thread state such as a tokenizer copy)."""

    def __init__(self, *, threads: int, name: str, initializer: Callable[[], None] | None = None) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._threads = [
            threading.Thread(target=self._work, args=(initializer,), name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((future, fn, args))
        return future

    def close(self) -> None:
        """Stop taking work; queued jobs are cancelled, running ones finish (or are abandoned at exit)."""
        for _ in self._threads:
            self._queue.put(None)

    def _work(self, initializer: Callable[[], None] | None) -> None:
        if initializer is not None:
            initializer()
        while True:
            item = self._queue.get()
            if item is None:
                self._cancel_rest()
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue  # the request was cancelled while it waited
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
                future.set_exception(exc)

    def _cancel_rest(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self._queue.put(None)  # another thread's stop signal
                return
            item[0].cancel()


class ImageMemory:
    """A byte budget for decoded images held by requests between decoding and the end of their answer."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> Reservation:
        """Hold ``nbytes`` or refuse: 400 if one request alone needs more than the limit, else 429."""
        if nbytes > self.limit:
            raise APIError(400, f"the request's images need {_mib(nbytes)} MiB decoded, more than this server's "
                           f"limit of {_mib(self.limit)} MiB", code="image_memory_exceeded", param="messages")  # fmt: skip
        with self._lock:
            if self.used + nbytes > self.limit:
                raise APIError(429, f"the server already holds its limit of {_mib(self.limit)} MiB of decoded "
                               "images for queued requests; retry shortly", code="image_memory_full")  # fmt: skip
            self.used += nbytes
        return Reservation(self, nbytes)

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


class Reservation:
    """Bytes held for one request; ``release`` is idempotent (called when its answer ends, however it ends)."""

    def __init__(self, memory: ImageMemory, nbytes: int) -> None:
        self.memory = memory
        self.nbytes = nbytes
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.memory._release(self.nbytes)


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.1f}"


_libc: list[Any] = []


def return_freed_memory() -> None:
    """``malloc_trim(0)`` where the C library has it (glibc); a no-op elsewhere."""
    if not _libc:
        name = ctypes.util.find_library("c")
        library = ctypes.CDLL(name) if name else None
        _libc.append(getattr(library, "malloc_trim", None))
    if _libc[0] is not None:
        _libc[0](0)
