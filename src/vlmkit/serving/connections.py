"""Slow and idle clients cannot hold the server: a request-head timeout and a connection cap, in uvicorn's
HTTP protocol (the layer that owns connections), plus ``uvicorn_config`` that wires every limit in.

uvicorn closes a keep-alive connection that sends nothing for ``timeout_keep_alive`` seconds, but a fresh
connection that never sends a byte, or one that sends its request head a byte at a time, is never timed out,
and there is no cap on how many such connections are open: a few hundred of them exhaust file descriptors
and take ``/health`` down with everything else. ``GuardedH11Protocol`` therefore

* closes a connection whose request head is not complete ``header_timeout_s`` after it opened (or after
  the previous answer on it finished), and
* keeps at most ``max_connections`` open: a new connection beyond that closes the connection that has been
  waiting longest for a request head (idle or trickling), so well-behaved clients always get in; only when
  every connection is busy with a request is the newcomer itself closed.

Bodies are bounded in the app (``read_body``: 408 after ``body_timeout_s``).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    import uvicorn

    from vlmkit.serving.limits import ServerSettings


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout and a connection cap (set by ``guarded_protocol``)."""

    header_timeout_s: float = 10.0
    max_connections: int = 256

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting_since: float | None = None  # when this connection started waiting for a request head
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_waiting()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a complete request head arrived
            self._stop_waiting()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._start_waiting()  # the next request head must arrive in time too (pipelined ones stop it)
        super().on_response_complete()

    def _start_waiting(self) -> None:
        self._stop_waiting()
        self.waiting_since = time.monotonic()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_waiting(self) -> None:
        self.waiting_since = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.waiting_since is not None and not self.transport.is_closing():
            self.transport.close()

    def _make_room(self) -> None:
        """Close the connection waiting longest for a request head; if none is idle, this new one."""
        idle = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c.waiting_since is not None
                and c is not self and not c.transport.is_closing()]  # fmt: skip
        victim = min(idle, key=lambda c: c.waiting_since or 0.0) if idle else self
        victim._stop_waiting()
        victim.transport.close()


def guarded_protocol(settings: ServerSettings) -> type[GuardedH11Protocol]:
    """The protocol class with this server's limits (uvicorn instantiates it once per connection)."""
    return type("VlmkitH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": settings.header_timeout_s,
                                                               "max_connections": settings.max_connections})  # fmt: skip


def uvicorn_config(app: Any, *, settings: ServerSettings, **kwargs: Any) -> uvicorn.Config:
    """A ``uvicorn.Config`` with every connection limit of ``settings`` in place (``kwargs``: log level ...)."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=guarded_protocol(settings),
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # a float works (call_later)
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=16 * 1024,  # request line + headers
        server_header=False,
        **kwargs,
    )
