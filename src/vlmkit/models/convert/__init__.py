"""Checkpoints in other layouts (llava-hf, original LLaVA) to and from vlmkit models.

``load_foreign`` recognises a directory by its config.json and hands it to the matching loader;
``export.export_hf_llava`` writes a vlmkit model as a llava-hf directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmkit.models.io import ModelDirError

# llava-hf model types that tile images ("anyres"); loading one as plain llava would be a wrong model
ANYRES_MODEL_TYPES = ("llava_next", "llava_next_video", "llava_onevision")
# ... of which vlmkit loads these (llava_next_video also has video features)
LOADABLE_ANYRES = ("llava_next", "llava_onevision")


def load_foreign(
    directory: Path, *, raw: dict[str, Any], dtype: torch.dtype | None, vision_tower: str | Path | None
) -> tuple[Any, Any]:
    """Detect the layout of a non-vlmkit directory and load it as (VisionLanguageModel, tokenizer)."""
    from vlmkit.models.convert.llava_original import is_original_llava, load_llava_original

    model_type = raw.get("model_type")
    aspect = str(raw.get("image_aspect_ratio", ""))
    if model_type in LOADABLE_ANYRES:
        from vlmkit.models.convert.llava_next import load_llava_anyres

        return load_llava_anyres(directory, raw=raw, dtype=dtype)
    if model_type in ANYRES_MODEL_TYPES or (aspect.startswith("anyres") and not is_original_llava(raw)):
        raise ModelDirError(
            f"{directory}: a LLaVA-NeXT style checkpoint ({model_type or 'image_aspect_ratio=' + aspect}) tiles "
            "images at any resolution ('anyres'); vlmkit loads llava-hf llava_next and llava_onevision directories, "
            "not this kind yet"
        )
    if is_original_llava(raw):
        return load_llava_original(directory, raw=raw, dtype=dtype, vision_tower=vision_tower)
    if model_type == "llava":
        from vlmkit.models.convert.llava_hf import load_llava_hf

        return load_llava_hf(directory, raw=raw, dtype=dtype)
    if model_type:
        raise ModelDirError(
            f"{directory}: a transformers '{model_type}' checkpoint, not a vlmkit model directory"
        )
    raise ModelDirError(f"{directory}: config.json is not a vlmkit model config (no 'vlmkit_version')")
