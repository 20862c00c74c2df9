"""Conversations + images -> model-ready tensors (tokens with expanded image spans, pixels, label masks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmkit.config import PromptConfig
from vlmkit.processing.image import ImageInput, ImageProcessor, load_image
from vlmkit.processing.prompting import (
    EncodedPrompt,
    Message,
    count_placeholders,
    encode,
    ensure_placeholders,
    pad_batch,
    resolve_template,
)
from vlmkit.processing.tiling import AnyRes, TileLayout
from vlmkit.processing.tokenizer_protocol import Tokenizer


@dataclass
class Sample:
    """One conversation and the images its placeholders refer to, in order."""

    messages: list[Message]
    images: Sequence[ImageInput] = ()


class VLMProcessor:
    """Tokenizer + image processor + prompt settings of one model."""

    def __init__(
        self,
        *,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        prompt: PromptConfig,
        num_image_tokens: int,
        anyres: AnyRes | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompt = prompt
        # tokens per image; with AnyRes tiling the tokens of the base view alone (each image has its own count)
        self.num_image_tokens = num_image_tokens
        self.anyres = anyres
        self.template = resolve_template(prompt.template, tokenizer)
        if tokenizer.convert_tokens_to_ids(prompt.image_token) in (None, tokenizer.unk_token_id):
            raise ValueError(
                f"the tokenizer has no {prompt.image_token!r} token; add it as a special token first"
            )
        pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if pad_token_id is None:  # batches could not be padded (``pad_batch`` fills with this id)
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        self.pad_token_id: int = pad_token_id

    def user_prompt(self, prompt: str, *, num_images: int) -> list[Message]:
        """A single user turn; images without placeholders are prepended (LLaVA style)."""
        text = ensure_placeholders(prompt, num_images=num_images, image_token=self.prompt.image_token)
        return [{"role": "user", "content": text}]

    def check_placeholders(self, messages: list[Message], *, num_images: int) -> None:
        found = sum(count_placeholders(m["content"], image_token=self.prompt.image_token) for m in messages)
        if found != num_images:
            raise ValueError(
                f"placeholder/image mismatch: the conversation has {found} {self.prompt.image_token} "
                f"placeholder{'s' if found != 1 else ''} but {num_images} image{'s' if num_images != 1 else ''} "
                "were given"
            )

    def image_layouts(self, images: Sequence[ImageInput]) -> list[TileLayout] | None:
        """AnyRes: each image's tiling (from its upright size; the images of one prompt); otherwise None."""
        if self.anyres is None:
            return None
        tiled = self.anyres.tiles_for(num_images=len(images))
        sizes = [_upright_size(image) for image in images]
        return [self.anyres.layout(height=h, width=w, tiled=tiled) for h, w in sizes]

    def token_counts(self, layouts: Sequence[TileLayout] | None) -> int | list[int]:
        """Image tokens per placeholder: one count for all, or one per image (AnyRes layouts)."""
        if layouts is None:
            return self.num_image_tokens
        assert self.anyres is not None  # layouts come from AnyRes
        return [self.anyres.num_tokens(layout) for layout in layouts]

    def encode_sample(
        self,
        sample: Sample,
        *,
        add_generation_prompt: bool,
        with_labels: bool,
        layouts: Sequence[TileLayout] | None = None,
    ) -> EncodedPrompt:
        """Tokens (+ labels) of one sample; AnyRes ``layouts`` are computed from the images when not given."""
        self.check_placeholders(sample.messages, num_images=len(sample.images))
        if layouts is None:
            layouts = self.image_layouts(sample.images)
        return encode(
            sample.messages,
            tokenizer=self.tokenizer,
            template=self.template,
            image_token=self.prompt.image_token,
            num_image_tokens=self.token_counts(layouts),
            system=self.prompt.system,
            add_generation_prompt=add_generation_prompt,
            with_labels=with_labels,
        )

    def __call__(
        self,
        samples: Sequence[Sample],
        *,
        padding_side: str = "left",
        add_generation_prompt: bool = True,
        with_labels: bool = False,
    ) -> dict[str, Any]:
        """-> input_ids [batch, seq], attention_mask [batch, seq], pixel_values [images, 3, S, S], labels [batch, seq].

        AnyRes: pixel_values [all tiles, 3, S, S] (per image its base view, then its tiles), ``image_sizes``
        [images, 2] (height, width) and ``image_layouts`` (one per image, for ``VisionLanguageModel.forward``).
        """
        if self.anyres is not None:
            return self._call_anyres(samples, padding_side=padding_side,
                                     add_generation_prompt=add_generation_prompt, with_labels=with_labels)  # fmt: skip
        rows = [
            self.encode_sample(s, add_generation_prompt=add_generation_prompt, with_labels=with_labels)
            for s in samples
        ]
        batch = pad_batch(rows, pad_token_id=self.pad_token_id, side=padding_side)
        images = [image for s in samples for image in s.images]
        batch["pixel_values"] = self.image_processor(images)
        return batch

    def _call_anyres(
        self, samples: Sequence[Sample], *, padding_side: str, add_generation_prompt: bool, with_labels: bool
    ) -> dict[str, Any]:
        anyres = self.anyres
        assert anyres is not None  # called for an AnyRes processor only
        rows, pixels, layouts = [], [], []
        for sample in samples:
            images = [load_image(image) for image in sample.images]
            sample_layouts = self.image_layouts(images)
            rows.append(self.encode_sample(Sample(messages=sample.messages, images=images),
                                           add_generation_prompt=add_generation_prompt, with_labels=with_labels,
                                           layouts=sample_layouts))  # fmt: skip
            for image, layout in zip(images, sample_layouts or [], strict=True):
                pixels.append(anyres.preprocess(image, tiled=layout.grid != (0, 0)))
            layouts += sample_layouts or []
        batch: dict[str, Any] = pad_batch(rows, pad_token_id=self.pad_token_id, side=padding_side)
        size = self.image_processor.image_size
        batch["pixel_values"] = torch.cat(pixels) if pixels else torch.empty((0, 3, size, size))
        batch["image_sizes"] = torch.tensor([[lay.height, lay.width] for lay in layouts], dtype=torch.long)
        batch["image_layouts"] = layouts
        return batch


def _upright_size(image: ImageInput) -> tuple[int, int]:
    """(height, width) of the image as preprocessing sees it (EXIF-rotated RGB)."""
    rgb = load_image(image)
    return rgb.height, rgb.width
