"""Fused towers (prismatic-vlms: DINOv2 + SigLIP beats either alone): several towers see the same image, their
patch features are brought to one token grid and concatenated per patch, and one projector reads the result.

vlmkit preprocesses the image once, with the first tower's size, resize mode and mean/std; every other tower gets
those pixels renormalised to its own mean/std (exact: both are affine maps of the same [0, 1] pixels) and, if its
size differs, resized. A tower whose patch grid is finer than the smallest grid is area-pooled onto it.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.models.vision.encoder import VisionEncoder
from vlmkit.models.vision.library import LIBRARIES, LibraryVisionEncoder

# one (unfused) tower
MemberEncoder = VisionEncoder | LibraryVisionEncoder


def member_encoder(config: VisionConfig, *, model: nn.Module | None = None) -> MemberEncoder:
    """The encoder of one (unfused) tower config: a library tower or a transformers one."""
    if config.hf_config.get("model_type") in LIBRARIES:
        return LibraryVisionEncoder(config=config, model=model)
    return VisionEncoder(config=config, model=model)


class FusedVisionEncoder(nn.Module):
    """``towers`` encoders -> features [n, grid**2, sum of their widths]; the interface of ``VisionEncoder``."""

    def __init__(self, *, config: VisionConfig, towers: list[MemberEncoder] | None = None) -> None:
        super().__init__()
        self.config = config
        members = towers if towers is not None else [member_encoder(c) for c in config.towers]
        # named ``model`` like every encoder's wrapped module (export and LoRA look it up by that name)
        self.model = nn.ModuleList(members)
        for tower in members:
            if tower.config.select != "patch" or getattr(tower.config, "tiling", None) is not None:
                raise ValueError(
                    "a fused tower's members must read patch tokens only (select='patch', no tiling)"
                )
        self.model_type = "fused"
        self.name = " + ".join(getattr(t, "description", t.model_type) for t in members)
        self.grid = min(t.config.image_size // t.patch_size for t in members)
        self.hidden_size: int = sum(t.hidden_size for t in members)
        self.patch_size: int = max(1, config.image_size // self.grid)
        self.native_size: int = config.image_size
        self.num_prefix = 0

    @property
    def description(self) -> str:
        """For ``vlmkit info``: every member, e.g. ``fused(dinov2 + siglip_vision_model)``."""
        return f"fused({self.name})"

    @property
    def towers(self) -> list[MemberEncoder]:
        return cast("list[MemberEncoder]", list(self.model))

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    def _tower_pixels(self, pixel_values: torch.Tensor, tower: MemberEncoder) -> torch.Tensor:
        """Pixels normalised for the first tower -> the same image as ``tower``'s own preprocessing gives."""
        cfg, own = self.config, tower.config
        x = pixel_values
        if tuple(own.image_mean) != tuple(cfg.image_mean) or tuple(own.image_std) != tuple(cfg.image_std):
            shape = (1, 3, 1, 1)
            raw = x * x.new_tensor(cfg.image_std).view(shape) + x.new_tensor(cfg.image_mean).view(shape)
            x = (raw - x.new_tensor(own.image_mean).view(shape)) / x.new_tensor(own.image_std).view(shape)
        if own.image_size != x.shape[-1]:
            x = F.interpolate(x, size=(own.image_size, own.image_size), mode="bicubic", align_corners=False,
                              antialias=True)  # fmt: skip
        return x

    def _to_grid(self, features: torch.Tensor) -> torch.Tensor:
        """[n, g*g, d] -> [n, grid*grid, d], area-pooled when g > grid."""
        n, tokens, dim = features.shape
        side = int(round(tokens**0.5))
        if side == self.grid:
            return features
        square = features.transpose(1, 2).reshape(n, dim, side, side)
        return F.adaptive_avg_pool2d(square, self.grid).flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, S, S] -> features [n, grid**2, hidden_size] (towers concatenated per patch)."""
        parts = [self._to_grid(tower(self._tower_pixels(pixel_values, tower))) for tower in self.towers]
        dtype = parts[0].dtype
        return torch.cat([p.to(dtype) for p in parts], dim=-1)
