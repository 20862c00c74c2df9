"""Validate an OpenAI ``/v1/chat/completions`` body into a ``ChatRequest``; every problem is a 400 naming the field.

Parsing is ours rather than pydantic's so each error is OpenAI-shaped, names its ``param`` and never
echoes library internals. Content parts are ``text`` and ``image_url`` only (no PIL objects or paths:
a file path can never reach the image loader). Image parts become the model's image placeholder; the
same placeholder typed as text is refused (400, code ``image_placeholder_in_text``) so a user cannot
claim an image slot that no image fills, nor shift images between slots.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from vlmkit.generation.config import GenerationConfig
from vlmkit.processing.text import check_text
from vlmkit.serving.errors import APIError, bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# fields we cannot honour: refused when set to anything but their "off" value, never silently ignored
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logit_bias", "audio", "modalities",
                "prediction", "top_logprobs")  # fmt: skip


@dataclass(frozen=True)
class ImageRef:
    """An image part: its URL (data: or http(s)) and where it was in the request."""

    url: str
    param: str


@dataclass
class ChatRequest:
    """A validated request: plain messages (placeholders where images go), images, generation settings."""

    messages: list[dict[str, str]]
    images: list[ImageRef]
    # GenerationConfig keywords except max_new_tokens (decided once the prompt length is known)
    generation: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    model: str | None = None


class _TooManyObjects(Exception):
    pass


def json_object_limit(*, max_messages: int, max_parts: int) -> int:
    """Objects a valid request can have: itself, its messages, each part and its image_url, and a few options."""
    return 1 + max_messages + 2 * max_parts + 64


def parse_json(body: bytes, *, max_objects: int | None = None) -> dict[str, Any]:
    """The body as a JSON object (NaN / Infinity, absurd nesting and text that is not Unicode are refused).

    The body must be UTF-8 (RFC 8259; strict decoding refuses encoded surrogates), so a lone surrogate can only
    come from an unpaired ``\\uD800``-style escape: only a body containing one is checked (one pass in C), and
    only one that really has a lone surrogate is walked (at most ``_MAX_WALK`` values) to name the field.
    """
    count = [0]

    def counted(obj: dict[str, Any]) -> dict[str, Any]:
        count[0] += 1
        if max_objects is not None and count[0] > max_objects:
            raise _TooManyObjects  # stops the parser: half a million messages are never all built
        return obj

    try:
        text = body.decode("utf-8-sig")
        data = json.loads(text, parse_constant=_no_constants, object_hook=counted)
    except _TooManyObjects:
        raise bad_request(f"the request body has more than {max_objects} JSON objects (messages, content parts and "
                          "options); it cannot be a request this server accepts", code="too_many_messages",
                          param="messages") from None  # fmt: skip
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(text) and not _encodes(data):
        _check_strings(data)
        raise bad_request("the request body contains text that is not valid Unicode (a lone UTF-16 surrogate)",
                          code="invalid_text")  # fmt: skip
    return data


# a \uD800-\uDBFF escape not followed by a \uDC00-\uDFFF one, or the other way round (escaped pairs, which
# JSON encoders write for emoji, do not match)
_HIGH, _LOW = r"\\u[dD][89abAB][0-9a-fA-F]{2}", r"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_SURROGATE_ESCAPE = re.compile(f"{_HIGH}(?!{_LOW})|(?<!{_HIGH}){_LOW}")
# strings and containers looked at to name the field with a lone surrogate; a body with more is refused unnamed
_MAX_WALK = 100_000


def _encodes(data: Any) -> bool:
    """Whether every string in ``data`` is valid Unicode (one pass in C; escaped pairs such as emoji are)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_strings(data: Any) -> None:
    """Every string (and key) must encode as UTF-8: JSON's ``"\\ud800"`` escape yields a lone surrogate that
    would fail deep inside the tokenizer or the response encoder. Iterative: nesting depth cannot recurse."""
    stack: list[tuple[str, Any]] = [("", data)]
    budget = _MAX_WALK
    while stack and budget > 0:
        where, value = stack.pop()
        budget -= 1
        if isinstance(value, str):
            _checked_unicode(value, name=where, param=where)
        elif isinstance(value, dict):
            for key, item in list(value.items())[:budget]:
                _checked_unicode(key, name=f"a key of {where or 'the body'}", param=where or None)
                stack.append((f"{where}.{key}" if where else key, item))
        elif isinstance(value, list):
            items = list(enumerate(value[:budget]))
            stack.extend((f"{where}[{index}]", item) for index, item in reversed(items))  # document order


