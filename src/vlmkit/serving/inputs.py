"""Turn a validated ``ChatRequest`` into model input: images fetched/decoded, the prompt tokenized and counted.

Work that can fail on user input happens here, before queueing, so a bad image or an over-long prompt is a
400 for its own request and never reaches (or breaks) a batch. Decoding and tokenizing run on a small pool
of daemon threads (``prepare_threads``), so one heavy request cannot stall the others; a Rust tokenizer must
not be used from two threads at once, so each thread owns a private copy of the tokenizer (the model worker
uses the original). Images are shrunk to what the vision tower sees as they are decoded (``S x S`` RGB, the
same pixels ``ImageProcessor`` would produce from the full image), and the decoded bytes a request holds
count against ``max_queued_image_bytes`` until its answer ends. A tokenizer's Jinja chat template renders in
a worker process with a time and memory budget (``template.py``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import io
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, cast

from PIL import Image

from vlmkit.processing.image import load_image
from vlmkit.processing.processor import Sample, VLMProcessor
from vlmkit.processing.prompting import TOKENIZER_TEMPLATE
from vlmkit.processing.tokenizer_protocol import Tokenizer
from vlmkit.serving.errors import APIError, bad_request
from vlmkit.serving.fetch import FetchError, URLFetcher
from vlmkit.serving.limits import ServerSettings, base64_decoded_size, max_tokens_allowed
from vlmkit.serving.request import ChatRequest, ImageRef
from vlmkit.serving.template import RendererPool, TemplateRenderer, TemplateTimeout
from vlmkit.serving.workers import ImageMemory, Reservation, WorkerPool, return_freed_memory

# formats a browser or phone sends; everything else (EPS via Ghostscript, exotic decoders) is refused
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
# a token never spans more characters than this in practice; longer prompts are refused before tokenizing
_MAX_CHARS_PER_TOKEN = 64
# after decoding an image this large (12 MB as RGB), freed memory is handed back to the OS at once
_TRIM_AFTER_PIXELS = 4_000_000


@dataclass
class Prepared:
    """What the engine runs, plus the numbers the response reports."""

    sample: Sample
    prompt_tokens: int
    max_new_tokens: int
    # the decoded images' bytes, held until the answer ends (released by the engine or on refusal)
    images_held: Reservation | None = None

    def release(self) -> None:
        if self.images_held is not None:
            self.images_held.release()


class Preparer:
    """Owns the preparation threads (each with its tokenizer copy and template renderer) and the URL fetcher."""

    def __init__(
        self,
        *,
        processor: VLMProcessor,
        settings: ServerSettings,
        fetcher: URLFetcher,
        context_length: int | None,
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.context_length = context_length
        self.processor = processor
        self.image_memory = ImageMemory(settings.max_queued_image_bytes)
        # AnyRes models cut tiles from the full image, so only fixed-size towers get images shrunk at decode
        self.fit_images = getattr(processor, "anyres", None) is None
        self._local = threading.local()
        self._renderers: RendererPool | None = None
        if processor.template == TOKENIZER_TEMPLATE:
            tokenizer, timeout_s = processor.tokenizer, settings.template_timeout_s
            self._renderers = RendererPool(make=lambda: TemplateRenderer.for_tokenizer(tokenizer, timeout_s=timeout_s),
                                           size=settings.prepare_threads)  # fmt: skip
            self._renderers.start()
        self._pool = WorkerPool(
            threads=settings.prepare_threads, name="vlmkit-prepare", initializer=self._setup
        )

    def close(self) -> None:
        self._pool.close()
        if self._renderers is not None:
            self._renderers.close()  # a render stuck in a runaway template ends now

    async def prepare(self, request: ChatRequest) -> Prepared:
        """Cheap checks first, then fetch image bytes (async), then decode + tokenize on a preparation thread."""
        self._check_before_work(request)
        blobs = [await self._image_bytes(ref) for ref in request.images]
        future = self._pool.submit(self._prepare_sync, request, blobs)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # client gone or shutdown: what the thread still produces is freed
            future.add_done_callback(_release_unclaimed)
            raise

    def _setup(self) -> None:
        """Per thread: a private processor (its own tokenizer copy; the template rendered by the shared pool)."""
        processor = copy.copy(self.processor)
        tokenizer = copy.deepcopy(self.processor.tokenizer)
        bounded = None if self._renderers is None else _BoundedTemplate(tokenizer, self._renderers)
        # the wrapper is a Tokenizer by delegation (``__getattr__``), which a static check cannot see
        processor.tokenizer = tokenizer if bounded is None else cast(Tokenizer, bounded)
        self._local.processor = processor

    async def _image_bytes(self, ref: ImageRef) -> bytes:
        if ref.url.startswith("data:"):
            return decode_data_url(ref.url, param=ref.param, max_bytes=self.settings.max_image_bytes)
        if ref.url.lower().startswith(("http://", "https://")):
            try:
                return await self.fetcher.fetch(ref.url)
            except FetchError as exc:
                raise bad_request(f"{ref.param}: {exc.message}", param=ref.param, code=exc.code) from None
        raise bad_request(f"{ref.param}: image URLs must be data: URLs (or http(s) where the server allows "
                          "them); file paths and file:// are never read", param=ref.param, code="invalid_image_url")  # fmt: skip

    def _prepare_sync(self, request: ChatRequest, blobs: list[bytes]) -> Prepared:
        """Headers, then the image-memory reservation, then decode (shrunk) and tokenize."""
        opened = [
            open_image(blob, param=ref.param, max_pixels=self.settings.max_image_pixels)
            for ref, blob in zip(request.images, blobs, strict=True)
        ]
        held = self.image_memory.reserve(sum(self._decoded_bytes(image) for image in opened))
        try:
            images = [
                self._decode(image, param=ref.param)
                for ref, image in zip(request.images, opened, strict=True)
            ]
            sample = Sample(messages=request.messages, images=images)
            prompt_tokens = len(self._encode(sample).input_ids)
            return Prepared(sample=sample, prompt_tokens=prompt_tokens, images_held=held,
                            max_new_tokens=self._max_new_tokens(request, prompt_tokens))  # fmt: skip
        except BaseException:
            held.release()
            raise

    def _encode(self, sample: Sample) -> Any:
        processor: VLMProcessor = self._local.processor
        try:
            return processor.encode_sample(sample, add_generation_prompt=True, with_labels=False)
        except TemplateTimeout as exc:  # the model's template, not the request: a 500 that says what happened
            raise APIError(500, f"{exc}; the request was abandoned", code="template_timeout") from None
        except _template_errors() as exc:  # the conversation's fault (roles out of order, ...)
            raise bad_request(f"the conversation cannot be rendered with this model's prompt template "
                              f"({_first_line(exc)})", param="messages", code="invalid_conversation") from None  # fmt: skip

    def _decoded_bytes(self, image: Image.Image) -> int:
        """RGB bytes the decoded image will hold: ``S x S`` when shrunk at decode, else its full size."""
        if self.fit_images:
            side = self.processor.image_processor.image_size
            return 3 * side * side
        return 3 * image.width * image.height

    def _decode(self, image: Image.Image, *, param: str) -> Image.Image:
        large = image.width * image.height >= _TRIM_AFTER_PIXELS
        with image:
            decoded = decode_opened(image, param=param, max_pixels=self.settings.max_image_pixels)
        if not self.fit_images:
            return decoded
        # the full-resolution pixels are dropped here, before the request waits anywhere
        fitted = self.processor.image_processor.fit(decoded)
        del decoded
        if large:
            return_freed_memory()
        return fitted

    def _check_before_work(self, request: ChatRequest) -> None:
        """Limits that need no image or tokenizer: refused before any fetching or decoding."""
        limit = max_tokens_allowed(settings=self.settings, context_length=self.context_length)
        if request.max_tokens is not None and limit is not None and request.max_tokens > limit:
            raise bad_request(f"max_tokens must be at most {limit}", param="max_tokens")
        if self.context_length is None:
            return
        chars = sum(len(m["content"]) for m in request.messages)
        if chars > _MAX_CHARS_PER_TOKEN * self.context_length:
            raise _context_error(f"the messages are far longer than the model's context of "
                                 f"{self.context_length} tokens")  # fmt: skip

    def _max_new_tokens(self, request: ChatRequest, prompt_tokens: int) -> int:
        limit = max_tokens_allowed(settings=self.settings, context_length=self.context_length)
        room = None if self.context_length is None else self.context_length - prompt_tokens
        if room is not None and room < 1:
            raise _context_error(f"the prompt is {prompt_tokens} tokens (images included), which leaves no "
                                 f"room in the model's context of {self.context_length} tokens")  # fmt: skip
        if request.max_tokens is None:
            caps = [v for v in (self.settings.default_max_tokens, limit, room) if v is not None]
            return min(caps)
        if room is not None and request.max_tokens > room:
            raise _context_error(f"the prompt is {prompt_tokens} tokens and max_tokens is {request.max_tokens}: "
                                 f"together more than the model's context of {self.context_length} tokens")  # fmt: skip
        return request.max_tokens


def decode_data_url(url: str, *, param: str, max_bytes: int) -> bytes:
    """``data:<type>;base64,<payload>`` -> bytes; the size is checked before decoding."""
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise bad_request(f"{param}: expected a base64 data: URL such as 'data:image/png;base64,...'",
                          param=param, code="invalid_image_url")  # fmt: skip
    if base64_decoded_size(len(payload)) > max_bytes:
        raise bad_request(f"{param}: the image is larger than {max_bytes} bytes", param=param,
                          code="image_too_large")  # fmt: skip
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the data: URL is not valid base64 (truncated or corrupted?)",
                          param=param, code="invalid_image") from None  # fmt: skip


def decode_image(data: bytes, *, param: str, max_pixels: int) -> Image.Image:
    """Header first (format allowlist, pixel count), then the full decode via ``load_image``."""
    with open_image(data, param=param, max_pixels=max_pixels) as image:
        return decode_opened(image, param=param, max_pixels=max_pixels)


def open_image(data: bytes, *, param: str, max_pixels: int) -> Image.Image:
    """The lazily opened image: only its header is read (format allowlist, pixel count checked)."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise _too_many_pixels(param, max_pixels) from None
    except Exception:  # noqa: BLE001 - any failure to read a header is the image's fault
        raise bad_request(f"{param}: not a readable image (supported: {', '.join(IMAGE_FORMATS)})",
                          param=param, code="invalid_image") from None  # fmt: skip
    if image.width * image.height > max_pixels:
        image.close()
        raise _too_many_pixels(param, max_pixels)
    return image


