"""``POST /v1/chat/completions``: read and check the body, prepare inputs, queue the job, answer.

Non-streaming answers wait for the engine while polling for a client disconnect (a gone client's job is
dropped before it runs). Streaming answers are Server-Sent Events in OpenAI's ``chat.completion.chunk``
format, ending with ``data: [DONE]``; a disconnect cancels the response generator, which cancels the job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from vlmkit.serving.engine import Completion, EngineStopped, Job, JobCancelled, QueueFull
from vlmkit.serving.errors import APIError, internal_error
from vlmkit.serving.inputs import Prepared
from vlmkit.serving.request import ChatRequest, json_object_limit, parse_chat_request, parse_json
from vlmkit.serving.state import ServerState

log = logging.getLogger("vlmkit.serving")
# nginx's "client closed request": recorded in metrics, never seen by the (gone) client
CLIENT_CLOSED = 499
_POLL_S = 0.1


async def chat_completions(request: Request, state: ServerState) -> Response:
    engine, preparer = state.ready()
    settings = state.settings
    body = await read_body(request, limit=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    limit = json_object_limit(max_messages=settings.max_messages, max_parts=settings.max_content_parts)
    chat = parse_chat_request(parse_json(body, max_objects=limit), image_token=state.image_token,
                              max_images=settings.max_images,
                              max_messages=settings.max_messages, max_parts=settings.max_content_parts)  # fmt: skip
    if chat.model not in (None, state.model_name):
        raise APIError(404, f"model {chat.model[:100]!r} does not exist; this server serves "
                       f"{state.model_name!r}", code="model_not_found", param="model")  # fmt: skip
    prepared = await preparer.prepare(chat)
    generation = {**chat.generation, "max_new_tokens": prepared.max_new_tokens}
    job = Job(sample=prepared.sample, generation=generation, stream=chat.stream, loop=asyncio.get_running_loop(),
              on_end=prepared.release)  # fmt: skip
    try:
        engine.submit(job)
    except QueueFull:
        prepared.release()
        raise APIError(
            429, "the server is busy (request queue full); retry shortly", code="queue_full"
        ) from None
    except EngineStopped:
        prepared.release()
        raise APIError(503, "the server is shutting down", code="shutting_down") from None
    reply = _Reply(model=state.model_name, prepared=prepared, chat=chat)
    if chat.stream:
        return StreamingResponse(_sse(job, reply=reply, state=state), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    completion = await _wait(job, request)
    if completion is None:
        return Response(status_code=CLIENT_CLOSED)
    state.metrics.observe_tokens(prompt=prepared.prompt_tokens, completion=completion.completion_tokens)
    return JSONResponse(reply.completion_body(completion))


async def read_body(request: Request, *, limit: int, timeout_s: float | None = None) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (declared or received), and with
    408 when it has not fully arrived ``timeout_s`` after the request head (a slow client holds nothing long)."""
    try:
        return await asyncio.wait_for(_read_body(request, limit=limit), timeout=timeout_s)
    except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s",
                       code="request_timeout") from None  # fmt: skip


async def _read_body(request: Request, *, limit: int) -> bytes:
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait(job: Job, request: Request) -> Completion | None:
    """The job's result; None (and the job cancelled) if the client disconnects first."""
    future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=_POLL_S)
            if done:
                return future.result()
            if await request.is_disconnected():
                job.cancel()
                return None
    except JobCancelled:
        return None
    except Exception:
        raise internal_error() from None  # already logged by the engine; never echo it
    finally:
        if not future.done():
            job.cancel()  # the handler itself was cancelled (server shutdown, client gone)


class _Reply:
    """OpenAI response shapes for one request."""

    def __init__(self, *, model: str, prepared: Prepared, chat: ChatRequest) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.prepared = prepared
        self.chat = chat

    def usage(self, completion: Completion) -> dict[str, int]:
        prompt = self.prepared.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion.completion_tokens,
                "total_tokens": prompt + completion.completion_tokens}  # fmt: skip

    def completion_body(self, completion: Completion) -> dict[str, Any]:
        message = {"role": "assistant", "content": completion.text}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason,
                             "logprobs": None}],
                "usage": self.usage(completion), "system_fingerprint": None}  # fmt: skip

    def chunk(self, *, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return _event(self._chunk_base() | {"choices": [choice]})

    def usage_chunk(self, completion: Completion) -> str:
        return _event(self._chunk_base() | {"choices": [], "usage": self.usage(completion)})

    def _chunk_base(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": None}  # fmt: skip


async def _sse(job: Job, *, reply: _Reply, state: ServerState) -> AsyncIterator[str]:
    """Role chunk, content chunks, the finish chunk, [usage chunk], ``[DONE]``; errors as an error event."""
    try:
        yield reply.chunk(delta={"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                yield reply.chunk(delta={"content": value})
                continue
            if kind == "done":
                yield reply.chunk(delta={}, finish_reason=value.finish_reason)
                if reply.chat.include_usage:
                    yield reply.usage_chunk(value)
                state.metrics.observe_tokens(
                    prompt=reply.prepared.prompt_tokens, completion=value.completion_tokens
                )
            else:
                # headers are already sent: report in-band, as OpenAI does, without the exception's text
                yield _event(internal_error().body())
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # no-op for a finished job; stops generation when the client went away


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
