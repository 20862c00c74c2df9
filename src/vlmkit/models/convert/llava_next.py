"""llava-hf LLaVA-NeXT and LLaVA-OneVision checkpoints -> vlmkit models with AnyRes tiling.

As for plain llava-hf (``llava_hf.py``), transformers loads the checkpoint and its parts move into a
``VisionLanguageModel``: the tower, the projector, ``image_newline`` and the language model. The tiling settings
come from config.json (``image_grid_pinpoints``, OneVision's ``vision_aspect_ratio``) and the processor files, and
are refused with every reason when vlmkit's ``TilingConfig`` cannot reproduce them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import TilingConfig, VisionConfig
from vlmkit.models.convert.llava_hf import (
    STRATEGY_TO_SELECT,
    _load_transformers_llava,
    llava_model,
    llava_vision,
    processor_settings,
    unsupported_preprocessing,
    unsupported_reasons,
)
from vlmkit.models.io import ModelDirError
from vlmkit.models.parts import hf_config_dict
from vlmkit.models.vision import VisionEncoder

MODEL_CLASSES = {
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
IMAGE_PROCESSORS = {
    "llava_next": "LlavaNextImageProcessor",
    "llava_onevision": "LlavaOnevisionImageProcessor",
}
ANYRES_MAX = re.compile(r"anyres_max_(\d+)")


def anyres_unsupported_reasons(raw: dict[str, Any]) -> list[str]:
    """What in a llava_next / llava_onevision config.json vlmkit cannot represent."""
    reasons = unsupported_reasons(raw)
    pinpoints = raw.get("image_grid_pinpoints")
    if not (isinstance(pinpoints, list) and pinpoints and all(_is_pair(p) for p in pinpoints)):
        reasons.append(f"image_grid_pinpoints={pinpoints!r} (expected [[height, width], ...])")
    if raw.get("model_type") == "llava_onevision":
        aspect = raw.get("vision_aspect_ratio", "anyres_max_9")
        if not (isinstance(aspect, str) and ANYRES_MAX.fullmatch(aspect)):
            reasons.append(f"vision_aspect_ratio={aspect!r} (vlmkit reads 'anyres_max_N')")
    return reasons


def _is_pair(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and v > 0 for v in value)
    )


def load_llava_anyres(directory: Path, *, raw: dict[str, Any], dtype: torch.dtype | None) -> tuple[Any, Any]:
    """A llava_next / llava_onevision directory -> (VisionLanguageModel, tokenizer), computing what transformers
    computes."""
    model_type = raw["model_type"]
    reasons = anyres_unsupported_reasons(raw)
    if reasons:
        raise ModelDirError(
            f"{directory}: this {model_type} checkpoint is not supported: {'; '.join(reasons)}"
        )
    hf = _load_transformers_llava(directory, dtype=dtype, class_name=MODEL_CLASSES[model_type])
    processor = processor_settings(directory)
    vision_cfg = _vision_config(hf, processor=processor, directory=directory)
    vision = llava_vision(hf.model.vision_tower, config=vision_cfg, directory=directory)
    _check_processor_counts(processor, vision=vision, strategy=hf.config.vision_feature_select_strategy,
                            directory=directory)  # fmt: skip
    model, tokenizer = llava_model(hf, vision=vision, processor=processor, directory=directory)
    with torch.no_grad():
        model.tiling.image_newline.copy_(hf.model.image_newline)  # type: ignore[union-attr]
    return model.to(model.language_model.dtype), tokenizer


def _vision_config(hf: Any, *, processor: dict[str, Any], directory: Path) -> VisionConfig:
    config = hf.config
    pre = processor["image_processor"]
    tile = tile_size(pre, kind=IMAGE_PROCESSORS[config.model_type], directory=directory)
    if tile != config.vision_config.image_size:
        raise ModelDirError(
            f"{directory}: the image processor makes {tile}px tiles but the tower's image_size is "
            f"{config.vision_config.image_size}"
        )
    pinpoints = [list(p) for p in config.image_grid_pinpoints]
    if [list(p) for p in pre.get("image_grid_pinpoints", pinpoints)] != pinpoints:
        raise ModelDirError(
            f"{directory}: the image processor's image_grid_pinpoints differ from config.json's"
        )
    onevision = config.model_type == "llava_onevision"
    cap = int(ANYRES_MAX.fullmatch(config.vision_aspect_ratio).group(1)) if onevision else None  # type: ignore[union-attr]
    tiling = TilingConfig(grid_pinpoints=tuple(tuple(p) for p in pinpoints), unpad=True, image_newline=True,
                          max_tile_tokens=cap, multi_image_base_only=onevision)  # fmt: skip
    try:
        return VisionConfig(
            hf_config=hf_config_dict(hf.model.vision_tower.config),
            feature_layer=config.vision_feature_layer,
            select=STRATEGY_TO_SELECT[config.vision_feature_select_strategy],
            image_size=tile,
            resize_mode="pad" if onevision else "resize",  # the un-tiled view of each family
            image_mean=tuple(pre["image_mean"]),
            image_std=tuple(pre["image_std"]),
            source=str(directory),
            tiling=tiling,
        )
    except ValueError as exc:  # ConfigError: e.g. pinpoints that are not multiples of the tile size
        raise ModelDirError(f"{directory}: {exc}") from None


def tile_size(pre: dict[str, Any], *, kind: str, directory: Path) -> int:
    """The S of an AnyRes image processor's S x S tiles, or a refusal listing what vlmkit cannot reproduce."""
    problems = unsupported_preprocessing(pre, kinds=(kind,))
    size, crop = pre.get("size") or {}, pre.get("crop_size") or {}
    sides: set[Any] = (  # JSON values, checked below
        {size.get("shortest_edge")} if "shortest_edge" in size else {size.get("height"), size.get("width")}
    )
    if pre.get("do_center_crop"):
        sides |= {crop.get("height"), crop.get("width")}
    if len(sides) != 1 or not isinstance(next(iter(sides)), int):
        problems.append(f"size={size} crop_size={crop} (vlmkit needs one square tile size)")
    if problems:
        raise ModelDirError(f"{directory}: image preprocessing not supported: {'; '.join(problems)}")
    return int(next(iter(sides)))


def _check_processor_counts(
    processor: dict[str, Any], *, vision: VisionEncoder, strategy: str, directory: Path
) -> None:
    """The processor's own per-tile token count must be the model's (else its prompts would not fit)."""
    side = vision.config.image_size // vision.patch_size
    drop = 1 if strategy == "default" else 0
    if "num_image_tokens" in processor:  # OneVision: tokens of one tile, before "default" drops one
        found = int(processor["num_image_tokens"]) - drop
    elif "patch_size" in processor and processor["patch_size"]:  # LLaVA-NeXT
        extra = int(processor.get("num_additional_image_tokens", 0) or 0)
        found = (vision.config.image_size // int(processor["patch_size"])) ** 2 + extra - drop
    else:
        return
    if found != side**2:
        raise ModelDirError(
            f"{directory}: the processor counts {found} tokens per tile but the model makes {side**2} "
            f"({side}x{side} patches)"
        )