def decode_opened(image: Image.Image, *, param: str, max_pixels: int) -> Image.Image:
    try:
        return load_image(image, max_pixels=max_pixels)
    except Exception:  # noqa: BLE001 - ImageLoadError or any decoder error: the image's fault
        raise bad_request(f"{param}: the image data is corrupt, truncated or unsupported", param=param,
                          code="invalid_image") from None  # fmt: skip


def _release_unclaimed(future: Future[Prepared]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()


class _BoundedTemplate:
    """The tokenizer, with ``apply_chat_template`` rendered in a worker process (time / memory budget)."""

    def __init__(self, tokenizer: Tokenizer, renderer: RendererPool) -> None:
        self._tokenizer = tokenizer
        self._renderer = renderer

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        *,
        tokenize: bool = False,
        add_generation_prompt: bool = False,
    ) -> str:
        if tokenize:
            raise TypeError("only tokenize=False is supported here")
        return self._renderer.render(conversation, add_generation_prompt=add_generation_prompt)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _too_many_pixels(param: str, max_pixels: int) -> APIError:
    return bad_request(
        f"{param}: the image has more than {max_pixels} pixels", param=param, code="image_too_large"
    )


def _context_error(message: str) -> APIError:
    return bad_request(message, param="messages", code="context_length_exceeded")


def _template_errors() -> tuple[type[Exception], ...]:
    from jinja2 import TemplateError  # transformers' chat templates raise it (raise_exception)

    return (ValueError, TemplateError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def context_length_of(model: Any) -> int | None:
    """The language model's ``max_position_embeddings`` (None when it has no fixed context)."""
    config = getattr(getattr(model, "language_model", None), "config", None)
    text_config = (
        config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    )
    value = getattr(text_config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None
