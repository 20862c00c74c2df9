"""The chat page at ``/`` in headless Chromium: attach an image, ask, watch the streamed answer arrive.

Uses Debian's ``chromium`` (/usr/bin/chromium) through Playwright's Python package (never a downloaded
browser). Skipped locally when Chromium is missing; under CI (env ``CI`` set) a missing browser fails.
The browser only talks to the test server on 127.0.0.1; background networking is switched off.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow  # every test here takes more than a few seconds

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(
        "Debian's chromium is not installed (apt-get install chromium); CI installs it",
        allow_module_level=True,
    )
if not os.environ.get("CI"):
    pytest.importorskip("playwright")
    pytest.importorskip("fastapi")

from playwright.sync_api import sync_playwright  # noqa: E402

from conftest import make_image, png_bytes  # noqa: E402
from test_serving import GEN, LiveServer, _one_torch_thread, data_url, image_part, user  # noqa: E402, F401
from vlmkit.serving.app import create_app  # noqa: E402
from vlmkit.serving.limits import ServerSettings  # noqa: E402


def test_chat_page_streams_an_answer_about_an_attached_image(tiny_vlm, tmp_path):
    assert CHROMIUM.exists(), "CI must install Debian's chromium (apt-get install -y chromium)"
    picture = png_bytes(make_image(seed=3, size=(48, 36)))
    settings = ServerSettings(default_max_tokens=GEN["max_tokens"], model_name="tiny")
    with LiveServer(create_app(tiny_vlm, settings=settings)) as server, sync_playwright() as pw:
        expected = httpx.post(f"{server.url}/v1/chat/completions", trust_env=False, timeout=30,
                              json={"messages": user(image_part(data_url(picture)), "What is in the picture?"),
                                    **GEN}).json()["choices"][0]["message"]["content"]  # fmt: skip
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(server.url) or r.url.startswith("data:")
                    else outside.append(r.url))  # fmt: skip
            page.goto(f"{server.url}/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
            page.set_input_files(
                "#file", files=[{"name": "shape.png", "mimeType": "image/png", "buffer": picture}]
            )
            page.wait_for_selector("#attachments img")
            page.fill("#prompt", "What is in the picture?")
            page.click("#send")
            answer = page.wait_for_selector(".msg.assistant[data-state=done]", timeout=20_000)
            assert answer.query_selector(".text").text_content() == expected
            assert page.query_selector(".msg.user img") is not None  # the image shows in the conversation
            assert page.query_selector(".msg.error") is None
            page.screenshot(path=str(tmp_path / "chat.png"))
            assert outside == []  # no CDN, nothing but the test server
        finally:
            browser.close()
