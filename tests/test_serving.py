"""``vlmkit serve``: the OpenAI-compatible app over real HTTP on 127.0.0.1 with the tiny model.

One live uvicorn server (API key and a URL allowlist set) carries the official ``openai`` client test,
the bad-request table and the load test; smaller servers cover 429, cancellation and graceful shutdown
with a gated runner. Every byte goes to 127.0.0.1: forbidden image URLs must be refused before any
connection (a local image server counts hits), and URL-fetching logic is exercised against that local
server through an injected resolver and a loopback-only address policy.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

if not os.environ.get("CI"):  # CI installs the serve extras: there a missing package must fail, not skip
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
import uvicorn  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from conftest import make_image, png_bytes  # noqa: E402
from vlmkit.serving.app import create_app  # noqa: E402
from vlmkit.serving.engine import Completion, Engine, Job, QueueFull  # noqa: E402
from vlmkit.serving.fetch import FetchError, URLFetcher, host_allowed, is_public_address  # noqa: E402
from vlmkit.serving.limits import ServerSettings  # noqa: E402

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GEN = {"max_tokens": 8}


# ------------------------------------------------------------------------------------------------ helpers


class LiveServer:
    """uvicorn in a thread on a pre-bound 127.0.0.1 socket (a free port, no race), stopped on exit."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=20)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def state(self) -> Any:
        return self.app.state.vlmkit

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


