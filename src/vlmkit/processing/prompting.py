"""Conversations -> prompt text -> token ids (+ training labels) for LLaVA-style models.

Pipeline: ``normalize_messages`` (OpenAI-style parts -> plain messages + images) -> ``render`` (a built-in
template or the tokenizer's own chat template, recording the character spans of assistant replies) ->
``expand_image_tokens`` (each ``<image>`` placeholder -> N image tokens) -> one tokenizer call, whose offset
mapping turns the assistant spans into labels -> ``pad_batch``.

Labels follow LLaVA: only assistant replies and their end-of-turn marker are learned; system, user, template
and image tokens are ``IGNORE_INDEX``.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch

from vlmkit.processing.control_tokens import encode_as_text, mark_control_text, unmark_control_text
from vlmkit.processing.text import check_text
from vlmkit.processing.tokenizer_protocol import Tokenizer

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
# OpenAI's newer API calls the system prompt "developer"
_ROLE_ALIASES = {"developer": "system"}

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
# PIL.Image.Image | bytes | str | os.PathLike: exactly what the caller gave (data: URLs decoded to bytes)
ImagePart: TypeAlias = Any


@dataclass(frozen=True)
class ChatTemplate:
    """A built-in conversation format; ``{eos}`` in a field is replaced by the tokenizer's eos text."""

    system_format: str  # "" = the format has no system prompt
    default_system: str | None
    user_format: str
    assistant_prefix: str  # before a completed reply (not learned)
    assistant_end: str  # after a reply; learned, so the model knows when to stop
    turn_sep: str  # after assistant_end; not learned
    generation_prompt: str


LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Vicuna v1 (LLaVA conversation.py SeparatorStyle.TWO, sep=" ", sep2=eos): "{system} USER: {u} ASSISTANT: {a}</s>"
_TWO_STYLE = dict(
    system_format="{system} ",
    user_format="USER: {content} ",
    assistant_prefix="ASSISTANT: ",
    assistant_end="{eos}",
    turn_sep="",
    generation_prompt="ASSISTANT:",
)

BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    # LLaVA-1.5 conv_llava_v1 (the "human" wording LLaVA's CLI / model worker use for llava-v1.5 checkpoints)
    "llava-v1": ChatTemplate(default_system=LLAVA_SYSTEM, **_TWO_STYLE),
    # conv_vicuna_v1 (LLaVA-1.5 training's --version v1): same format, "user" wording
    "vicuna-v1": ChatTemplate(default_system=VICUNA_SYSTEM, **_TWO_STYLE),
    "chatml": ChatTemplate(
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        default_system=None,
        user_format="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_end="<|im_end|>",
        turn_sep="\n",
        generation_prompt="<|im_start|>assistant\n",
    ),
    # LLaVA pre-training (conv_llava_plain / preprocess_plain): "{user}{assistant}\n", no system, no roles
    "plain": ChatTemplate(
        system_format="",
        default_system=None,
        user_format="{content}",
        assistant_prefix="",
        assistant_end="\n",
        turn_sep="",
        generation_prompt="",
    ),
}
TOKENIZER_TEMPLATE = "tokenizer"


@dataclass
class RenderedPrompt:
    text: str
    # [start, end) character spans of assistant replies, including their end-of-turn marker
    assistant_spans: list[tuple[int, int]]


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    labels: list[int] | None
    num_images: int


def resolve_template(name: str, tokenizer: Tokenizer) -> str:
    """Map ``name`` ("auto", "tokenizer" or a built-in) to a concrete template name."""
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if name == "auto":
        return TOKENIZER_TEMPLATE if has_own else "llava-v1"
    if name == TOKENIZER_TEMPLATE:
        if not has_own:
            raise ValueError("template 'tokenizer' requested but the tokenizer has no chat_template")
        return name
    if name not in BUILTIN_TEMPLATES:
        known = ", ".join(["auto", TOKENIZER_TEMPLATE, *BUILTIN_TEMPLATES])
        raise ValueError(f"unknown prompt template {name!r} (known: {known})")
    return name


