"""open_clip / timm for tests: import them without torchvision, and save tiny random towers in hub layout.

Both packages declare torchvision as a dependency but use it at import time only for names (transforms,
FrozenBatchNorm2d, datasets) that their ViT forward never touches. This project keeps torchvision out of its
environment (transformers would switch image processors), so CI installs them with ``--no-deps`` and the tests
import them behind a stand-in that exists only during the import: afterwards ``torchvision`` is absent again,
for transformers and for everything else.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

_STUB_MODULES = ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
                 "torchvision.transforms.functional", "torchvision.datasets", "torchvision.models",
                 "torchvision.models.feature_extraction", "torchvision.utils")  # fmt: skip


class _Unusable:
    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError("torchvision is not installed (test stand-in)")


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Unusable,), {})


@contextlib.contextmanager
def _torchvision_stand_in():
    if importlib.util.find_spec("torchvision") is not None:  # the real one: nothing to stand in for
        yield
        return
    modules = {name: _StubModule(name) for name in _STUB_MODULES}
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    modules["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (nn.Module,), {})
    modes = enum.Enum("InterpolationMode", {m: m.lower() for m in ("NEAREST", "NEAREST_EXACT", "BILINEAR",
                                                                     "BICUBIC", "BOX", "HAMMING", "LANCZOS")})  # fmt: skip
    modules["torchvision.transforms"].InterpolationMode = modes
    modules["torchvision.transforms.functional"].InterpolationMode = modes
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in modules:
            sys.modules.pop(name, None)


def require(name: str):
    """Import ``open_clip`` or ``timm`` (skipping the test when the package is not installed)."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install 'vlmkit[{name}]')")
    importlib.import_module("transformers")  # decides whether torchvision exists before the stand-in appears
    with _torchvision_stand_in():
        return importlib.import_module(name)


OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
OPEN_CLIP_PRE = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "resize_mode": "squash"}


def save_open_clip(directory: Path, *, seed: int = 0) -> Path:
    """A tiny random open_clip CLIP (ViT-32/8, 3 layers) in open_clip's hub layout."""
    from safetensors.torch import save_file

    open_clip = require("open_clip")
    torch.manual_seed(seed)
    model = open_clip.CLIP(**OPEN_CLIP_CFG)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": OPEN_CLIP_PRE})
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, directory / "open_clip_model.safetensors"
    )
    return directory


TIMM_ARGS = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3,
                                     "num_heads": 2, "reg_tokens": 2}),
    "eva": ("eva02_tiny_patch14_224", {"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 2,
                                       "num_heads": 2}),
}  # fmt: skip


def save_timm(directory: Path, *, kind: str = "vit", seed: int = 0) -> Path:
    """A tiny random timm tower (ViT with 2 register tokens, or EVA-02) in timm's hub layout."""
    timm = require("timm")
    architecture, args = TIMM_ARGS[kind]
    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=0, **args)
    timm.models.save_for_hf(model, directory, model_args=args | {"num_classes": 0}, safe_serialization=True,
                            data_config={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})  # fmt: skip
    return directory


OPEN_CLIP_TIMM_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                   "timm_pool": "avg", "timm_proj": "linear"},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}  # fmt: skip


def save_open_clip_timm(directory: Path, *, seed: int = 0) -> Path:
    """A tiny open_clip CLIP whose image tower is a timm trunk (timm's test_vit: 10 x 10 patches of 16 px)."""
    from safetensors.torch import save_file

    open_clip = require("open_clip")
    require("timm")
    torch.manual_seed(seed)
    model = open_clip.CLIP(**OPEN_CLIP_TIMM_CFG)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_TIMM_CFG}))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, directory / "open_clip_model.safetensors"
    )
    return directory