class ImageServer:
    """A second local HTTP server: images, redirects, a slow and a big endpoint; counts every hit."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner.hits.append(self.path)
                try:
                    owner.respond(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the fetcher hung up on purpose (byte cap, timeout)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.png = png_bytes(make_image(seed=7))
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        path, port = handler.path, self.port
        redirects = {"/to-ok": f"http://img.test:{port}/img.png", "/to-relative": "/img.png",
                     "/to-other-host": f"http://other.test:{port}/img.png", "/to-private": "http://10.0.0.1/img.png",
                     "/to-loopback-ip": f"http://127.0.0.1:{port}/img.png", "/loop": "/loop"}  # fmt: skip
        if path in redirects:
            handler.send_response(302)
            handler.send_header("Location", redirects[path])
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if path == "/slow":
            time.sleep(2)
        body = {"/img.png": self.png, "/big": b"x" * 300_000, "/slow": self.png}.get(path)
        handler.send_response(200 if body is not None else 404)
        handler.send_header("Content-Length", str(len(body or b"")))
        handler.end_headers()
        handler.wfile.write(body or b"")

    def close(self) -> None:
        self.httpd.shutdown()


def fake_resolver(table: dict[str, list[str]]):
    """Names resolve only from ``table``: tests never ask a real DNS server."""

    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("unknown test host")
        return table[host]

    return resolve


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: dict[str, Any] | str) -> list[dict[str, Any]]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` with almost no pixel data: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def solid_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


class GatedRunner:
    """Wraps the real runner: ``generate`` waits for ``gate``; streams can be slowed down; records calls."""

    def __init__(self, inner: Any, *, stream_delay: float = 0.0) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.started = threading.Event()
        self.seen: list[Any] = []
        self.streams: list[SlowStream] = []
        self.stream_delay = stream_delay

    def generate(self, samples: Any, generation: dict[str, Any]) -> list[Completion]:
        self.seen.extend(samples)
        self.started.set()
        assert self.gate.wait(20)
        return self.inner.generate(samples, generation)

    def stream(self, sample: Any, generation: dict[str, Any]) -> SlowStream:
        stream = SlowStream(self.inner.stream(sample, generation), delay=self.stream_delay)
        self.streams.append(stream)
        return stream


class SlowStream:
    def __init__(self, inner: Any, *, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.steps, self.closed = 0, False

    def __iter__(self) -> Iterator[str]:
        for delta in self.inner:
            time.sleep(self.delay)
            self.steps += 1
            yield delta

    def close(self) -> None:
        self.closed = True
        self.inner.close()

    def completion(self, text: str) -> Completion:
        return self.inner.completion(text)


def wait_until(condition: Any, *, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    for leak in ("Traceback", "site-packages", "/work/", "/tmp/", 'File "'):
        assert leak not in error["message"], error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny model gains nothing from intra-op threads, and on a shared 2-core machine OpenMP threads
    spinning against the server's own HTTP threads (or other processes) slow it down many times over."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def image_server():
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def live(tiny_vlm, image_server):
    """The main server: API key, small limits, an allowlist whose hosts all resolve to forbidden addresses."""
    port = image_server.port
    settings = ServerSettings(
        model_name="tiny",
        api_key=API_KEY,
        allow_url_hosts=(f"127.0.0.1:{port}", f"localhost:{port}", "10.0.0.1", "169.254.169.254", "rebind.test",
                         f"[::1]:{port}"),
        max_body_bytes=1024 * 1024,
        max_image_bytes=256 * 1024,
        max_image_pixels=1_000_000,
        max_images=3,
        max_tokens_limit=256,
        queue_size=256,
    )  # fmt: skip
    resolver = fake_resolver({"rebind.test": ["10.0.0.1"], "localhost": ["127.0.0.1"]})
    fetcher = URLFetcher(
        allow_hosts=settings.allow_url_hosts, max_bytes=settings.max_image_bytes, resolver=resolver
    )
    with LiveServer(create_app(tiny_vlm, settings=settings, fetcher=fetcher)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=30, trust_env=False) as http:
        yield http


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return [png_bytes(make_image(seed=i, size=(40 + 9 * i, 30 + 5 * i))) for i in range(3)]


def post_chat(client: httpx.Client, messages: list[dict[str, Any]], **extra: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, **GEN, **extra})


# -------------------------------------------------------------------------------------- the openai client


def test_openai_client_stream_and_not_with_two_images(live, tiny_vlm, pngs):
    import openai

    api = openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0, timeout=30)
    messages = user(
        image_part(data_url(pngs[0])), "vs", image_part(data_url(pngs[1])), "Which has more circles?"
    )
    plain = api.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    text = plain.choices[0].message.content
    assert plain.object == "chat.completion" and plain.model == "tiny" and plain.choices[0].finish_reason
    assert plain.usage.prompt_tokens > 2 * 16 and 0 < plain.usage.completion_tokens <= 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(api.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the stream joins to the non-streamed answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()  # exact usage for streams too

    # the same conversation through the Python API gives the same answer
    from vlmkit.processing.processor import Sample

    expected_messages = [{"role": "user", "content": "<image>\nvs<image>\nWhich has more circles?"}]
    images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs[:2]]
    assert (
        tiny_vlm.generate([Sample(messages=expected_messages, images=images)], max_new_tokens=12).texts[0]
        == text
    )

    assert [m.id for m in api.models.list().data] == ["tiny"]


def test_stop_strings_and_string_content(client):
    base = post_chat(client, [{"role": "user", "content": "Describe the image."}], max_tokens=16).json()
    text = base["choices"][0]["message"]["content"]
    stop = text.strip()[2:4] if len(text.strip()) >= 4 else None
    if not stop:
        pytest.skip("the tiny model's answer is too short to pick a stop string from")
    cut = post_chat(client, [{"role": "user", "content": "Describe the image."}], max_tokens=16, stop=[stop])
    body = cut.json()
    assert cut.status_code == 200 and stop not in body["choices"][0]["message"]["content"]
    assert text.startswith(body["choices"][0]["message"]["content"])
    assert body["choices"][0]["finish_reason"] == "stop"


def test_models_health_metrics_and_page(live, client):
    assert client.get("/health").json() == {"status": "ready", "model": "tiny"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("vlmkit_requests_total", "vlmkit_request_duration_seconds_bucket", "vlmkit_prompt_tokens_total",
                 "vlmkit_completion_tokens_total", "vlmkit_queue_depth", "vlmkit_batch_size_bucket"):  # fmt: skip
        assert name in metrics.text
    page = httpx.get(f"{live.url}/", trust_env=False)  # the page itself needs no key
    assert (
        page.status_code == 200 and "<script>" in page.text and "http" not in page.text.split("<script>")[0]
    )


# ---------------------------------------------------------------------------------------------- bad input


def _big_data_url() -> str:
    return data_url(os.urandom(300 * 1024))


def _bad_cases(image_port: int) -> list[tuple[str, Any, dict[str, str] | None, int, str | None]]:
    """(name, body (dict -> JSON, bytes -> raw), headers, status, error code)."""
    ok = png_bytes(make_image(seed=1))
    msg = user(image_part(data_url(ok)), "What is it?")
    good = {"model": "tiny", "messages": msg, **GEN}
    url = lambda u: {**good, "messages": user(image_part(u), "What?")}  # noqa: E731
    long_text = "circle square triangle " * 400
    return [
        ("bad json", b'{"messages": [', None, 400, "invalid_json"),
        ("json array", b"[1, 2]", None, 400, "invalid_json"),
        ("NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None, 400, "invalid_json"),
        ("deep nesting", b"[" * 100_000, None, 400, "invalid_json"),
        ("not utf-8", b"\xff\xfe\x00{", None, 400, "invalid_json"),
        ("no messages", {"model": "tiny"}, None, 400, None),
        ("empty messages", {**good, "messages": []}, None, 400, None),
        ("messages not a list", {**good, "messages": "hi"}, None, 400, None),
        ("message not an object", {**good, "messages": ["hi"]}, None, 400, None),
        ("tool role", {**good, "messages": [{"role": "tool", "content": "x"}]}, None, 400, None),
        ("content a number", {**good, "messages": [{"role": "user", "content": 5}]}, None, 400, None),
        ("unknown part type", {**good, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, None, 400, None),
        ("text not a string", {**good, "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
         None, 400, None),
        ("image in assistant turn", {**good, "messages": [*msg, {"role": "assistant", "content": [image_part(data_url(ok))]},
                                                          {"role": "user", "content": "and?"}]}, None, 400, None),
        ("image_url without url", {**good, "messages": user({"type": "image_url", "image_url": {}})}, None, 400, None),
        ("truncated base64", url(data_url(ok)[:-3]), None, 400, "invalid_image"),
        ("not base64 at all", url("data:image/png;base64,@@@@"), None, 400, "invalid_image"),
        ("data url without base64", url("data:image/png,rawbytes"), None, 400, "invalid_image_url"),
        ("non-image bytes", url(data_url(b"hello, this is not an image at all")), None, 400, "invalid_image"),
        ("truncated png", url(data_url(ok[: len(ok) // 2])), None, 400, "invalid_image"),
        ("decompression bomb header", url(data_url(png_header_only(100_000, 100_000))), None, 400, "image_too_large"),
        ("pixels over the limit", url(data_url(png_header_only(2000, 2000))), None, 400, "image_too_large"),
        ("real image over the pixel limit", url(data_url(solid_png(1100, 1000))), None, 400, "image_too_large"),
        ("image bytes over the cap", url(_big_data_url()), None, 400, "image_too_large"),
        ("too many images", {**good, "messages": user(*[image_part(data_url(ok))] * 4, "?")}, None, 400, "too_many_images"),
        ("body too large", {**good, "padding": "x" * (1024 * 1024)}, None, 413, "request_too_large"),
        ("unknown model", {**good, "model": "gpt-4o"}, None, 404, "model_not_found"),
        ("model not a string", {**good, "model": 3}, None, 400, None),
        ("negative max_tokens", {**good, "max_tokens": -1}, None, 400, None),
        ("zero max_tokens", {**good, "max_tokens": 0}, None, 400, None),
        ("max_tokens over the limit", {**good, "max_tokens": 100_000}, None, 400, None),
        ("max_tokens a string", {**good, "max_tokens": "5"}, None, 400, None),
        ("max_tokens a bool", {**good, "max_tokens": True}, None, 400, None),
        ("negative max_completion_tokens", {**good, "max_completion_tokens": -5}, None, 400, None),
        ("negative temperature", {**good, "temperature": -1}, None, 400, None),
        ("temperature 1e-300 (0.0 in float32)", {**good, "temperature": 1e-300}, None, 400, None),
        ("temperature a 400-digit integer", {**good, "temperature": int("9" * 400)}, None, 400, None),
        ("top_k a 400-digit integer", {**good, "top_k": int("9" * 400)}, None, 400, None),
        ("lone surrogate in content", {**good, "messages": [{"role": "user", "content": "hi \ud800"}]}, None, 400,
         "invalid_text"),
        ("lone surrogate in a text part", {**good, "messages": user("\udfff")}, None, 400, "invalid_text"),
        ("lone surrogate in stop", {**good, "stop": ["\udc80"]}, None, 400, "invalid_text"),
        ("lone surrogate in a key", {**good, "metadata": {"\ud800": 1}}, None, 400, "invalid_text"),
        ("257 messages", {**good, "messages": [{"role": "user", "content": ""}] * 257}, None, 400, "too_many_messages"),
        ("513 content parts", {**good, "messages": user(*["x"] * 513)}, None, 400, "too_many_content_parts"),
        ("temperature a string", {**good, "temperature": "hot"}, None, 400, None),
        ("top_p zero", {**good, "top_p": 0}, None, 400, None),
        ("top_p above one", {**good, "top_p": 1.5}, None, 400, None),
        ("five stop strings", {**good, "stop": ["a", "b", "c", "d", "e"]}, None, 400, None),
        ("empty stop string", {**good, "stop": [""]}, None, 400, None),
        ("stop a number", {**good, "stop": 5}, None, 400, None),
        ("seed a string", {**good, "seed": "x"}, None, 400, None),
        ("n = 2", {**good, "n": 2}, None, 400, None),
        ("stream not a bool", {**good, "stream": "yes"}, None, 400, None),
        ("tools", {**good, "tools": [{"type": "function"}]}, None, 400, "unsupported_parameter"),
        ("logprobs", {**good, "logprobs": True}, None, 400, "unsupported_parameter"),
        ("last message from the assistant", {**good, "messages": [{"role": "assistant", "content": "hi"}]}, None, 400, None),
        ("typed <image> in a text part", {**good, "messages": user("look: <image> what is it?")}, None, 400,
         "image_placeholder_in_text"),
        ("typed <image> with a real image", {**good, "messages": user(image_part(data_url(ok)), "<image>")}, None, 400,
         "image_placeholder_in_text"),
        ("<image> split over two text parts", {**good, "messages": user("<ima", "ge> what?")}, None, 400,
         "image_placeholder_in_text"),
        ("typed <image> in a system message", {**good, "messages": [{"role": "system", "content": "<image>"},
                                                                    *user("hi")]}, None, 400, "image_placeholder_in_text"),
        ("prompt longer than the context", {**good, "messages": user(long_text)}, None, 400, "context_length_exceeded"),
        ("prompt + max_tokens over the context", {**good, "messages": user("circle " * 300), "max_tokens": 256}, None,
         400, "context_length_exceeded"),
        ("file:// URL", url("file:///etc/passwd"), None, 400, "invalid_image_url"),
        ("plain file path", url("/etc/passwd"), None, 400, "invalid_image_url"),
        ("gopher URL", url("gopher://127.0.0.1:70/"), None, 400, "invalid_image_url"),
        ("loopback IP (allowlisted)", url(f"http://127.0.0.1:{image_port}/img.png"), None, 400, "invalid_image_url"),
        ("localhost (allowlisted)", url(f"http://localhost:{image_port}/img.png"), None, 400, "invalid_image_url"),
        ("IPv6 loopback (allowlisted)", url(f"http://[::1]:{image_port}/img.png"), None, 400, "invalid_image_url"),
        ("IPv4-mapped loopback", url(f"http://[::ffff:127.0.0.1]:{image_port}/img.png"), None, 400, "invalid_image_url"),
        ("cloud metadata (allowlisted)", url("http://169.254.169.254/latest/meta-data/"), None, 400, "invalid_image_url"),
        ("private 10/8 (allowlisted)", url("http://10.0.0.1/img.png"), None, 400, "invalid_image_url"),
        ("name resolving to 10.0.0.1", url("http://rebind.test/img.png"), None, 400, "invalid_image_url"),
        ("host not on the allowlist", url("https://images.example.com/cat.png"), None, 400, "invalid_image_url"),
        ("allowlisted host, other port", url(f"http://127.0.0.1:{image_port + 1}/img.png"), None, 400, "invalid_image_url"),
        ("credentials in the URL", url(f"http://user:pw@127.0.0.1:{image_port}/img.png"), None, 400, "invalid_image_url"),
        ("missing API key", good, {"Authorization": ""}, 401, "invalid_api_key"),
        ("wrong API key", good, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
        ("wrong auth scheme", good, {"Authorization": f"Basic {API_KEY}"}, 401, "invalid_api_key"),
    ]  # fmt: skip


@pytest.mark.slow
def test_bad_request_table(live, client, image_server, pngs):
    cases = _bad_cases(image_server.port)
    assert len(cases) >= 30
    hits_before = len(image_server.hits)
    for name, body, headers, status, code in cases:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = client.post("/v1/chat/completions", content=raw,
                               headers={"Content-Type": "application/json", **AUTH, **(headers or {})})  # fmt: skip
        try:
            assert_error(response, status, code)
        except AssertionError as exc:
            raise AssertionError(f"case {name!r}: {exc}") from None
        assert client.get("/health").status_code == 200, name
    # forbidden URLs were refused before connecting: the local image server saw nothing
    assert len(image_server.hits) == hits_before
    # and the server still answers normally
    ok = post_chat(client, user(image_part(data_url(pngs[0])), "What is it?"))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_tiny_images_and_other_routes(client):
    tiny_png = solid_png(1, 1)
    assert post_chat(client, user(image_part(data_url(tiny_png)), "?")).status_code == 200
    assert post_chat(client, user(image_part(data_url(tiny_png, "image/jpeg")), "?")).status_code == 200
    assert_error(client.get("/v1/chat/completions"), 405)
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")


# ------------------------------------------------------------------------------------------ URL fetching


def test_address_policy_and_allowlist():
    import ipaddress

    public = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"]
    forbidden = ["127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "0.0.0.0",
                 "100.64.0.1", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "::ffff:127.0.0.1",
                 "::ffff:10.0.0.1", "240.0.0.1"]  # fmt: skip
    assert all(is_public_address(ipaddress.ip_address(a)) for a in public)
    assert not any(is_public_address(ipaddress.ip_address(a)) for a in forbidden)
    allow = ("example.com", "img.test:8080", "*.cdn.test", "[::1]:81")
    assert host_allowed(host="example.com", port=443, scheme="https", allow_hosts=allow)
    assert not host_allowed(host="example.com", port=8443, scheme="https", allow_hosts=allow)
    assert not host_allowed(host="evil-example.com", port=443, scheme="https", allow_hosts=allow)
    assert host_allowed(host="img.test", port=8080, scheme="http", allow_hosts=allow)
    assert host_allowed(host="a.b.cdn.test", port=80, scheme="http", allow_hosts=allow)
    assert not host_allowed(host="cdn.test.evil", port=80, scheme="http", allow_hosts=allow)
    assert host_allowed(host="::1", port=81, scheme="http", allow_hosts=allow)
    with pytest.raises(ValueError):
        ServerSettings(allow_url_hosts=("img.test:notaport",))


def _loopback_fetcher(port: int, **kwargs: Any) -> URLFetcher:
    """Tests only: names resolve to 127.0.0.1 and loopback (and nothing else) is allowed."""
    resolver = fake_resolver({"img.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    return URLFetcher(allow_hosts=(f"img.test:{port}",), max_bytes=256 * 1024, resolver=resolver,
                      address_allowed=lambda ip: ip.is_loopback, **kwargs)  # fmt: skip


def test_fetcher_redirects_caps_and_timeouts(image_server):
    port = image_server.port
    fetcher = _loopback_fetcher(port, timeout_s=1.0)
    base = f"http://img.test:{port}"

    async def fetch(path: str) -> bytes:
        return await fetcher.fetch(base + path)

    assert asyncio.run(fetch("/img.png")) == image_server.png
    assert asyncio.run(fetch("/to-ok")) == image_server.png  # redirect to an allowed host, re-checked
    assert asyncio.run(fetch("/to-relative")) == image_server.png
    assert image_server.hits[-1] == "/img.png"
    for path, words in [("/to-other-host", "allowlist"), ("/to-private", "allowlist"), ("/loop", "redirected"),
                        ("/big", "larger"), ("/missing", "HTTP 404"), ("/slow", "timed out")]:  # fmt: skip
        hits = len(image_server.hits)
        with pytest.raises(FetchError, match=words):
            asyncio.run(fetch(path))
        if path in ("/to-other-host", "/to-private"):
            assert len(image_server.hits) == hits + 1  # only the redirecting hop was fetched
    private_ok_host = URLFetcher(allow_hosts=(f"img.test:{port}", "10.0.0.1"), max_bytes=1000,
                                 resolver=fake_resolver({"img.test": ["127.0.0.1"]}),
                                 address_allowed=lambda ip: ip.is_loopback)  # fmt: skip
    with pytest.raises(FetchError, match="non-public"):
        asyncio.run(
            private_ok_host.fetch(f"{base}/to-private")
        )  # allowlisted, but 10.0.0.1 is never connected
    with pytest.raises(FetchError, match="disabled"):
        asyncio.run(URLFetcher(allow_hosts=(), max_bytes=10).fetch(f"{base}/img.png"))


def test_http_image_url_end_to_end(tiny_vlm, image_server, pngs):
    port = image_server.port
    app = create_app(tiny_vlm, settings=ServerSettings(allow_url_hosts=(f"img.test:{port}",)),
                     fetcher=_loopback_fetcher(port))  # fmt: skip
    with TestClient(app) as http:
        by_url = http.post("/v1/chat/completions",
                           json={"messages": user(image_part(f"http://img.test:{port}/to-ok"), "What?"), **GEN})  # fmt: skip
        by_data = http.post("/v1/chat/completions",
                            json={"messages": user(image_part(data_url(image_server.png)), "What?"), **GEN})  # fmt: skip
        assert by_url.status_code == 200, by_url.text
        assert by_url.json()["choices"][0]["message"] == by_data.json()["choices"][0]["message"]
        off = http.post("/v1/chat/completions",
                        json={"messages": user(image_part(f"http://img.test:{port}/to-other-host"), "?"), **GEN})  # fmt: skip
        assert_error(off, 400, "invalid_image_url")


# ------------------------------------------------------------------------- queueing, cancelling, shutdown


def _small_server(tiny_vlm: Any, **settings: Any) -> LiveServer:
    return LiveServer(create_app(tiny_vlm, settings=ServerSettings(**settings)))


def _post_in_thread(
    url: str, body: dict[str, Any], results: list[Any], *, timeout: float = 30
) -> threading.Thread:
    def run() -> None:
        try:
            results.append(
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout, trust_env=False)
            )
        except httpx.HTTPError as exc:
            results.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_queue_full_429_and_queued_disconnect_is_dropped(tiny_vlm):
    with _small_server(tiny_vlm, max_batch=1, queue_size=1, batch_wait_ms=0) as server:
        gated = GatedRunner(server.state.engine.runner)
        server.state.engine.runner = gated
        first: list[Any] = []
        second: list[Any] = []
        body = {"messages": user("first"), **GEN}
        t1 = _post_in_thread(server.url, body, first)
        assert gated.started.wait(10)  # the first request is running (held at the gate)
        t2 = _post_in_thread(server.url, {**body, "messages": user("second")}, second, timeout=1.0)
        wait_until(lambda: server.state.engine.queue_depth == 1)  # the second is queued
        third = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=10, trust_env=False)
        assert_error(third, 429, "queue_full")
        t2.join(10)
        assert isinstance(second[0], httpx.TimeoutException)  # that client gave up and disconnected
        requests = server.state.metrics.requests
        wait_until(lambda: requests[("/v1/chat/completions", 499)] == 1)
        gated.gate.set()
        t1.join(20)
        assert first[0].status_code == 200
        wait_until(lambda: server.state.engine.queue_depth == 0)
        assert len(gated.seen) == 1  # the disconnected request never reached the model
        assert server.state.engine.stats.cancelled == 1
        again = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=10, trust_env=False)
        assert again.status_code == 200


def test_stream_disconnect_stops_generation(tiny_vlm):
    with _small_server(tiny_vlm) as server:
        slow = GatedRunner(server.state.engine.runner, stream_delay=0.05)
        server.state.engine.runner = slow
        body = {"messages": user("Describe the image."), "max_tokens": 200, "stream": True}
        deltas = 0
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=body, timeout=30, trust_env=False
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content": "' in line:
                    deltas += 1
                if deltas >= 3:
                    break
        wait_until(lambda: slow.streams and slow.streams[0].closed)
        assert slow.streams[0].steps < 60  # stopped long before its 200 tokens
        wait_until(lambda: server.state.engine.active_streams == 0)
        assert "vlmkit_cancelled_requests_total 1" in httpx.get(f"{server.url}/metrics", trust_env=False).text


def test_graceful_shutdown_drains_in_flight(tiny_vlm):
    server = _small_server(tiny_vlm)
    with server:
        gated = GatedRunner(server.state.engine.runner)
        server.state.engine.runner = gated
        results: list[Any] = []
        thread = _post_in_thread(server.url, {"messages": user("hello"), **GEN}, results)
        assert gated.started.wait(10)
        server.server.should_exit = True  # as on SIGTERM, while the request is in flight
        time.sleep(0.3)
        gated.gate.set()
        thread.join(20)
    assert results[0].status_code == 200 and results[0].json()["choices"][0]["message"]["content"] is not None
    assert not server.thread.is_alive() and not server.state.engine._thread.is_alive()


def test_engine_groups_by_settings_and_bounds_queue():
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[int, dict[str, Any]]] = []

        def generate(self, samples: Any, generation: dict[str, Any]) -> list[Completion]:
            self.calls.append((len(samples), generation))
            return [Completion(text=str(s), completion_tokens=1, finish_reason="stop") for s in samples]

        def stream(self, sample: Any, generation: dict[str, Any]) -> Any:
            raise NotImplementedError

    async def main() -> None:
        runner = Recorder()
        engine = Engine(runner=runner, max_batch=8, queue_size=6, batch_wait_s=0.05)
        loop = asyncio.get_running_loop()
        gens = [{"max_new_tokens": 4}] * 3 + [{"max_new_tokens": 5}] * 2 + [{"temperature": 1.0, "seed": 1}]
        jobs = [
            engine.submit(Job(sample=i, generation=g, stream=False, loop=loop)) for i, g in enumerate(gens)
        ]
        with pytest.raises(QueueFull):
            engine.submit(Job(sample=99, generation={}, stream=False, loop=loop))
        engine.start()
        results = await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs))
        assert [r.text for r in results] == [str(i) for i in range(6)]
        assert sorted(size for size, _ in runner.calls) == [1, 2, 3]  # seeded sampling runs alone
        assert engine.stop(timeout=5)

    asyncio.run(main())


def test_engine_isolates_a_failing_request():
    class Picky:
        def generate(self, samples: Any, generation: dict[str, Any]) -> list[Completion]:
            if 2 in samples:
                raise RuntimeError("row 2 is broken")
            return [Completion(text=str(s), completion_tokens=1, finish_reason="stop") for s in samples]

        def stream(self, sample: Any, generation: dict[str, Any]) -> Any:
            raise NotImplementedError

    async def main() -> None:
        engine = Engine(runner=Picky(), max_batch=8, queue_size=8, batch_wait_s=0.05)
        loop = asyncio.get_running_loop()
        jobs = [engine.submit(Job(sample=i, generation={}, stream=False, loop=loop)) for i in range(4)]
        engine.start()
        results = await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs), return_exceptions=True)
        assert [r.text if isinstance(r, Completion) else "failed" for r in results] == [
            "0",
            "1",
            "failed",
            "3",
        ]
        assert engine.stats.failed == 1 and engine.stop(timeout=5)

    asyncio.run(main())


def test_generation_errors_are_generic_and_the_server_survives(tiny_vlm):
    class Broken:
        def generate(self, samples: Any, generation: dict[str, Any]) -> list[Completion]:
            raise RuntimeError("secret detail /opt/models/x.safetensors")

        def stream(self, sample: Any, generation: dict[str, Any]) -> Any:
            raise RuntimeError("secret detail /opt/models/x.safetensors")

    with TestClient(create_app(tiny_vlm), raise_server_exceptions=False) as http:
        real = http.app.state.vlmkit.engine.runner
        http.app.state.vlmkit.engine.runner = Broken()
        error = assert_error(http.post("/v1/chat/completions", json={"messages": user("hi"), **GEN}), 500)
        assert "secret" not in error["message"] and error["type"] == "server_error"
        streamed = http.post("/v1/chat/completions", json={"messages": user("hi"), "stream": True, **GEN})
        assert streamed.status_code == 200 and "secret" not in streamed.text
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
        http.app.state.vlmkit.engine.runner = real
        assert http.get("/health").status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": user("hi"), **GEN}).status_code == 200


def test_metrics_include_model_cache_counters(client, tiny_vlm):
    from vlmkit.serving.metrics import Metrics, find_cache_stats

    class WithCache:
        def cache_stats(self) -> dict[str, Any]:
            return {"image_hits": 3, "prefix-misses": 1, "label": "not a number"}

    metrics = Metrics()
    metrics.cache_sources = find_cache_stats(WithCache())
    text = metrics.render()
    assert (
        'vlmkit_cache_image_hits{cache="model"} 3' in text
        and 'vlmkit_cache_prefix_misses{cache="model"} 1' in text
    )
    assert "label" not in text and find_cache_stats(object()) == {}
    live_text = client.get("/metrics").text
    for cache in ("feature", "prefix"):  # the VLM's own caches, exported when it has them
        if hasattr(tiny_vlm, f"{cache}_cache"):
            assert f'vlmkit_cache_lookups{{cache="{cache}"}}' in live_text


def test_health_503_while_loading_then_ready(tiny_vlm):
    release = threading.Event()
    failures: list[BaseException] = []

    def loader() -> Any:
        assert release.wait(20)
        return tiny_vlm

    with TestClient(create_app(loader, settings=ServerSettings(model_name="m"))) as http:
        assert http.get("/health").status_code == 503 and http.get("/health").json()["status"] == "loading"
        assert_error(http.post("/v1/chat/completions", json={"messages": user("hi")}), 503, "model_loading")
        release.set()
        wait_until(lambda: http.get("/health").status_code == 200)
        assert http.post("/v1/chat/completions", json={"messages": user("hi"), **GEN}).status_code == 200

    def broken() -> Any:
        raise ValueError("no model at /secret/path")

    with TestClient(create_app(broken, on_load_error=failures.append)) as http:
        wait_until(lambda: http.get("/health").json()["status"] == "error")
        error = assert_error(http.post("/v1/chat/completions", json={"messages": user("hi")}), 503)
        assert "/secret" not in error["message"] and len(failures) == 1


# ------------------------------------------------------------------------------------------------- load


@pytest.mark.slow
def test_load_32_clients_x_5_requests(live, pngs):
    prompts = [(user(image_part(data_url(pngs[i % 3])), f"Question {i}: what colour?") if i % 2 else
                user(f"Tell me about shape {i}.")) for i in range(8)]  # fmt: skip

    async def main() -> tuple[list[str], list[tuple[int, str, float]], float]:
        limits = httpx.Limits(max_connections=40, max_keepalive_connections=40)
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=60, limits=limits,
                                     trust_env=False) as http:  # fmt: skip

            async def ask(i: int) -> tuple[int, str, float]:
                start = time.perf_counter()
                r = await http.post(
                    "/v1/chat/completions", json={"model": "tiny", "messages": prompts[i], **GEN}
                )
                assert r.status_code == 200, r.text
                return i, r.json()["choices"][0]["message"]["content"], time.perf_counter() - start

            singles = [(await ask(i))[1] for i in range(len(prompts))]  # one at a time: the reference

            async def client_loop(c: int) -> list[tuple[int, str, float]]:
                return [await ask((c + k) % len(prompts)) for k in range(5)]

            start = time.perf_counter()
            per_client = await asyncio.gather(*(client_loop(c) for c in range(32)))
            return singles, [r for rs in per_client for r in rs], time.perf_counter() - start

    batches_before = live.state.engine.stats.batches
    singles, results, elapsed = asyncio.run(main())
    assert len(results) == 160
    assert all(text == singles[i] for i, text, _ in results)  # batched answers equal single ones (greedy)
    latencies = sorted(seconds for *_, seconds in results)
    stats = live.state.engine.stats
    print(f"\nload: 160 requests in {elapsed:.2f} s = {160 / elapsed:.1f} req/s; "
          f"p50 {latencies[79] * 1000:.0f} ms, p99 {latencies[158] * 1000:.0f} ms; "
          f"{stats.batches - batches_before} batches")  # fmt: skip
    assert stats.batches - batches_before < 160  # requests really were batched


# -------------------------------------------------------------------------------------------------- CLI


def _serve_app():
    import typer

    from vlmkit.cli.serve import serve_command

    app = typer.Typer()
    app.command()(serve_command)
    return app


def test_cli_rejects_bad_options(tmp_path):
    from typer.testing import CliRunner

    runner = CliRunner()
    bad_host = runner.invoke(_serve_app(), ["--allow-url-host", "img:notaport", "--port", "0"])
    assert bad_host.exit_code != 0 and "invalid URL host entry" in str(bad_host.exception or bad_host.output)
    missing = runner.invoke(_serve_app(), ["--model", str(tmp_path / "nope"), "--port", "0"])
    assert missing.exit_code != 0 and "not found" in str(missing.exception or missing.output)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text("{}")
        taken = runner.invoke(
            _serve_app(), ["--model", str(tmp_path / "m"), "--port", str(busy.getsockname()[1])]
        )
        assert taken.exit_code != 0 and "cannot listen" in str(taken.exception or taken.output)
    finally:
        busy.close()


@pytest.mark.slow
def test_cli_serves_a_model_dir_and_stops_on_sigterm(tiny_vlm_dir):
    code = ("import typer, sys; from vlmkit.cli.serve import serve_command; app = typer.Typer(); "
            "app.command()(serve_command); app(sys.argv[1:])")  # fmt: skip
    env = {**os.environ, "VLMKIT_API_KEY": "cli-key"}
    proc = subprocess.Popen([sys.executable, "-c", code, "--model", str(tiny_vlm_dir), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env,
                            text=True)  # fmt: skip
    try:
        line = proc.stderr.readline()
        assert "http://127.0.0.1:" in line, line
        base = line.split("http://", 1)[1].split("/", 1)[0]
        with httpx.Client(base_url=f"http://{base}", headers={"Authorization": "Bearer cli-key"}, timeout=30,
                          trust_env=False) as http:  # fmt: skip
            wait_until(lambda: http.get("/health").status_code == 200, timeout=60)
            answer = http.post("/v1/chat/completions", json={"messages": user("hi"), **GEN})
            assert answer.status_code == 200 and answer.json()["model"] == Path(tiny_vlm_dir).name
            assert_error(http.post("/v1/chat/completions", json={"messages": user("hi")},
                                   headers={"Authorization": "Bearer x"}), 401)  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
