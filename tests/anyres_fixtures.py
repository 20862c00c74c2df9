"""Tiny llava-hf LLaVA-NeXT / LLaVA-OneVision checkpoints (and transformers' own processors) for AnyRes tests.

Random weights at a scale where logits are O(1); 32 px tiles of 8 px patches (16 tokens per tile), so token
counts stay small while every part of the tiling (grids, unpad, newline, OneVision's cap) is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, processors

import tiny

TILE, PATCH = 32, 8
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
ONEVISION_PINPOINTS = [[32 * r, 32 * c] for r in range(1, 4) for c in range(1, 4)]
# llava-hf's llava-1.5 / NeXT style processor template: images of a turn first, then its text
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llama_like_tokenizer():
    """tiny's byte-level BPE with a Llama-style BOS and ``<image>`` as llava-hf adds it."""
    tokenizer = tiny.build_tokenizer(chat_template=False)
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return tokenizer


def _scale_weights(model) -> None:
    torch.manual_seed(0)
    with torch.no_grad():  # large enough weights that logits are O(1) and images change them
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)


def save_llava_next(directory: Path, *, pinpoints=NEXT_PINPOINTS) -> Path:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = llama_like_tokenizer()
    config = LlavaNextConfig(
        vision_config=tiny.vision_config("clip", image_size=TILE, patch_size=PATCH),
        text_config=tiny.language_config("llama"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config)
    _scale_weights(model)
    model.save_pretrained(directory)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=TEMPLATE)  # fmt: skip
    processor.save_pretrained(directory)
    return directory


def onevision_processor(*, tokenizer, image_processor, num_image_tokens: int, aspect: str):
    """transformers' LlavaOnevisionProcessor without a video processor (which needs torchvision)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return original(self, argument_name, argument)

    ProcessorMixin.check_argument_for_proper_class = lenient
    try:
        return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                       num_image_tokens=num_image_tokens, vision_feature_select_strategy="full",
                                       vision_aspect_ratio=aspect, chat_template=TEMPLATE)  # fmt: skip
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def save_llava_onevision(directory: Path, *, aspect: str = "anyres_max_2"):
    """A SigLIP (no CLS, "full") + Qwen2 OneVision checkpoint; returns (directory, transformers' processor)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
    )

    tokenizer = llama_like_tokenizer()
    config = LlavaOnevisionConfig(
        vision_config=tiny.vision_config("siglip", image_size=TILE, patch_size=PATCH),
        text_config=tiny.language_config("qwen2"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=aspect,
    )
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config)
    _scale_weights(model)
    model.save_pretrained(directory)
    image_processor = LlavaOnevisionImageProcessor(size={"height": TILE, "width": TILE}, image_mean=[0.5] * 3,
                                                   image_std=[0.5] * 3, image_grid_pinpoints=ONEVISION_PINPOINTS)  # fmt: skip
    image_processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tokens = (TILE // PATCH) ** 2
    settings = {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": tokens,
                "vision_feature_select_strategy": "full", "vision_aspect_ratio": aspect,
                "image_token": "<image>", "video_token": "<video>"}  # fmt: skip
    (directory / "processor_config.json").write_text(json.dumps(settings))
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    processor = onevision_processor(tokenizer=tokenizer, image_processor=image_processor, num_image_tokens=tokens,
                                    aspect=aspect)  # fmt: skip
    return directory, processor