def render(
    messages: list[Message],
    *,
    tokenizer: Tokenizer,
    template: str,
    system: str | None = None,
    add_generation_prompt: bool,
    locate_replies: bool = True,
) -> RenderedPrompt:
    """Render ``messages`` to prompt text and locate the assistant replies in it (``locate_replies=False``: no
    spans, which saves a tokenizer template two extra renders per reply when no labels are wanted)."""
    name = resolve_template(template, tokenizer)
    _check_messages(messages)
    if name == TOKENIZER_TEMPLATE:
        return _render_tokenizer(
            messages, tokenizer=tokenizer, system=system, gen=add_generation_prompt, locate=locate_replies
        )
    return _render_builtin(
        messages, BUILTIN_TEMPLATES[name], tokenizer=tokenizer, system=system, gen=add_generation_prompt
    )


def _check_messages(messages: list[Message]) -> None:
    """Plain messages only; run ``normalize_messages`` first on OpenAI-style input."""
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"message {index}: expected a dict with role in {ROLES}, got {message!r:.80}")
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"message {index}: field 'content' must be a string (use normalize_messages for parts)"
            )
        check_text(message["content"], name=f"message {index}: field 'content'")


def _render_builtin(
    messages: list[Message], tpl: ChatTemplate, *, tokenizer: Tokenizer, system: str | None, gen: bool
) -> RenderedPrompt:
    eos = getattr(tokenizer, "eos_token", None) or "</s>"
    if any(m["role"] == "system" for m in messages[1:]):
        raise ValueError("a system message is only allowed as the first message")
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    system = tpl.default_system if system is None else system
    text = tpl.system_format.format(system=system) if tpl.system_format and system else ""
    spans: list[tuple[int, int]] = []
    for message in messages:
        if message["role"] == "user":
            text += tpl.user_format.format(content=message["content"])
            continue
        text += tpl.assistant_prefix
        start = len(text)
        text += message["content"] + tpl.assistant_end.format(eos=eos)
        spans.append((start, len(text)))
        text += tpl.turn_sep
    if gen:
        text += tpl.generation_prompt
    return RenderedPrompt(text=text, assistant_spans=spans)


def _render_tokenizer(
    messages: list[Message], *, tokenizer: Tokenizer, system: str | None, gen: bool, locate: bool = True
) -> RenderedPrompt:
    messages = [dict(m) for m in messages]
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})

    def apply(msgs: list[Message], generation: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)

    text = apply(messages, gen)
    spans: list[tuple[int, int]] = []
    if not locate:
        return RenderedPrompt(text=text, assistant_spans=spans)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # the reply is what rendering this turn adds after the previous turns' generation prompt
        before, after = apply(messages[:i], True), apply(messages[: i + 1], False)
        if not (after.startswith(before) and text.startswith(after)):
            raise ValueError(
                "the tokenizer's chat template is not prefix-stable (rendering a conversation prefix does not "
                "give a prefix of the full rendering), so assistant replies cannot be located for labels; "
                f"use a built-in template instead ({', '.join(BUILTIN_TEMPLATES)})"
            )
        # trailing newlines after the end-of-turn marker are formatting, not something the model must emit
        spans.append((len(before), len(after.rstrip())))
    return RenderedPrompt(text=text, assistant_spans=spans)


def count_placeholders(text: str, *, image_token: str) -> int:
    return text.count(image_token)


def ensure_placeholders(prompt: str, *, num_images: int, image_token: str) -> str:
    """Prepend one ``image_token + "\\n"`` per image when the prompt has none; otherwise the counts must match."""
    found = count_placeholders(prompt, image_token=image_token)
    if found == 0 and num_images > 0:
        return f"{image_token}\n" * num_images + prompt
    if found != num_images:
        placeholders = f"{found} {image_token} placeholder{'' if found == 1 else 's'}"
        images = f"{num_images} image{' was' if num_images == 1 else 's were'}"
        raise ValueError(f"prompt has {placeholders} but {images} given")
    return prompt


