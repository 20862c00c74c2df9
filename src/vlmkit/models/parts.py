"""Load the parts of a VLM (vision tower, language model) from local transformers directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn

from vlmkit.config import CLIP_MEAN, CLIP_STD, MAX_JSON_BYTES, PromptConfig, VisionConfig, check_regular_file
from vlmkit.models.budget import check_fits, element_bytes, estimate
from vlmkit.models.io import (
    ModelDirError,
    check_no_pickle_only,
    check_no_remote_code,
    config_errors,
    read_json,
)
from vlmkit.models.language.protocols import LanguageModel
from vlmkit.processing.tokenizer_protocol import Tokenizer

# tokenizer files transformers reads itself: each must be a regular file of bounded size (tokenizer.json of the
# largest vocabularies is ~35 MB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")  # fmt: skip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# vision-only class for each checkpoint type (dual-tower CLIP/SigLIP checkpoints load their vision half)
_VISION_CLASSES = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "dinov2": "Dinov2Model",
    "vit": "ViTModel",
}
_DEFAULT_NORM = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def hf_config_dict(config: Any) -> dict[str, Any]:
    """A transformers config as plain JSON data: only non-default fields, so it stays readable and stable."""
    return json.loads(json.dumps(config.to_diff_dict()))


def check_model_dir(directory: str | Path) -> Path:
    """An existing directory that ships no code to run (every loader starts here)."""
    path = Path(directory).expanduser()
    if not path.exists():
        raise ModelDirError(f"model directory not found: {path}")
    if not path.is_dir():
        raise ModelDirError(f"not a directory: {path}")
    check_no_remote_code(path)
    return path


def load_vision_tower(source: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers vision model from a local dir (CLIP/SigLIP full checkpoints give their vision half)."""
    import transformers

    path = check_model_dir(source)
    raw = read_json(path / "config.json")
    model_type = raw.get("model_type")
    class_name = _VISION_CLASSES.get(model_type) if isinstance(model_type, str) else None
    if class_name is None:
        raise ModelDirError(
            f"{path}: vision tower model_type {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(set(_VISION_CLASSES)))})"
        )
    check_no_pickle_only(path)
    vision_config = raw.get("vision_config")
    vision = vision_config if isinstance(vision_config, dict) else raw  # CLIP: its half
    check_fits(
        {"vision": estimate(vision)}, source=path / "config.json", bytes_per_param=element_bytes(dtype)
    )
    with config_errors(path / "config.json"):
        return getattr(transformers, class_name).from_pretrained(path, dtype=dtype, trust_remote_code=False)


class HasHFConfig(Protocol):
    """A transformers model, or anything carrying its ``config`` (a tower described before it is built)."""

    @property
    def config(self) -> Any: ...


def vision_config_for(*, tower: HasHFConfig, source: str | Path, overrides: dict[str, Any]) -> VisionConfig:
    """VisionConfig from the tower's config and its preprocessor_config.json, then user overrides."""
    hf: Any = tower.config  # the transformers config of this tower class (CLIPVisionConfig, ...)
    kind = hf.model_type.replace("_vision_model", "")
    mean, std = _DEFAULT_NORM.get(kind, (CLIP_MEAN, CLIP_STD))
    size, mode = hf.image_size, "resize" if kind == "siglip" else "crop"
    pre_path = Path(source) / "preprocessor_config.json"
    if pre_path.exists():
        pre = read_json(pre_path)
        mean = tuple(pre.get("image_mean", mean))
        std = tuple(pre.get("image_std", std))
        size = _preprocessor_size(pre, default=size)
        mode = "crop" if pre.get("do_center_crop") else "resize"
    fields: dict[str, Any] = {
        "hf_config": hf_config_dict(hf),
        "image_size": size,
        "resize_mode": mode,
        "image_mean": mean,
        "image_std": std,
        "source": str(source),
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return VisionConfig(**fields)


def _preprocessor_size(pre: dict[str, Any], *, default: int) -> int:
    crop = pre.get("crop_size")
    if pre.get("do_center_crop") and isinstance(crop, dict) and "height" in crop:
        return int(crop["height"])
    size = pre.get("size")
    if isinstance(size, dict):
        return int(size.get("shortest_edge") or size.get("height") or default)
    if isinstance(size, int):
        return size
    return default


def load_language_model(source: str | Path, *, dtype: torch.dtype | None = None) -> LanguageModel:
    from transformers import AutoModelForCausalLM

    path = check_model_dir(source)
    raw = read_json(path / "config.json")
    check_no_pickle_only(path)
    check_fits({"language": estimate(raw)}, source=path / "config.json", bytes_per_param=element_bytes(dtype))
    with config_errors(path / "config.json"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    # transformers declares get_input_embeddings() an nn.Module; a causal LM's is an nn.Embedding
    return cast(LanguageModel, model)


def load_tokenizer(source: str | Path) -> Tokenizer:
    from transformers import AutoTokenizer

    path = check_model_dir(source)
    for name in TOKENIZER_FILES:
        if (path / name).exists():
            check_regular_file(path / name, error=ModelDirError, max_bytes=MAX_JSON_BYTES)
    try:
        # single-item calls only: the Tokenizer protocol's int / str results (tokenizer_protocol.py)
        return cast(Tokenizer, AutoTokenizer.from_pretrained(path, trust_remote_code=False))
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{path}: could not load a tokenizer ({exc})") from None


def add_image_token(tokenizer: Tokenizer, prompt: PromptConfig) -> int:
    """Register the image placeholder as a special token (idempotent) and give the tokenizer a pad token."""
    from tokenizers import AddedToken

    if prompt.image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens(
            [AddedToken(prompt.image_token, special=True, normalized=False)], special_tokens=True
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style tokenizers ship without one
    return tokenizer.convert_tokens_to_ids(prompt.image_token)
