"""Export an AnyRes vlmkit model as a llava-hf LLaVA-NeXT or LLaVA-OneVision directory.

As for ``hf-llava`` (``export.py``), transformers' own model class is assembled from vlmkit's modules (tower,
projector layers, ``image_newline``, LM base + head) and saved with ``save_pretrained``; the processor files
describe the same tiling, so ``LlavaNextForConditionalGeneration`` / ``LlavaOnevisionForConditionalGeneration``
(and ``AutoProcessor`` for LLaVA-NeXT) load the directory unchanged. What a format cannot express is refused up
front with every reason.
"""

from __future__ import annotations

import copy
import json
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmkit.models.convert.export import (
    _lm_with_image_token,
    feature_select_strategy,
    llava_chat_template,
    unrepresentable_reasons,
    write_export,
)
from vlmkit.models.convert.llava_hf import BICUBIC
from vlmkit.models.language.protocols import LanguageModel
from vlmkit.processing.tokenizer_protocol import Tokenizer

ANYRES_FORMATS = {"hf-llava-next": "llava_next", "hf-llava-onevision": "llava_onevision"}
_CLASSES = {"llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
            "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration")}  # fmt: skip


def anyres_reasons(model: Any, *, family: str) -> list[str]:
    """Every way ``model`` differs from what the llava-hf ``family`` can express; empty if none."""
    reasons = [r for r in unrepresentable_reasons(model) if not r.startswith("AnyRes tiling")]
    tiling = model.config.vision.tiling
    if tiling is None:
        return [*reasons, "no AnyRes tiling (a fixed-resolution model exports as hf-llava)"]
    if not tiling.unpad:
        reasons.append("tiling without unpad (llava-hf always cuts the padding off)")
    if not tiling.image_newline:
        reasons.append("tiling without image_newline (llava-hf always ends rows with it)")
    if family == "llava_next":
        if tiling.max_tile_tokens is not None:
            reasons.append(
                f"a token cap max_tile_tokens={tiling.max_tile_tokens} (that is hf-llava-onevision)"
            )
        if tiling.multi_image_base_only:
            reasons.append("multi-image prompts with base views only (that is hf-llava-onevision)")
    else:
        if tiling.max_tile_tokens is None:
            reasons.append("no token cap (hf-llava-onevision always has one: set tiling.max_tile_tokens)")
        if not tiling.multi_image_base_only:
            reasons.append("tiled images in multi-image prompts (OneVision gives them the base view only)")
    return reasons


def export_hf_anyres(vlm: Any, *, out: str | Path, format: str) -> Path:
    """Write ``vlm`` as a llava-hf ``format`` ("hf-llava-next" or "hf-llava-onevision") directory."""
    family = ANYRES_FORMATS[format]
    model, tokenizer = vlm.model, vlm.tokenizer
    reasons = anyres_reasons(model, family=family)
    if reasons:
        raise ValueError(f"cannot export to {format}: " + "; ".join(reasons))

    def write(staging: Path) -> None:
        assemble(model, tokenizer=tokenizer, family=family).save_pretrained(staging)
        write_processor(model, tokenizer=tokenizer, family=family, directory=staging)

    return write_export(out, write=write)


def assemble(model: Any, *, tokenizer: Tokenizer, family: str) -> Any:
    """transformers' NeXT / OneVision model whose modules are ``model``'s own (shared, not copied)."""
    import transformers

    lm = _lm_with_image_token(model, tokenizer=tokenizer)
    config = hf_config(model, lm=lm, family=family)
    with torch.device("meta"):  # only the shell: every module with weights is replaced below
        hf = getattr(transformers, _CLASSES[family][1])(config)
    hf.model.vision_tower = model.vision.model
    hf.model.multi_modal_projector.linear_1 = model.projector.linear_1
    hf.model.multi_modal_projector.linear_2 = model.projector.linear_2
    hf.model.image_newline = nn.Parameter(model.tiling.image_newline.detach())
    hf.model.language_model = getattr(lm, lm.base_model_prefix)
    hf.lm_head = lm.get_output_embeddings()
    hf.generation_config = copy.deepcopy(lm.generation_config)
    leftover = [n for n, t in chain(hf.named_parameters(), hf.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"{family} export left tensors unset: {', '.join(leftover[:3])}")
    return hf


def hf_config(model: Any, *, lm: LanguageModel, family: str) -> Any:
    import transformers

    tiling = model.config.vision.tiling
    head = lm.get_output_embeddings()  # a linear head (export_reasons checked)
    tied = head is not None and head.weight is lm.get_input_embeddings().weight
    extra = (
        {"vision_aspect_ratio": f"anyres_max_{tiling.max_tile_tokens}"} if family == "llava_onevision" else {}
    )
    return getattr(transformers, _CLASSES[family][0])(
        vision_config=model.vision.model.config.to_dict(),
        text_config=lm.config.to_dict() | {"tie_word_embeddings": tied},
        image_token_index=model.config.prompt.image_token_id,
        image_grid_pinpoints=[list(p) for p in model.anyres.pinpoints],
        projector_hidden_act="gelu",
        vision_feature_layer=model.config.vision.feature_layer,
        vision_feature_select_strategy=feature_select_strategy(model),
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
        **extra,
    )


# -------------------------------------------------------------------------------------------- processor


def image_processor_settings(model: Any, *, family: str) -> dict[str, Any]:
    vision, side = model.config.vision, model.config.vision.image_size
    settings: dict[str, Any] = {
        "image_mean": list(vision.image_mean), "image_std": list(vision.image_std), "resample": BICUBIC,
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "do_pad": True, "image_grid_pinpoints": [list(p) for p in model.anyres.pinpoints],
    }  # fmt: skip
    if family == "llava_next":
        return settings | {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side},
                           "do_center_crop": True}  # fmt: skip
    return settings | {"size": {"height": side, "width": side}, "do_center_crop": False}


def write_processor(model: Any, *, tokenizer: Tokenizer, family: str, directory: Path) -> None:
    """The processor files: image processor, tokenizer (with the chat template), processor settings."""
    import transformers

    name = "LlavaNextImageProcessor" if family == "llava_next" else "LlavaOnevisionImageProcessor"
    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    image_processor = cls(**image_processor_settings(model, family=family))
    prompt = model.config.prompt
    template = llava_chat_template(prompt=prompt, tokenizer=tokenizer)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template  # AutoTokenizer users get the same conversation format
    strategy = feature_select_strategy(model)
    if family == "llava_next":
        processor = transformers.LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=model.vision.patch_size,
            vision_feature_select_strategy=strategy, chat_template=template, image_token=prompt.image_token,
            num_additional_image_tokens=model.vision.num_prefix,
        )  # fmt: skip
        processor.save_pretrained(directory)
        image_processor.save_pretrained(directory)  # the separate file every transformers version reads
        return
    # LlavaOnevisionProcessor cannot be built without a video processor (torchvision): write its files directly
    image_processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    side = model.anyres.side
    settings = {"processor_class": "LlavaOnevisionProcessor",
                "num_image_tokens": side**2 + (1 if strategy == "default" else 0),
                "vision_feature_select_strategy": strategy,
                "vision_aspect_ratio": f"anyres_max_{model.config.vision.tiling.max_tile_tokens}",
                "image_token": prompt.image_token, "video_token": "<video>"}  # fmt: skip
    (directory / "processor_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    (directory / "chat_template.jinja").write_text(template)
