"""Checkpoints in other layouts (llava-hf, original LLaVA) to and from vlmkit models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmkit.models.io import ModelDirError


def load_foreign(
    directory: Path, *, raw: dict[str, Any], dtype: torch.dtype | None, vision_tower: str | Path | None
) -> tuple[Any, Any]:
    """Detect the layout of a non-vlmkit directory and load it as (VisionLanguageModel, tokenizer)."""
    model_type = raw.get("model_type")
    if model_type:
        raise ModelDirError(f"{directory}: a transformers '{model_type}' checkpoint, not a vlmkit model directory")
    raise ModelDirError(f"{directory}: config.json is not a vlmkit model config (no 'vlmkit_version')")
