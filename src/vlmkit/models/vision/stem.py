"""A convolutional stem that replaces a ViT's patch embedding (Xiao et al. 2021, "Early Convolutions Help
Transformers See Better").

A ViT embeds each patch with one linear map, so every notion of edges, corners and angles has to be learnt by
attention across patches; trained from scratch on little data it learns shapes slowly. A few stride-2 3x3
convolutions give it those local features for almost no compute, and it trains several times faster. The stem
ends in a 1x1 convolution to the tower's width, so it emits exactly the patch grid the tower expects
([n, hidden, S / patch, S / patch]) and everything after it (position embeddings, layers) is unchanged.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

MAX_STAGES = 6  # 2**6 = 64 px patches: far beyond any ViT in use


def check_stem(*, channels: tuple[int, ...], patch_size: int) -> None:
    """Raise ValueError unless ``channels`` is a stem that turns ``patch_size`` pixels into one token."""
    if not 1 <= len(channels) <= MAX_STAGES or any(not isinstance(c, int) or c <= 0 for c in channels):
        raise ValueError(
            f"vision.conv_stem must list 1..{MAX_STAGES} positive channel counts, got {list(channels)}"
        )
    if 2 ** len(channels) != patch_size:
        raise ValueError(
            f"vision.conv_stem has {len(channels)} stride-2 stages, which embed {2 ** len(channels)} px patches, "
            f"but the tower's patch size is {patch_size}: use {patch_size.bit_length() - 1} stages"
            if patch_size & (patch_size - 1) == 0
            else f"vision.conv_stem needs a power-of-two patch size, the tower's is {patch_size}"
        )


class ConvStem(nn.Module):
    """``len(channels)`` x (3x3 conv stride 2 -> GroupNorm -> GELU), then a 1x1 conv to ``hidden_size``."""

    def __init__(self, *, channels: tuple[int, ...], hidden_size: int, in_channels: int = 3) -> None:
        super().__init__()
        self.channels = tuple(channels)
        layers: list[nn.Module] = []
        width = in_channels
        for out in channels:
            # no bias: the GroupNorm right after it has its own shift
            layers += [
                nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(1, out),
                nn.GELU(),
            ]
            width = out
        layers.append(nn.Conv2d(width, hidden_size, 1))
        self.layers = nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:
        # transformers' embeddings read ``patch_embedding.weight.dtype`` to cast the pixels
        return cast(nn.Conv2d, self.layers[-1]).weight  # the 1x1 projection appended last

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, S, S] -> patch grid [n, hidden, S / 2**stages, S / 2**stages]."""
        return self.layers(pixel_values)


def install_conv_stem(
    tower: nn.Module, *, channels: tuple[int, ...], patch_size: int, hidden_size: int
) -> None:
    """Replace ``tower``'s patch-embedding convolution (kernel = stride = patch) with a ``ConvStem``, in place."""
    check_stem(channels=channels, patch_size=patch_size)
    present = [m for m in tower.modules() if isinstance(m, ConvStem)]
    if present:  # a tower that already carries its stem (a copy, a reload into the same module)
        if present[0].channels != tuple(channels):
            raise ValueError(
                f"vision.conv_stem {list(channels)} differs from the tower's stem {list(present[0].channels)}"
            )
        return
    for name, module in tower.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (patch_size, patch_size) == module.stride:
            parent_name, _, attribute = name.rpartition(".")
            parent = tower.get_submodule(parent_name)
            stem = ConvStem(channels=channels, hidden_size=hidden_size, in_channels=module.in_channels)
            setattr(parent, attribute, stem.to(device=module.weight.device, dtype=module.weight.dtype))
            return
    raise ValueError(
        f"vision.conv_stem: found no {patch_size}x{patch_size} patch-embedding convolution to replace"
    )
