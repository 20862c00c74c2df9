"""Server settings: what the operator chose (auth, URL hosts, batching) and every limit a request is held to.

Limits are checked before work is spent: the body size while it is read, image bytes before base64 is
decoded, pixel counts from the image header before pixels are decoded, the prompt's token count before
the request is queued.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``create_app`` needs besides the model. Defaults suit a single-user local server."""

    # the id in /v1/models and responses; None = the model directory's name (or "vlmkit")
    model_name: str | None = None
    # required as "Authorization: Bearer KEY" on every /v1 route when set
    api_key: str | None = None
    # hosts whose http(s) image URLs are fetched: "example.com" (ports 80/443), "example.com:8080",
    # "*.example.com" (any subdomain); empty = http(s) image URLs are refused
    allow_url_hosts: tuple[str, ...] = ()
    # dynamic batching: up to max_batch compatible requests per generate call (and concurrent streams)
    max_batch: int = 8
    # requests waiting for the model beyond this are answered 429
    queue_size: int = 64
    # how long the worker waits for more requests to join a batch
    batch_wait_ms: float = 5.0
    max_body_bytes: int = 20 * MIB
    max_image_bytes: int = 10 * MIB
    # decoded size limit, checked from the header (Pillow's own bomb limit, ~89 MP, also applies)
    max_image_pixels: int = 25_000_000
    max_images: int = 8
    # when the request names no max_tokens (clamped to what the context length leaves)
    default_max_tokens: int = 256
    # the largest max_tokens accepted; None = the language model's context length
    max_tokens_limit: int | None = None
    fetch_timeout_s: float = 10.0
    max_redirects: int = 3
    # seconds uvicorn waits for in-flight requests on shutdown (then the process exits regardless)
    shutdown_timeout_s: float = 30.0
    # request shape: messages per request, content parts (text + image) over all its messages
    max_messages: int = 256
    max_content_parts: int = 512
    # threads decoding images and tokenizing (each with its own tokenizer copy): one heavy request takes one
    prepare_threads: int = 4
    # decoded image bytes held by requests being prepared, queued or answered (images are shrunk to the
    # tower's input size at decode, 3*S*S bytes each); beyond it requests are answered 429
    max_queued_image_bytes: int = 512 * MIB
    # a tokenizer's Jinja chat template must render within this (else 500 template_timeout, worker killed)
    template_timeout_s: float = 5.0
    # slow clients: the request head must arrive within header_timeout_s of the connection's (or the previous
    # answer's) start, the body within body_timeout_s of the head; idle keep-alive connections close after
    # keep_alive_s; beyond max_connections the longest-idle connection is closed to make room
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 256

    def __post_init__(self) -> None:
        positive = ("max_batch", "queue_size", "max_body_bytes", "max_image_bytes", "max_image_pixels",
                    "default_max_tokens", "max_redirects", "max_messages", "max_content_parts", "prepare_threads",
                    "max_queued_image_bytes", "max_connections")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name == "max_redirects" else 1)
            ):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 0:
            raise ValueError(f"max_images must be an int >= 0, got {self.max_images!r}")
        if self.batch_wait_ms < 0 or self.fetch_timeout_s <= 0 or self.shutdown_timeout_s < 0:
            raise ValueError(
                "batch_wait_ms, fetch_timeout_s and shutdown_timeout_s must be >= 0 (timeout > 0)"
            )
        for name in ("template_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 86_400:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if self.api_key is not None:
            _check_api_key(self.api_key)
        for entry in self.allow_url_hosts:
            parse_host_entry(entry)  # a bad entry is an operator error now, not a 500 later
        object.__setattr__(self, "allow_url_hosts", tuple(h.strip().lower() for h in self.allow_url_hosts))


def _check_api_key(key: str) -> None:
    """HTTP headers carry ASCII: a key with other characters (or spaces) could never be sent, so no client
    could ever authenticate; refuse it when the server starts."""
    if not key.strip():
        raise ValueError("api_key must not be empty")
    if not (key.isascii() and key.isprintable()) or any(ch.isspace() for ch in key):
        raise ValueError(
            "api_key must be printable ASCII without spaces (an HTTP 'Authorization' header cannot carry "
            "other characters, so no client could send it)"
        )


def base64_decoded_size(encoded_length: int) -> int:
    """Upper bound of the bytes ``encoded_length`` base64 characters decode to (checked before decoding)."""
    return (encoded_length * 3) // 4


def max_tokens_allowed(*, settings: ServerSettings, context_length: int | None) -> int | None:
    """The largest max_tokens a request may ask for (before its own prompt length is counted)."""
    limits = [value for value in (settings.max_tokens_limit, context_length) if value is not None]
    return min(limits) if limits else None


def parse_host_entry(entry: str) -> tuple[str, int | None]:
    """Parse ``example.com``, ``example.com:8080``, ``[::1]:8080`` or ``*.example.com`` into (name, port)."""
    text = entry.strip().lower()
    if text.startswith("["):
        name, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        name, _, port = text.partition(":")
    else:
        name, port = text, ""
    name = name.rstrip(".")
    if not _valid_host(name) or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"invalid URL host entry {entry!r}; use HOST, HOST:PORT, [IPV6]:PORT or *.DOMAIN")
    return name, int(port) if port else None


def _valid_host(name: str) -> bool:
    if ":" in name:
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return False
        return True
    labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-_")
    return bool(name) and all(label and set(label) <= allowed for label in labels)
