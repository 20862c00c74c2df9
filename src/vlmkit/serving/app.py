"""The FastAPI app: ``create_app(vlm_or_model_dir, settings=...)``.

Routes: ``/`` (the chat page), ``/health`` (503 while loading, 200 when ready), ``/metrics`` (Prometheus
text), and under ``/v1`` (API key checked when one is set): ``GET /models``, ``POST /chat/completions``.
Every error is OpenAI-shaped JSON; unexpected exceptions are logged and answered with a generic 500.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmkit.serving.chat import chat_completions
from vlmkit.serving.errors import INVALID_REQUEST, NOT_FOUND, APIError, error_body, internal_error
from vlmkit.serving.fetch import URLFetcher
from vlmkit.serving.limits import ServerSettings
from vlmkit.serving.metrics import CONTENT_TYPE
from vlmkit.serving.state import READY, ServerState

if TYPE_CHECKING:
    from vlmkit.api import VLM

log = logging.getLogger("vlmkit.serving")
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions")


def create_app(
    model: VLM | str | Path | Callable[[], VLM] | None = None,
    *,
    settings: ServerSettings | None = None,
    fetcher: URLFetcher | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """An app serving ``model``: a ``VLM``, a model directory (None = the bundled default), or a function
    returning a ``VLM``; directories and functions are loaded on a background thread (``/health`` 503 until then).

    ``fetcher`` replaces the URL fetcher built from the settings (tests inject a resolver / address
    policy); ``on_load_error`` is called if loading a directory fails (the CLI exits then).
    """
    settings = settings or ServerSettings()
    fetcher = fetcher or URLFetcher(allow_hosts=settings.allow_url_hosts, max_bytes=settings.max_image_bytes,
                                    timeout_s=settings.fetch_timeout_s, max_redirects=settings.max_redirects)  # fmt: skip
    state = ServerState(settings=settings, fetcher=fetcher, model_name=_model_name(model, settings),
                        on_load_error=on_load_error)  # fmt: skip

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start(model)
        yield
        await run_in_threadpool(state.shutdown)  # uvicorn has already let in-flight requests finish

    app = FastAPI(title="vlmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.vlmkit = state
    _add_error_handlers(app)
    app.include_router(_public_routes(state))
    app.include_router(
        _v1_routes(state), prefix="/v1", dependencies=[Depends(_api_key_check(settings.api_key))]
    )
    app.add_middleware(MetricsMiddleware, state=state)
    return app


def _model_name(model: Any, settings: ServerSettings) -> str:
    if settings.model_name:
        return settings.model_name
    if isinstance(model, str | Path):
        return Path(model).name or "vlmkit"
    return "vlmkit"


def _public_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(_index_html(), headers={"Cache-Control": "no-cache"})

    @router.get("/health")
    async def health() -> JSONResponse:
        body = {"status": state.status, "model": state.model_name}
        return JSONResponse(body, status_code=200 if state.status == READY else 503)

    @router.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    return router


def _v1_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/models")
    async def models() -> dict[str, Any]:
        card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "vlmkit"}
        return {"object": "list", "data": [card]}

    @router.post("/chat/completions")
    async def completions(request: Request) -> Response:
        return await chat_completions(request, state)

    return router


def _api_key_check(api_key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                           code="invalid_api_key")  # fmt: skip
        # constant-time comparison: response timing must not reveal how much of a guess was right
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key")

    return check


@lru_cache(maxsize=1)
def _index_html() -> str:
    return resources.files("vlmkit.serving").joinpath("static/index.html").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------- errors


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "no such route", 405: "method not allowed on this route"}
        message = messages.get(exc.status_code, "the request could not be handled")
        type_ = NOT_FOUND if exc.status_code == 404 else INVALID_REQUEST
        return JSONResponse(error_body(message=message, type_=type_), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(message="invalid request", type_=INVALID_REQUEST), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error: %s", type(exc).__name__)  # the traceback is in the server log above
        return JSONResponse(internal_error().body(), status_code=500)


# ------------------------------------------------------------------------------------------------ metrics


class MetricsMiddleware:
    """Counts every HTTP request by route and status, and times it to the end of its response body."""

    def __init__(self, app: ASGIApp, *, state: ServerState) -> None:
        self.app = app
        self.metrics = state.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.observe_request(route=route, status=status[0], seconds=time.perf_counter() - start)
