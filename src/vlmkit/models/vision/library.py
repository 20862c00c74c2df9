"""Vision towers from the libraries that own them: open_clip (``open_clip_torch``) and timm.

A tower directory is in the library's hub layout:

* open_clip: ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and ``open_clip_model.safetensors``;
  only the image half (``visual.*``) is built and loaded;
* timm: ``config.json`` with ``architecture`` (+ ``model_args``, ``pretrained_cfg``) and ``model.safetensors``
  (what ``timm.models.push_to_hf_hub`` / ``save_for_hf`` write).

The tower is rebuilt from its stored config with the library's own constructors, and its weights are read from
safetensors only (never a pickle). Features are read out like a transformers tower: hidden state 0 is the input
of the first block (patch + position embeddings, pre-norm), hidden state ``k`` the output of block ``k``; the
library's own forward runs and stops right after the block that is read.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from vlmkit.config import CLIP_MEAN, CLIP_STD, VisionConfig
from vlmkit.models.budget import check_fits, estimate
from vlmkit.models.io import ModelDirError
from vlmkit.models.parts import read_json

LIBRARIES = ("open_clip", "timm")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
TIMM_WEIGHTS = "model.safetensors"
_PACKAGES = {"open_clip": ("open_clip", "open_clip_torch"), "timm": ("timm", "timm")}
# open_clip's resize modes -> vlmkit's ("shortest" = resize the short side, then centre crop)
_OPEN_CLIP_RESIZE = {"shortest": "crop", "longest": "pad", "squash": "resize"}
_TIMM_RESIZE = {"center": "crop", "squash": "resize", "border": "pad"}


def import_library(kind: str) -> ModuleType:
    """The library module, or one clear error naming the pip command (torch is never touched)."""
    module, package = _PACKAGES[kind]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelDirError(
            f"{kind} vision towers need the {package} package: pip install 'vlmkit[{kind}]' ({exc})"
        ) from None


def detect_library(path: Path) -> str | None:
    """'open_clip' / 'timm' for a directory in that library's hub layout, None for anything else."""
    if (path / OPEN_CLIP_CONFIG).is_file():
        return "open_clip"
    config = path / "config.json"
    if config.is_file():
        data = read_json(config)
        if "architecture" in data and "model_type" not in data:
            return "timm"
    return None


# ---------------------------------------------------------------------------------------------- reading dirs


def split_named(path: Path) -> tuple[str, Path] | None:
    """``NAME@FILE``: an open_clip model name (one of its built-in configs) and a safetensors weights file."""
    name, sep, file = str(path).partition("@")
    return (name, Path(file).expanduser()) if sep and name and file and not path.is_dir() else None


