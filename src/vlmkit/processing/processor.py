"""Conversations + images -> model-ready tensors (tokens with expanded image spans, pixels, label masks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmkit.config import PromptConfig
from vlmkit.processing.image import ImageInput, ImageProcessor
from vlmkit.processing.prompting import (
    EncodedPrompt,
    Message,
    count_placeholders,
    encode,
    ensure_placeholders,
    pad_batch,
    resolve_template,
)


@dataclass
class Sample:
    """One conversation and the images its placeholders refer to, in order."""

    messages: list[Message]
    images: Sequence[ImageInput] = ()


class VLMProcessor:
    """Tokenizer + image processor + prompt settings of one model."""

    def __init__(
        self, *, tokenizer: Any, image_processor: ImageProcessor, prompt: PromptConfig, num_image_tokens: int
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompt = prompt
        self.num_image_tokens = num_image_tokens
        self.template = resolve_template(prompt.template, tokenizer)
        if tokenizer.convert_tokens_to_ids(prompt.image_token) in (None, tokenizer.unk_token_id):
            raise ValueError(
                f"the tokenizer has no {prompt.image_token!r} token; add it as a special token first"
            )
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

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

    def encode_sample(
        self, sample: Sample, *, add_generation_prompt: bool, with_labels: bool
    ) -> EncodedPrompt:
        self.check_placeholders(sample.messages, num_images=len(sample.images))
        return encode(
            sample.messages,
            tokenizer=self.tokenizer,
            template=self.template,
            image_token=self.prompt.image_token,
            num_image_tokens=self.num_image_tokens,
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
    ) -> dict[str, torch.Tensor]:
        """-> input_ids [batch, seq], attention_mask [batch, seq], pixel_values [images, 3, S, S], labels [batch, seq]."""
        rows = [
            self.encode_sample(s, add_generation_prompt=add_generation_prompt, with_labels=with_labels)
            for s in samples
        ]
        batch = pad_batch(rows, pad_token_id=self.pad_token_id, side=padding_side)
        images = [image for s in samples for image in s.images]
        batch["pixel_values"] = self.image_processor(images)
        return batch
