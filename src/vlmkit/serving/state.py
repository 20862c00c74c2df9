"""The server's state: settings, metrics, and the model with its engine once loaded.

A model directory is loaded on a background thread so the server answers ``/health`` (503 "loading")
at once; a ready ``VLM`` is attached immediately. Shutdown stops the engine after it drains.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmkit.serving.engine import Engine
from vlmkit.serving.errors import APIError
from vlmkit.serving.fetch import URLFetcher
from vlmkit.serving.inputs import Preparer, context_length_of
from vlmkit.serving.limits import ServerSettings
from vlmkit.serving.metrics import Metrics, find_cache_stats
from vlmkit.serving.template import prewarm

if TYPE_CHECKING:
    from vlmkit.api import VLM

log = logging.getLogger("vlmkit.serving")
LOADING, READY, FAILED = "loading", "ready", "error"
# a ready VLM, a model directory (None = the bundled default), or a function that loads one
ModelSource = Any


class ServerState:
    """One per app; the model and engine exist only once ``status == READY``."""

    def __init__(
        self,
        *,
        settings: ServerSettings,
        fetcher: URLFetcher,
        model_name: str,
        on_load_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.model_name = model_name
        self.metrics = Metrics()
        self.status = LOADING
        self.vlm: VLM | None = None
        self.engine: Engine | None = None
        self.preparer: Preparer | None = None
        self.image_token = "<image>"
        self._on_load_error = on_load_error
        self._lock = threading.Lock()

    def start(self, model: ModelSource) -> None:
        """Attach a VLM now, or load one on a background thread: a directory (None = the bundled default)
        or a zero-argument loader."""
        if model is not None and not isinstance(model, str | Path) and not callable(model):
            self.attach(model)
            return
        prewarm()  # a chat-template worker starts while the model loads
        threading.Thread(target=self._load, args=(model,), name="vlmkit-load", daemon=True).start()

    def _load(self, source: str | Path | Callable[[], VLM] | None) -> None:
        try:
            if callable(source):
                vlm = source()
            else:
                from vlmkit.api import VLM

                vlm = VLM.from_pretrained(source)
            self.attach(vlm)
        except BaseException as exc:  # noqa: BLE001 - reported through /health and the callback
            log.error("loading the model failed: %s", exc)
            self.status = FAILED
            if self._on_load_error is not None:
                self._on_load_error(exc)

    def attach(self, vlm: VLM) -> None:
        """Build the engine and preparer around ``vlm`` and start serving."""
        from vlmkit.serving.runner import VLMRunner

        s = self.settings
        engine = Engine(runner=VLMRunner(vlm), max_batch=s.max_batch, queue_size=s.queue_size,
                        batch_wait_s=s.batch_wait_ms / 1000, on_batch=self.metrics.observe_batch)  # fmt: skip
        preparer = Preparer(processor=vlm.processor, settings=s, fetcher=self.fetcher,
                            context_length=context_length_of(vlm.model))  # fmt: skip
        with self._lock:
            self.vlm, self.engine, self.preparer = vlm, engine, preparer
            self.image_token = vlm.processor.prompt.image_token
            engine.start()
            self._register_live_metrics(vlm=vlm, engine=engine)
            self.metrics.add_live("queued_image_bytes", kind="gauge",
                                  help_text="Decoded image bytes held by requests being prepared, queued or answered.",
                                  read=lambda: preparer.image_memory.used)  # fmt: skip
            self.status = READY

    def _register_live_metrics(self, *, vlm: Any, engine: Engine) -> None:
        m = self.metrics
        m.add_live("queue_depth", kind="gauge", help_text="Requests waiting for the model.",
                   read=lambda: engine.queue_depth)  # fmt: skip
        m.add_live("active_streams", kind="gauge", help_text="Streaming answers being generated.",
                   read=lambda: engine.active_streams)  # fmt: skip
        m.add_live("cancelled_requests_total", kind="counter",
                   help_text="Requests dropped or stopped because their client went away.",
                   read=lambda: engine.stats.cancelled)  # fmt: skip
        m.add_live("failed_generations_total", kind="counter", help_text="Generations that raised an error.",
                   read=lambda: engine.stats.failed)  # fmt: skip
        m.cache_sources = find_cache_stats(vlm)

    def ready(self) -> tuple[Engine, Preparer]:
        """The engine and preparer, or a 503 while loading / after a failed load."""
        engine, preparer = self.engine, self.preparer
        if self.status == READY and engine is not None and preparer is not None:
            return engine, preparer
        if self.status == LOADING:
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading")
        raise APIError(503, "the model could not be loaded; see the server log", code="model_unavailable")

    def shutdown(self) -> None:
        """Drain and stop the engine (blocking: call from a thread)."""
        with self._lock:
            engine, preparer = self.engine, self.preparer
        if engine is not None and not engine.stop(timeout=self.settings.shutdown_timeout_s):
            log.warning("the model worker did not finish within %.0f s", self.settings.shutdown_timeout_s)
        if preparer is not None:
            preparer.close()
