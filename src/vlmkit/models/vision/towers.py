"""Which tower a ``vision=`` argument names, and building / loading it.

``vision`` is a directory (transformers, open_clip or timm hub layout, detected), ``open_clip:DIR`` /
``timm:DIR`` (forced), or several of those (a list, or joined by commas) for a fused tower.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from vlmkit.config import VisionConfig
from vlmkit.models.io import ModelDirError
from vlmkit.models.parts import check_model_dir, load_vision_tower, vision_config_for
from vlmkit.models.vision.encoder import VisionEncoder, vision_hf_config
from vlmkit.models.vision.fused import FusedVisionEncoder, member_encoder
from vlmkit.models.vision.library import (
    LIBRARIES,
    LibraryVisionEncoder,
    detect_library,
    load_library_tower,
    read_library_dir,
    split_named,
)

VisionSource = str | Path | Sequence[str | Path]
# every encoder a VLM's ``vision`` can be: the same interface (hidden_size, patch_size, num_tokens, config)
VisionTower = VisionEncoder | FusedVisionEncoder | LibraryVisionEncoder
# overrides that apply to each member of a fused tower; the rest (size, resize mode) belong to the fused input
_MEMBER_OVERRIDES = ("feature_layer", "select")


def build_vision_encoder(*, config: VisionConfig) -> VisionTower:
    """A randomly initialised encoder for ``config`` (weights are loaded afterwards)."""
    if getattr(config, "towers", ()):
        return FusedVisionEncoder(config=config)
    return member_encoder(config)


def vision_sources(source: VisionSource) -> list[tuple[str | None, Path]]:
    """``vision=`` -> [(library or None for auto-detect, directory), ...]."""
    items = [source] if isinstance(source, str | Path) else list(source)
    if len(items) == 1 and isinstance(items[0], str) and "," in items[0]:
        items = [part for part in items[0].split(",") if part.strip()]
    out: list[tuple[str | None, Path]] = []
    for item in items:
        text = str(item).strip()
        kind, _, rest = text.partition(":")
        out.append((kind, Path(rest)) if kind in LIBRARIES and rest else (None, Path(text)))
    if not out:
        raise ModelDirError("vision: no tower directory given")
    return out


def load_vision(source: VisionSource, *, dtype: torch.dtype | None, overrides: dict[str, Any]) -> VisionTower:
    """Load the tower(s) named by ``source``; the encoder's ``.config`` is the model's VisionConfig."""
    sources = vision_sources(source)
    if len(sources) == 1:
        kind, path = sources[0]
        return _load_one(path, kind=kind, dtype=dtype, overrides=overrides)
    if overrides.get("select") == "full" or overrides.get("conv_stem"):
        raise ValueError("a fused tower reads patch tokens only: select='full' and conv_stem do not apply")
    member_overrides = {k: overrides.get(k) for k in _MEMBER_OVERRIDES}
    members = [_load_one(path, kind=kind, dtype=dtype, overrides=member_overrides) for kind, path in sources]
    first = members[0].config
    config = VisionConfig(
        hf_config={"model_type": "fused"},
        towers=tuple(m.config for m in members),
        image_size=overrides.get("image_size") or first.image_size,
        resize_mode=overrides.get("resize_mode") or first.resize_mode,
        image_mean=first.image_mean,
        image_std=first.image_std,
        source=",".join(str(m.config.source) for m in members),
    )
    config.validate()
    return FusedVisionEncoder(config=config, towers=members)


def _load_one(
    path: Path, *, kind: str | None, dtype: torch.dtype | None, overrides: dict[str, Any]
) -> VisionEncoder | LibraryVisionEncoder:
    if kind == "open_clip" and split_named(path) is not None:  # NAME@FILE: no directory to detect
        return _library_encoder(path, kind=kind, dtype=dtype, overrides=overrides)
    path = check_model_dir(path.expanduser())
    detected = detect_library(path)
    kind = kind or detected
    if kind is None:
        tower = load_vision_tower(path, dtype=dtype)
        config = vision_config_for(tower=tower, source=path, overrides=overrides)
        return VisionEncoder(config=config, model=tower)
    if detected != kind:
        raise ModelDirError(
            f"{path}: not a {kind} tower directory (see docs/parts.md for the expected files)"
        )
    return _library_encoder(path, kind=kind, dtype=dtype, overrides=overrides)


def _library_encoder(
    path: Path, *, kind: str, dtype: torch.dtype | None, overrides: dict[str, Any]
) -> LibraryVisionEncoder:
    tower, fields = load_library_tower(path, kind=kind, dtype=dtype)
    fields |= {k: v for k, v in overrides.items() if v is not None and k != "conv_stem"}
    if overrides.get("conv_stem"):
        raise ValueError("conv_stem replaces a transformers tower's patch embedding; it does not apply to "
                         f"{kind} towers")  # fmt: skip
    return LibraryVisionEncoder(config=VisionConfig(**fields), model=tower)


def vision_config_from_dirs(source: VisionSource, *, overrides: dict[str, Any]) -> VisionConfig | None:
    """The VisionConfig ``load_vision`` would make, from config files only (no weights: for ``vlmkit plan``);
    None for one plain transformers tower (the planner reads those through transformers itself)."""
    sources = vision_sources(source)
    if len(sources) == 1 and sources[0][0] is None and detect_library(check_model_dir(sources[0][1])) is None:
        return None
    configs = [_config_only(path, kind=kind, overrides=overrides) for kind, path in sources]
    if len(configs) == 1:
        return configs[0]
    first = configs[0]
    return VisionConfig(hf_config={"model_type": "fused"}, towers=tuple(configs), image_size=first.image_size,
                        resize_mode=first.resize_mode, image_mean=first.image_mean, image_std=first.image_std)  # fmt: skip


def _config_only(path: Path, *, kind: str | None, overrides: dict[str, Any]) -> VisionConfig:
    from transformers import AutoConfig

    fields = {k: v for k, v in overrides.items() if v is not None}
    if kind == "open_clip" and split_named(path) is not None:
        tower, preprocess = read_library_dir(path, kind=kind)
        return VisionConfig(**({"hf_config": tower, "source": f"{kind}:{path}"} | preprocess | fields))
    path = check_model_dir(path.expanduser())
    kind = kind or detect_library(path)
    if kind is None:
        hf = vision_hf_config(AutoConfig.from_pretrained(str(path), trust_remote_code=False).to_dict())
        return vision_config_for(tower=SimpleNamespace(config=hf), source=path, overrides=fields)
    tower, preprocess = read_library_dir(path, kind=kind)
    return VisionConfig(**({"hf_config": tower, "source": f"{kind}:{path}"} | preprocess | fields))