def _checked_unicode(text: str, *, name: str, param: str | None) -> None:
    try:
        check_text(text, name=name)
    except ValueError as exc:
        raise bad_request(str(exc), param=param, code="invalid_text") from None


def _no_constants(name: str) -> None:
    raise ValueError(name)


def parse_chat_request(
    data: dict[str, Any], *, image_token: str, max_images: int, max_messages: int = 256, max_parts: int = 512
) -> ChatRequest:
    """Check every field we use; unknown fields are ignored (clients send many) unless we cannot honour them."""
    _refuse_unsupported(data)
    _check_shape(data.get("messages"), max_messages=max_messages, max_parts=max_parts)
    messages, images = _messages(data.get("messages"), image_token=image_token)
    if len(images) > max_images:
        raise bad_request(f"too many images: {len(images)} given, at most {max_images} per request",
                          param="messages", code="too_many_images")  # fmt: skip
    n = data.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad_request("n must be 1: this server returns one choice per request", param="n")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", param="model")
    return ChatRequest(
        messages=messages,
        images=images,
        generation=_generation(data),
        max_tokens=_max_tokens(data),
        stream=_optional_bool(data, "stream"),
        include_usage=_include_usage(data),
        model=model,
    )


def _check_shape(value: Any, *, max_messages: int, max_parts: int) -> None:
    """Message and content-part counts, before any message is looked at: rendering and tokenizing grow with
    them (half a million empty messages would otherwise occupy a preparation thread for many seconds)."""
    if not isinstance(value, list):
        return  # _messages names the problem
    if len(value) > max_messages:
        raise bad_request(f"too many messages: {len(value)} given, at most {max_messages} per request",
                          param="messages", code="too_many_messages")  # fmt: skip
    parts = sum(
        len(m["content"]) for m in value if isinstance(m, dict) and isinstance(m.get("content"), list)
    )
    if parts > max_parts:
        raise bad_request(f"too many content parts: {parts} given, at most {max_parts} per request",
                          param="messages", code="too_many_content_parts")  # fmt: skip


def _refuse_unsupported(data: dict[str, Any]) -> None:
    for name in _UNSUPPORTED:
        if data.get(name) not in (None, [], {}):
            raise bad_request(
                f"{name} is not supported by this server", param=name, code="unsupported_parameter"
            )
    if data.get("logprobs") not in (None, False):
        raise bad_request(
            "logprobs is not supported by this server", param="logprobs", code="unsupported_parameter"
        )
    response_format = data.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad_request("only response_format {'type': 'text'} is supported", param="response_format",
                          code="unsupported_parameter")  # fmt: skip
    for name in ("presence_penalty", "frequency_penalty"):
        value = data.get(name)
        if value is not None and (not _is_number(value) or value != 0):
            raise bad_request(f"{name} is not supported (only 0)", param=name, code="unsupported_parameter")


def _messages(value: Any, *, image_token: str) -> tuple[list[dict[str, str]], list[ImageRef]]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty array", param="messages")
    messages: list[dict[str, str]] = []
    images: list[ImageRef] = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}", param=f"{where}.role")
        text = _content(message.get("content"), role=ROLES[role], where=f"{where}.content", images=images,
                        image_token=image_token)  # fmt: skip
        messages.append({"role": ROLES[role], "content": text})
    if messages[-1]["role"] == "assistant":
        raise bad_request(
            "the last message must not be the assistant's (nothing to answer)", param="messages"
        )
    return messages, images