def expand_image_tokens(text: str, *, image_token: str, num_tokens: int) -> str:
    """Each placeholder -> ``num_tokens`` image tokens, one per projected visual feature."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    return text.replace(image_token, image_token * num_tokens)


def encode(
    messages: list[Message],
    *,
    tokenizer: Tokenizer,
    template: str,
    image_token: str,
    num_image_tokens: int | Sequence[int],
    system: str | None = None,
    add_generation_prompt: bool,
    with_labels: bool = False,
) -> EncodedPrompt:
    """Render, expand image placeholders and tokenize in one call; labels mark only assistant replies.

    ``num_image_tokens`` is one count for every image, or one count per image in order (AnyRes).
    """
    image_id = _image_token_id(tokenizer, image_token)
    messages = mark_control_text(messages, tokenizer=tokenizer, image_token=image_token)
    rendered = render(
        messages,
        tokenizer=tokenizer,
        template=template,
        system=system,
        add_generation_prompt=add_generation_prompt,
        locate_replies=with_labels,
    )
    num_images = count_placeholders(rendered.text, image_token=image_token)
    counts = [num_image_tokens] * num_images if isinstance(num_image_tokens, int) else list(num_image_tokens)
    if len(counts) != num_images:
        raise ValueError(f"{num_images} {image_token} placeholders but {len(counts)} image token counts")
    text, spans = _expand_with_spans(rendered, image_token=image_token, counts=counts)
    bos = getattr(tokenizer, "bos_token", None)
    # like transformers: a template that writes the BOS itself must not get a second one
    add_special = not (bos and text.startswith(bos))
    text, spans, typed = unmark_control_text(text, spans)
    if with_labels and not getattr(tokenizer, "is_fast", False):
        raise ValueError("labels need a fast tokenizer (offset mapping); load it with use_fast=True")
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=with_labels or bool(typed))
    ids, offsets = list(enc["input_ids"]), enc.get("offset_mapping")
    if typed:  # control tokens the user typed stay text, never the template's turn markers
        ids, offsets = encode_as_text(tokenizer, ids=ids, offsets=offsets, typed=typed, text=text)
    if ids.count(image_id) != sum(counts):
        raise ValueError(
            f"expected {sum(counts)} image tokens ({num_images} images) after tokenization but found "
            f"{ids.count(image_id)}; {image_token!r} must tokenize as a single token"
        )
    labels = _labels(ids, offsets, spans, image_id=image_id) if with_labels else None
    return EncodedPrompt(input_ids=ids, labels=labels, num_images=num_images)


def _image_token_id(tokenizer: Tokenizer, image_token: str) -> int:
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if added.content == image_token and added.special:
            return token_id
    raise ValueError(
        f"image token {image_token!r} is not a special token of the tokenizer; add it first with "
        f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}}) "
        "and resize the language model's embeddings"
    )


def _expand_with_spans(
    rendered: RenderedPrompt, *, image_token: str, counts: Sequence[int]
) -> tuple[str, list[tuple[int, int]]]:
    """Placeholder k -> ``counts[k]`` image tokens; the assistant spans shift by the characters inserted before them."""
    if any(n < 1 for n in counts):
        raise ValueError(f"image token counts must be >= 1, got {list(counts)}")
    text = rendered.text
    pieces = text.split(image_token)
    tails = zip(counts, pieces[1:], strict=True)
    expanded = pieces[0] + "".join(image_token * n + piece for n, piece in tails)
    grown = [len(image_token) * (n - 1) for n in counts]

    def shift(pos: int) -> int:
        return pos + sum(grown[: text.count(image_token, 0, pos)])

    return expanded, [(shift(s), shift(e)) for s, e in rendered.assistant_spans]


def _labels(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], *, image_id: int
) -> list[int]:
    """Label a token when its characters overlap an assistant span (a leading space may merge into it)."""
    labels = []
    for token_id, (start, end) in zip(ids, offsets, strict=True):
        inside = end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
        labels.append(token_id if inside and token_id != image_id else IGNORE_INDEX)
    return labels


def pad_batch(rows: list[EncodedPrompt], *, pad_token_id: int, side: str) -> dict[str, torch.Tensor]:
    """Pad to the longest row: ``side="left"`` for generation, ``"right"`` for training."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not rows:
        raise ValueError("pad_batch needs at least one row")
    with_labels = [row.labels is not None for row in rows]
    if any(with_labels) and not all(with_labels):
        raise ValueError("either every row or no row must have labels")
    width = max(len(row.input_ids) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
    }
    if all(with_labels):
        batch["labels"] = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        batch["input_ids"][i, cols] = torch.tensor(row.input_ids, dtype=torch.long)
        batch["attention_mask"][i, cols] = 1
        if "labels" in batch:
            batch["labels"][i, cols] = torch.tensor(row.labels, dtype=torch.long)
    return batch