def read_library_dir(path: Path, *, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A hub-layout directory (or open_clip ``NAME@FILE``) -> (the tower's ``hf_config`` for VisionConfig, its
    preprocessing fields)."""
    if kind == "open_clip" and (named := split_named(path)) is not None:
        model_cfg = import_library("open_clip").get_model_config(named[0])
        if model_cfg is None:
            raise ModelDirError(
                f"open_clip has no model config named {named[0]!r} (see open_clip.list_models())"
            )
        tower = {"model_type": "open_clip", "embed_dim": model_cfg.get("embed_dim", 512),
                 "quick_gelu": bool(model_cfg.get("quick_gelu", False)), "vision_cfg": model_cfg["vision_cfg"]}  # fmt: skip
        return tower, _open_clip_preprocess(model_cfg.get("preprocess_cfg") or {}, tower=tower)
    if kind == "open_clip":
        data = read_json(path / OPEN_CLIP_CONFIG)
        model_cfg = data.get("model_cfg")
        if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict):
            raise ModelDirError(f"{path / OPEN_CLIP_CONFIG}: no 'model_cfg' with a 'vision_cfg' object")
        tower = {"model_type": "open_clip", "embed_dim": model_cfg.get("embed_dim", 512),
                 "quick_gelu": bool(model_cfg.get("quick_gelu", False)), "vision_cfg": model_cfg["vision_cfg"]}  # fmt: skip
        return tower, _open_clip_preprocess(data.get("preprocess_cfg") or {}, tower=tower)
    data = read_json(path / "config.json")
    if not isinstance(data.get("architecture"), str):
        raise ModelDirError(f"{path / 'config.json'}: 'architecture' must name a timm model")
    args = data.get("model_args") or {}
    if not isinstance(args, dict):
        raise ModelDirError(f"{path / 'config.json'}: 'model_args' must be an object")
    tower = {"model_type": "timm", "architecture": data["architecture"],
             "model_args": args | {"num_classes": data.get("num_classes", args.get("num_classes", 0))}}  # fmt: skip
    return tower, _timm_preprocess(data.get("pretrained_cfg") or {})


def _open_clip_preprocess(pre: dict[str, Any], *, tower: dict[str, Any]) -> dict[str, Any]:
    size = tower["vision_cfg"].get("image_size", 224)
    return {
        "image_mean": tuple(pre.get("mean", CLIP_MEAN)),
        "image_std": tuple(pre.get("std", CLIP_STD)),
        "image_size": int(size[0] if isinstance(size, list | tuple) else size),
        "resize_mode": _OPEN_CLIP_RESIZE.get(pre.get("resize_mode", "shortest"), "crop"),
    }


def _timm_preprocess(pre: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "image_mean": tuple(pre.get("mean", (0.485, 0.456, 0.406))),
        "image_std": tuple(pre.get("std", (0.229, 0.224, 0.225))),
        "resize_mode": _TIMM_RESIZE.get(pre.get("crop_mode", "center"), "crop"),
    }
    if isinstance(pre.get("input_size"), list | tuple) and len(pre["input_size"]) == 3:
        fields["image_size"] = int(pre["input_size"][-1])
    return fields


def library_weights(path: Path, *, kind: str) -> dict[str, torch.Tensor]:
    """The tower's tensors from the directory's safetensors file (a pickle-only directory is refused)."""
    name = OPEN_CLIP_WEIGHTS if kind == "open_clip" else TIMM_WEIGHTS
    named = split_named(path) if kind == "open_clip" else None
    file = path / name if named is None else named[1]
    if named is not None and (file.suffix != ".safetensors" or not file.is_file()):
        raise ModelDirError(
            f"{file}: the weights must be an existing .safetensors file (vlmkit never unpickles)"
        )
    if not file.is_file():
        pickles = sorted(
            p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")
        )
        found = f" (found only {', '.join(pickles)}: vlmkit never unpickles)" if pickles else ""
        raise ModelDirError(f"{path}: no {name} found{found}")
    try:
        state = load_file(str(file))
    except SafetensorError as exc:
        raise ModelDirError(f"{file}: not a valid safetensors file ({exc})") from None
    if kind == "open_clip" and any(k.startswith("visual.") for k in state):  # the image half of a CLIP
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    return state


# ------------------------------------------------------------------------------------------- building towers


def build_library_tower(hf_config: dict[str, Any]) -> nn.Module:
    """A randomly initialised tower from its stored config, by the library's own constructors."""
    if hf_config.get("model_type") == "open_clip":
        open_clip = import_library("open_clip")
        vision_cfg = dict(hf_config["vision_cfg"])
        if isinstance(vision_cfg.get("layers"), list | tuple):
            raise ValueError("open_clip ResNet towers are not supported (ViT towers only)")
        if vision_cfg.get("timm_model_name"):
            import_library("timm")  # open_clip builds these trunks (SigLIP, EVA, ...) with timm
            vision_cfg["timm_model_pretrained"] = False  # weights come from the directory, never a download
        visual = open_clip.model._build_vision_tower(hf_config["embed_dim"], vision_cfg,
                                                     quick_gelu=hf_config.get("quick_gelu", False))  # fmt: skip
        _check_vit(getattr(visual, "trunk", None), name=vision_cfg.get("timm_model_name"))
        return visual
    timm = import_library("timm")
    try:
        model = timm.create_model(
            hf_config["architecture"], pretrained=False, **hf_config.get("model_args", {})
        )
    except (RuntimeError, TypeError, ValueError) as exc:  # unknown architecture or arguments
        raise ValueError(f"timm could not build {hf_config['architecture']!r}: {exc}") from None
    _check_vit(model, name=hf_config["architecture"])
    return model


def _check_vit(trunk: nn.Module | None, *, name: str | None) -> None:
    """A timm model must be ViT-style (blocks on a patch grid); None (open_clip's own ViT) passes."""
    if trunk is not None and not all(
        hasattr(trunk, a) for a in ("blocks", "patch_embed", "num_prefix_tokens", "forward_features")
    ):
        raise ValueError(f"timm architecture {name!r} is not a ViT-style tower (ViT, SigLIP, EVA, DINOv2)")


def load_library_tower(
    path: Path, *, kind: str, dtype: torch.dtype | None
) -> tuple[nn.Module, dict[str, Any]]:
    """-> (tower with its weights, VisionConfig fields: hf_config, preprocessing, source)."""
    hf_config, preprocess = read_library_dir(path, kind=kind)
    # memory before validation: the library builds the tower in float32 from these sizes
    check_fits({"vision": estimate(hf_config)}, source=path, bytes_per_param=4)
    tower = build_library_tower(hf_config)
    state = library_weights(path, kind=kind)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelDirError(
            f"{path}: weights do not match the {kind} config (missing: {', '.join(missing[:5]) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )
    if dtype is not None:
        tower.to(dtype)
    return tower, {"hf_config": json.loads(json.dumps(hf_config)), "source": f"{kind}:{path}"} | preprocess


# ------------------------------------------------------------------------------------------------ read-out


class _Stop(Exception):
    """Raised by the read-out hook: the blocks after the one read are never computed."""


class LibraryVisionEncoder(nn.Module):
    """An open_clip or timm ViT, read out at one hidden state; the interface of ``VisionEncoder``."""

    # the library's VisionTransformer: its attributes (grid_size, blocks, ...) differ per library
    model: Any

    def __init__(self, *, config: VisionConfig, model: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.model_type: str = config.hf_config["model_type"]
        self.model = model if model is not None else build_library_tower(config.hf_config)
        trunk = self._timm_trunk()
        if trunk is None:  # open_clip's own VisionTransformer
            grid, patch = self.model.grid_size, self.model.patch_size
            self.hidden_size: int = self.model.conv1.out_channels
            self.num_prefix = 1  # open_clip's ViT always has one class token
        else:
            grid, patch = trunk.patch_embed.grid_size, trunk.patch_embed.patch_size
            self.hidden_size = trunk.embed_dim
            self.num_prefix = int(trunk.num_prefix_tokens)
        self.patch_size: int = int(patch[0])
        self.native_size: int = int(grid[0]) * self.patch_size
        vision_cfg = config.hf_config.get("vision_cfg") or {}
        self.name = (
            config.hf_config.get("architecture")
            or vision_cfg.get("timm_model_name")
            or f"ViT-{self.hidden_size}/{self.patch_size}"
        )
        if config.conv_stem:
            raise ValueError("vision.conv_stem is supported for transformers towers only")
        if config.image_size != self.native_size or grid[0] != grid[1]:
            raise ValueError(
                f"vision.image_size={config.image_size}: {self.model_type} towers run at their native square size "
                f"({self.native_size}); their position embeddings are not interpolated"
            )
        self.layer_index = self._layer_index(len(self._blocks()))

    @property
    def description(self) -> str:
        """For ``vlmkit info``: the library and the tower, e.g. ``timm:vit_base_patch16_siglip_224``."""
        return f"{self.model_type}:{self.name}"

    def _timm_trunk(self) -> Any:
        """The timm ViT whose blocks are read (a timm tower, or the trunk of an open_clip tower), or None."""
        return self.model if self.model_type == "timm" else getattr(self.model, "trunk", None)

    def _blocks(self) -> nn.ModuleList:
        trunk = self._timm_trunk()
        return self.model.transformer.resblocks if trunk is None else trunk.blocks

    def _layer_index(self, num_layers: int) -> int:
        layer = self.config.feature_layer
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"vision.feature_layer={layer} is out of range for a tower with {num_layers} layers "
                f"(valid: {-(num_layers + 1)}..{num_layers})"
            )
        return layer if layer >= 0 else num_layers + 1 + layer

    @property
    def num_tokens(self) -> int:
        """Tokens per image after selection."""
        patches = (self.config.image_size // self.patch_size) ** 2
        return patches + (self.num_prefix if self.config.select == "full" else 0)

    def _hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, S, S] -> hidden state ``layer_index`` [n, prefix + patches, hidden]."""
        captured: list[torch.Tensor] = []

        trunk = self._timm_trunk()

        def keep(tensor: torch.Tensor) -> None:
            batch_first = trunk is not None or self.model.transformer.batch_first
            captured.append(tensor if batch_first else tensor.transpose(0, 1))
            raise _Stop

        blocks = self._blocks()
        if self.layer_index == 0:
            hook = blocks[0].register_forward_pre_hook(lambda _m, args: keep(args[0]))
        else:
            hook = blocks[self.layer_index - 1].register_forward_hook(lambda _m, _a, out: keep(out))
        try:
            self.model(pixel_values) if trunk is None else trunk.forward_features(pixel_values)
        except _Stop:
            pass
        finally:
            hook.remove()
        return captured[0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, S, S] -> features [n, tokens, hidden]."""
        dtype = next(self.model.parameters()).dtype
        features = self._hidden_state(pixel_values.to(dtype))  # [n, prefix + patches, hidden]
        if self.config.select == "patch":
            features = features[:, self.num_prefix :]
        return features