def _content(value: Any, *, role: str, where: str, images: list[ImageRef], image_token: str) -> str:
    if isinstance(value, str):
        return _checked_text(value, where=where, image_token=image_token)
    if not isinstance(value, list):
        raise bad_request(f"{where} must be a string or an array of content parts", param=where)
    pieces: list[str] = []
    previous_was_image = False
    for index, part in enumerate(value):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{at}.text must be a string", param=f"{at}.text")
            # as LLaVA (and normalize_messages): text after an image starts on a new line
            pieces.append(
                ("\n" if previous_was_image else "") + _checked_text(text, where=at, image_token=image_token)
            )
            previous_was_image = False
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"{at}: images are only allowed in user messages", param=at)
            images.append(ImageRef(url=_image_url(part.get("image_url"), at=f"{at}.image_url"), param=at))
            pieces.append(image_token)
            previous_was_image = True
        else:
            raise bad_request(f"{at} must be an object with type 'text' or 'image_url'", param=at)
    text = "".join(pieces)
    # text parts such as "<ima" + "ge>" must not join into a placeholder either
    if text.count(image_token) != sum(piece == image_token for piece in pieces):
        _checked_text(text, where=where, image_token=image_token)
    return text


def _checked_text(text: str, *, where: str, image_token: str) -> str:
    if image_token in text:
        raise bad_request(
            f"{where} contains the text {image_token!r}, which is reserved for images; attach images as "
            "image_url parts instead",
            param=where,
            code="image_placeholder_in_text",
        )
    return text


def _image_url(value: Any, *, at: str) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad_request(f"{at} must be {{'url': '...'}} with a data: or http(s) URL", param=at)
    return url


def _generation(data: dict[str, Any]) -> dict[str, Any]:
    """Sampling settings as GenerationConfig keywords; absent means vlmkit's defaults (greedy)."""
    gen: dict[str, Any] = {}
    temperature = _optional_number(data, "temperature", low=0.0, high=2.0)
    if temperature is not None:
        gen["temperature"] = float(temperature)
    top_p = _optional_number(data, "top_p", low=0.0, high=1.0)
    if top_p is not None:
        if top_p == 0:
            raise bad_request("top_p must be in (0, 1]", param="top_p")
        gen["top_p"] = float(top_p)
    top_k = _optional_int(data, "top_k", low=0)
    if top_k is not None:
        gen["top_k"] = top_k
    penalty = _optional_number(data, "repetition_penalty", low=0.01, high=10.0)
    if penalty is not None:
        gen["repetition_penalty"] = float(penalty)
    seed = _optional_int(data, "seed", low=-(2**63))
    if seed is not None:
        gen["seed"] = seed
    stop = _stop(data.get("stop"))
    if stop:
        gen["stop"] = stop
    _check_generation(gen)
    return gen


def _check_generation(gen: dict[str, Any]) -> None:
    """The library's own validation (the one ``VLM.generate`` and the CLI use): whatever it refuses is a 400
    naming the field here, never a failure inside the sampler (temperature 1e-300 is 0.0 in float32)."""
    try:
        GenerationConfig.from_kwargs(**gen)
    except ValueError as exc:
        message = str(exc)
        param = next((name for name in gen if message.startswith(name)), None)
        raise bad_request(message, param=param) from None


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop must be a non-empty string or an array of at most 4 of them", param="stop")
    return tuple(stops)


def _max_tokens(data: dict[str, Any]) -> int | None:
    # max_completion_tokens is the newer name; when both are sent it wins
    name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    return _optional_int(data, name, low=1)


def _include_usage(data: dict[str, Any]) -> bool:
    options = data.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    return _optional_bool(options, "include_usage", where="stream_options.")


def _optional_bool(data: dict[str, Any], name: str, *, where: str = "") -> bool:
    value = data.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{where}{name} must be a boolean", param=f"{where}{name}")
    return bool(value)


def _optional_int(data: dict[str, Any], name: str, *, low: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not _is_int(value) or value < low or value >= 2**63:
        raise bad_request(f"{name} must be an integer >= {low}", param=name)
    return value


def _optional_number(data: dict[str, Any], name: str, *, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    try:  # a 400-digit integer overflows float(): the same 400 as any other out-of-range number
        number = float(value) if _is_number(value) else math.nan
    except OverflowError:
        number = math.nan
    if not math.isfinite(number) or not low <= number <= high:
        raise bad_request(f"{name} must be a number between {low:g} and {high:g}", param=name)
    return number


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