def normalize_messages(messages: list[dict], *, image_token: str) -> tuple[list[Message], list[ImagePart]]:
    """OpenAI-style chat messages -> plain ``{"role", "content": str}`` messages and their images, in order."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list, got {type(messages).__name__}")
    plain: list[Message] = []
    images: list[ImagePart] = []
    for index, message in enumerate(messages):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: must be an object, got {type(message).__name__}")
        role = _field(message, "role", where=where)
        if not isinstance(role, str) or _ROLE_ALIASES.get(role, role) not in ROLES:
            raise ValueError(
                f"{where}: field 'role' must be one of {', '.join(ROLES)} or developer, got {role!r}"
            )
        role = _ROLE_ALIASES.get(role, role)
        content = _field(message, "content", where=where)
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = _join_parts(content, images, image_token=image_token, where=where, role=role)
        else:
            raise ValueError(
                f"{where}: field 'content' must be a string or a list of parts, got {type(content).__name__}"
            )
        plain.append({"role": role, "content": text})
    return plain, images


def _field(obj: dict, key: str, *, where: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r}")
    return obj[key]


def _join_parts(parts: list, images: list[ImagePart], *, image_token: str, where: str, role: str) -> str:
    """Join content parts; an image becomes ``image_token``, followed by "\\n" when text comes next (as LLaVA)."""
    pieces: list[str] = []
    previous_was_image = False
    for j, part in enumerate(parts):
        at = f"{where}, content[{j}]"
        kind = _part_type(part, at=at)
        if kind == "text":
            text = _field(part, "text", where=at)
            if not isinstance(text, str):
                raise ValueError(f"{at}: field 'text' must be a string, got {type(text).__name__}")
            pieces.append(("\n" if previous_was_image else "") + text)
            previous_was_image = False
            continue
        if role != "user":
            raise ValueError(f"{at}: image parts are only allowed in user messages, not {role!r}")
        images.append(_image_from_url(part, at=at) if kind == "image_url" else _image_object(part, at=at))
        pieces.append(image_token)
        previous_was_image = True
    return "".join(pieces)


def _part_type(part: Any, *, at: str) -> str:
    if not isinstance(part, dict):
        raise ValueError(f"{at}: must be an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind is None and "image_url" in part:
        kind = "image_url"  # {"image_url": "data:..."} shorthand
    if kind not in ("text", "image_url", "image"):
        raise ValueError(f"{at}: field 'type' must be 'text', 'image_url' or 'image', got {kind!r}")
    return kind


def _image_from_url(part: dict, *, at: str) -> bytes:
    value = _field(part, "image_url", where=at)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise ValueError(f"{at}: field 'image_url' must be a URL string or {{'url': ...}}")
    if url.startswith(("http://", "https://", "file://")):
        raise ValueError(f"{at}: remote image URLs are not fetched here; send the image as a data: URL")
    if not url.startswith("data:"):
        raise ValueError(f"{at}: field 'image_url' must be a data: URL, got {url[:40]!r}")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError(f"{at}: field 'image_url' must be a base64 data: URL ('data:image/png;base64,...')")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{at}: field 'image_url' has invalid base64 data ({exc})") from None


def _image_object(part: dict, *, at: str) -> ImagePart:
    image = _field(part, "image", where=at)
    if isinstance(image, bytes | bytearray | str | os.PathLike) or _is_pil(image):
        return image
    raise ValueError(f"{at}: field 'image' must be a PIL image, bytes or a path, got {type(image).__name__}")


def _is_pil(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pillow is a dependency, but keep prompting importable without it
        return False
    return isinstance(obj, Image.Image)
