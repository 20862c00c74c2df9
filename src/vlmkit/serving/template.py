"""Chat templates rendered in a child process with a time and memory budget.

A model directory's Jinja chat template is code: transformers' sandbox stops it from touching files or
attributes, but not from looping for hours (nested ``range`` loops, a reused ``range`` object) or building a
gigabyte string. A Python thread stuck in such a loop can be neither interrupted nor joined, so it would hang
every request and keep the process alive after SIGTERM. Here the template runs in a worker process (a plain
``python -c`` that imports only transformers' template module; its address space capped with ``RLIMIT_AS``);
the server waits at most ``timeout_s`` for the answer and otherwise kills the worker (a fresh one starts for
the next render). Messages and answers cross the pipe as JSON lines: nothing is unpickled.

The output equals ``tokenizer.apply_chat_template(messages, tokenize=False)``: the same transformers function
renders the same template with the same variables (the tokenizer's special-token map).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmkit.processing.tokenizer_protocol import Tokenizer

MIB = 1024 * 1024
# address space the worker may add beyond what Python, jinja2 and transformers' template module take
DEFAULT_MEMORY_BYTES = 1024 * MIB
_STARTUP_TIMEOUT_S = 60.0

# The worker. Its stdout carries only replies: anything a library prints goes to stderr instead.
_WORKER = r"""
import json, os, sys
replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
sys.stdout = sys.stderr
from transformers.utils.chat_template_utils import render_jinja_template
setup = json.loads(sys.stdin.readline())  # after the import: a spare worker can start before the model is known
try:
    import resource
    with open("/proc/self/status", encoding="ascii") as status:
        size = next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + setup["memory_bytes"], size + setup["memory_bytes"]))
except Exception:
    pass
def reply(kind, value):
    replies.write(json.dumps({kind: value}) + "\n")
    replies.flush()
reply("ready", True)
for line in sys.stdin:
    request = json.loads(line)
    try:
        rendered, _ = render_jinja_template(conversations=[request["messages"]], chat_template=setup["template"],
                                            add_generation_prompt=request["add_generation_prompt"], **setup["variables"])
    except MemoryError:
        reply("dead", "the chat template needed more than its %d MiB memory budget" % (setup["memory_bytes"] >> 20))
        break
    except Exception as exc:
        text = str(exc).strip()
        reply("error", (text.splitlines()[0] if text else type(exc).__name__)[:200])
    else:
        reply("ok", rendered[0])
"""


class TemplateTimeout(Exception):
    """The template did not finish within the budget (the model's fault, not the request's)."""


class TemplateFailed(ValueError):
    """The template raised (``raise_exception``, a conversation it refuses) or exceeded its memory budget."""


class TemplateRenderer:
    """One worker process rendering one template, one call at a time."""

    def __init__(
        self,
        *,
        chat_template: str,
        variables: dict[str, Any],
        timeout_s: float,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
    ) -> None:
        self.setup = {"template": chat_template, "variables": variables, "memory_bytes": memory_bytes}
        self.timeout_s = timeout_s
        self._process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, *, timeout_s: float) -> TemplateRenderer:
        """What ``tokenizer.apply_chat_template`` renders with: its template and special-token variables."""
        variables = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str | list)}
        return cls(chat_template=tokenizer.get_chat_template(), variables=variables, timeout_s=timeout_s)

    def start(self) -> None:
        """Start the worker now (about a second), so the first request does not wait for it."""
        with self._lock:
            self._ensure_worker()

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        with self._lock:
            process = self._ensure_worker()
            request = {"messages": messages, "add_generation_prompt": add_generation_prompt}
            try:
                assert process.stdin is not None
                process.stdin.write(json.dumps(request) + "\n")
                process.stdin.flush()
            except OSError:
                self._kill()
                raise TemplateFailed("the chat template's worker process died") from None
            kind, value = self._read_reply(process, timeout_s=self.timeout_s)
            if kind in ("dead", "timeout"):
                self._kill()  # a runaway template must not keep a CPU: abandon the worker
        if kind == "ok":
            return value
        if kind == "timeout":
            raise TemplateTimeout(f"the model's chat template did not finish within {self.timeout_s:g} s")
        raise TemplateFailed(value)

    def close(self) -> None:
        """Kill the worker (on shutdown; safe from any thread, also while a render waits for it)."""
        self._closed = True
        process, self._process = self._process, None
        if process is not None:
            _stop(process)

    def _ensure_worker(self) -> subprocess.Popen[str]:
        if self._closed:
            raise TemplateFailed("the server is shutting down")
        if self._process is None or self._process.poll() is not None:
            process = _take_spare() or _spawn()
            assert process.stdin is not None
            process.stdin.write(json.dumps(self.setup) + "\n")
            process.stdin.flush()
            self._process = process
            if self._read_reply(process, timeout_s=_STARTUP_TIMEOUT_S)[0] != "ready":
                self._kill()
                raise TemplateFailed("the chat template's worker process did not start")
        return self._process

    def _read_reply(self, process: subprocess.Popen[str], *, timeout_s: float) -> tuple[str, Any]:
        """("ok" | "error" | "dead" | "ready", value), ("timeout", None) or ("dead", message) on EOF."""
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], timeout_s)
        if not readable:
            return "timeout", None
        line = process.stdout.readline()
        try:
            ((kind, value),) = json.loads(line).items()
        except (ValueError, AttributeError):
            return "dead", "the chat template's worker process died while rendering"
        return kind, value

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _stop(process)


_spares: list[subprocess.Popen[str]] = []
_spares_lock = threading.Lock()


def prewarm() -> None:
    """Start a worker now that waits for its template: importing transformers takes it about a second, which
    then overlaps with loading the model instead of delaying the first request."""
    with _spares_lock:
        if not any(process.poll() is None for process in _spares):
            _spares.append(_spawn())


def _take_spare() -> subprocess.Popen[str] | None:
    with _spares_lock:
        while _spares:
            process = _spares.pop()
            if process.poll() is None:
                return process
    return None


def _spawn() -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, encoding="utf-8")  # fmt: skip


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(10)
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


class RendererPool:
    """Renderers shared by the preparation threads: one starts with the server; more (up to ``size``) start only
    while all are busy, e.g. one is stuck in a runaway template until its timeout."""

    def __init__(self, *, make: Callable[[], TemplateRenderer], size: int) -> None:
        self._make = make
        self._size = size
        self._idle: list[TemplateRenderer] = []
        self._all: list[TemplateRenderer] = []
        self._cond = threading.Condition()
        self._closed = False

    def start(self) -> None:
        """Start the first worker now (about a second of CPU), so that no request waits for it."""
        renderer = self._acquire()
        try:
            renderer.start()
        except TemplateFailed:
            pass  # reported per request if it keeps failing
        finally:
            self._release(renderer)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        renderer = self._acquire()
        try:
            return renderer.render(messages, add_generation_prompt=add_generation_prompt)
        finally:
            self._release(renderer)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            renderers = list(self._all)
            self._cond.notify_all()
        for renderer in renderers:
            renderer.close()

    def _acquire(self) -> TemplateRenderer:
        with self._cond:
            while True:
                if self._closed:
                    raise TemplateFailed("the server is shutting down")
                if self._idle:
                    return self._idle.pop()
                if len(self._all) < self._size:
                    renderer = self._make()
                    self._all.append(renderer)
                    return renderer
                self._cond.wait()

    def _release(self, renderer: TemplateRenderer) -> None:
        with self._cond:
            self._idle.append(renderer)
            self._cond.notify()
