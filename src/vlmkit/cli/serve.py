"""``vlmkit serve``: an OpenAI-compatible HTTP server (``/v1/chat/completions``) with a chat page at ``/``.

The port is bound before the model loads, so a busy port or bad option fails at once with one ``error:``
line; the model then loads in the background (``/health`` answers 503 until it is ready). A model that
fails to load stops the server with exit code 2. Ctrl-C / SIGTERM finish in-flight requests first.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from vlmkit.cli.common import (
    CLIError,
    DeviceOption,
    DType,
    DTypeOption,
    ModelOption,
    Quantize,
    QuantizeOption,
    check_device,
    load_model,
    note,
)
from vlmkit.serving.limits import MIB, ServerSettings

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_D = ServerSettings  # the defaults every limit option shows


def _limit(flag: str, text: str, *, low: float = 1) -> Any:
    """The option of one server limit (None: ``ServerSettings``' default)."""
    return typer.Option(flag, min=low, help=text, show_default=False)


MaxMessages = Annotated[
    int | None, _limit("--max-messages", f"Most messages per request (default {_D.max_messages}).")
]
MaxParts = Annotated[
    int | None,
    _limit("--max-content-parts", f"Most content parts per request (default {_D.max_content_parts})."),
]
PrepareThreads = Annotated[
    int | None,
    _limit("--prepare-threads", f"Threads decoding images and tokenizing (default {_D.prepare_threads})."),
]
QueuedImageMB = Annotated[
    int | None,
    _limit(
        "--max-queued-image-mb",
        "Decoded image memory held by queued requests, in MiB, "
        f"before 429 (default {_D.max_queued_image_bytes // MIB}).",
    ),
]
TemplateTimeout = Annotated[
    float | None,
    _limit(
        "--template-timeout",
        f"Seconds a chat template may take to render (default {_D.template_timeout_s:g}).",
        low=0.01,
    ),
]
HeaderTimeout = Annotated[
    float | None,
    _limit(
        "--header-timeout",
        f"Seconds a client has to send its request head (default {_D.header_timeout_s:g}).",
        low=0.01,
    ),
]
BodyTimeout = Annotated[
    float | None,
    _limit(
        "--body-timeout",
        f"Seconds a client has to send its request body (default {_D.body_timeout_s:g}).",
        low=0.01,
    ),
]
KeepAlive = Annotated[
    float | None,
    _limit("--keep-alive", f"Seconds an idle connection stays open (default {_D.keep_alive_s:g}).", low=0.01),
]
MaxConnections = Annotated[
    int | None,
    _limit(
        "--max-connections",
        f"Open connections; beyond it the longest-idle one is closed (default {_D.max_connections}).",
    ),
]
ShutdownTimeout = Annotated[
    float | None,
    _limit(
        "--shutdown-timeout",
        "Seconds to finish in-flight requests on SIGTERM / Ctrl-C "
        f"(default {_D.shutdown_timeout_s:g}); the process exits regardless.",
        low=0,
    ),
]


def serve_command(
    model: ModelOption = None,
    host: Annotated[
        str, typer.Option("--host", help="Interface to listen on (0.0.0.0 = all).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="TCP port (0 = any free port).")
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="VLMKIT_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1.",
            show_default=False,
        ),
    ] = None,  # fmt: skip
    allow_url_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-url-host",
            help="Fetch http(s) image URLs from this host (HOST, HOST:PORT or "
            "*.DOMAIN; repeatable). Without it only data: URLs are accepted.",
            show_default=False,
        ),
    ] = None,  # fmt: skip
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most requests per batch.")] = 8,
    queue_size: Annotated[int, typer.Option("--queue-size", min=1, help="Waiting requests before 429.")] = 64,
    max_messages: MaxMessages = None,
    max_content_parts: MaxParts = None,
    prepare_threads: PrepareThreads = None,
    max_queued_image_mb: QueuedImageMB = None,
    template_timeout: TemplateTimeout = None,
    header_timeout: HeaderTimeout = None,
    body_timeout: BodyTimeout = None,
    keep_alive: KeepAlive = None,
    max_connections: MaxConnections = None,
    shutdown_timeout: ShutdownTimeout = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads for the model (torch); leave some cores for HTTP.",
            show_default=False,
        ),
    ] = None,  # fmt: skip
    dtype: DTypeOption = DType.auto,
    device: DeviceOption = None,
    quantize: QuantizeOption = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a chat page at /."""
    given = {"max_messages": max_messages, "max_content_parts": max_content_parts, "prepare_threads": prepare_threads,
             "max_queued_image_bytes": None if max_queued_image_mb is None else max_queued_image_mb * MIB,
             "template_timeout_s": template_timeout, "header_timeout_s": header_timeout, "body_timeout_s": body_timeout,
             "keep_alive_s": keep_alive, "max_connections": max_connections, "shutdown_timeout_s": shutdown_timeout}  # fmt: skip
    limits: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    try:
        settings = ServerSettings(model_name=_model_name(model), api_key=api_key, max_batch=max_batch,
                                  queue_size=queue_size, allow_url_hosts=tuple(allow_url_host or ()), **limits)  # fmt: skip
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    _check_model_dir(model)
    if device is not None:
        check_device(device)  # before the port is bound: a bad device never starts a server
    sock = _bind(host=host, port=port)
    bound_port = sock.getsockname()[1]
    if api_key is None and host not in _LOOPBACK:
        note(
            f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model"
        )
    note(
        f"vlmkit serve: http://{_url_host(host)}:{bound_port}/ (chat page), OpenAI API under /v1; loading the model…"
    )
    failure = _run(
        sock,
        settings=settings,
        loader=lambda: _load(model, dtype=dtype, device=device, threads=threads, quantize=quantize),
    )
    if failure is not None:
        raise failure


def _run(sock: socket.socket, *, settings: Any, loader: Any) -> BaseException | None:
    """Run uvicorn on the bound socket until stopped; the load error if the model failed to load."""
    import uvicorn

    from vlmkit.serving.app import create_app
    from vlmkit.serving.connections import uvicorn_config

    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def load_failed(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(loader, settings=settings, on_load_error=load_failed)
    # draining waits up to shutdown_timeout_s for requests, then as long again for the model worker
    server_class = _quiet_exit_server(uvicorn.Server, exit_after_s=2 * settings.shutdown_timeout_s + 10)
    server = server_class(uvicorn_config(app, settings=settings, log_level="info"))
    server.run(sockets=[sock])
    return failures[0] if failures else None


def _load(
    model: Path | None,
    *,
    dtype: DType,
    device: str | None,
    threads: int | None,
    quantize: Quantize | None = None,
) -> Any:
    if threads is not None:
        import torch

        torch.set_num_threads(
            threads
        )  # OpenMP threads spinning against the HTTP threads cost far more than they give
    return load_model(model, dtype=dtype, device=device, quantize=quantize)


def _quiet_exit_server(base: type, *, exit_after_s: float | None = None) -> type:
    """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown (exit by signal, or a KeyboardInterrupt
    that the CLI would report as an error); a server that drained cleanly should just exit 0. A shutdown that
    takes more than ``exit_after_s`` ends the process."""

    class Server(base):
        force_exit_after_s: float | None = exit_after_s

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()
            if self.force_exit_after_s is not None:  # shutdown always finishes, whatever is stuck
                timer = threading.Timer(self.force_exit_after_s, _force_exit, args=(self.force_exit_after_s,))
                timer.daemon = True
                timer.start()
                self.force_exit_after_s = None

    return Server


def _force_exit(seconds: float) -> None:
    note(f"error: shutdown did not finish within {seconds:g} s; exiting now")
    os._exit(1)


def _bind(*, host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]  # fmt: skip
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections made while the app starts wait in the backlog instead of failing
    except OSError as exc:
        raise CLIError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _check_model_dir(model: Path | None) -> None:
    """Fail before binding and loading when the directory obviously is not a model."""
    if model is None:
        from vlmkit.api import DEFAULT_MODEL_DIR

        if not DEFAULT_MODEL_DIR.exists():
            raise CLIError("no default model is bundled with this install; pass --model DIR")
        return
    path = model.expanduser()
    if not path.is_dir():
        raise CLIError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise CLIError(f"{path} has no config.json: not a model directory")


def _model_name(model: Path | None) -> str | None:
    return model.expanduser().resolve().name if model is not None else None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
