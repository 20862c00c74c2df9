"""OpenAI-compatible HTTP serving: ``create_app`` (FastAPI), a batching engine, and a chat page at ``/``.

Needs the ``serve`` extra (fastapi, uvicorn, httpx). Imported lazily so ``import vlmkit.serving`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from vlmkit.serving.app import create_app

        return create_app
    if name == "ServerSettings":
        from vlmkit.serving.limits import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'vlmkit.serving' has no attribute {name!r}")
