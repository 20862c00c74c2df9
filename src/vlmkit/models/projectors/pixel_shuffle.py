"""Pixel-shuffle projector (Idefics3 / SmolVLM / nanoVLM): space-to-depth by ``r``, then an MLP.

Each ``r x r`` block of neighbouring visual tokens on the patch grid becomes one token of ``r**2`` times the
width, so the LM sees ``r**2`` times fewer image tokens with none of the image's content dropped (unlike
pooling): a 27 x 27 SigLIP grid with ``r = 3`` is 81 LM tokens instead of 729.
"""

from __future__ import annotations

import math

import torch

from vlmkit.config import ProjectorConfig
from vlmkit.models.projectors.mlp import MLPProjector
from vlmkit.models.projectors.registry import Projector, register_projector


def grid_side(tokens: int, *, factor: int) -> int:
    """The side of the square patch grid of ``tokens``; a ValueError unless it divides by ``factor``."""
    side = math.isqrt(tokens)
    if side * side != tokens or side % factor:
        raise ValueError(
            f"pixel-shuffle needs a square grid of patch tokens whose side divides by projector.shuffle_factor="
            f"{factor}; the tower gives {tokens} tokens per image (use select='patch', or another factor)"
        )
    return side


def pixel_shuffle(features: torch.Tensor, *, factor: int) -> torch.Tensor:
    """[n, side*side, d] (row-major grid) -> [n, (side/r)**2, r*r*d]; each output token is one r x r block."""
    n, tokens, dim = features.shape
    side = grid_side(tokens, factor=factor)
    blocks = side // factor
    x = features.reshape(
        n, blocks, factor, blocks, factor, dim
    )  # [n, row block, row in, col block, col in, d]
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, blocks * blocks, factor * factor * dim)


@register_projector("pixel-shuffle")
class PixelShuffleProjector(Projector):
    def __init__(self, *, config: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(config=config, in_dim=in_dim, out_dim=out_dim)
        self.factor = config.shuffle_factor
        self.mlp = MLPProjector(config=config, in_dim=in_dim * self.factor**2, out_dim=out_dim)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return (grid_side(num_input_tokens, factor=self.factor) // self.factor) ** 2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, side*side, in_dim] -> [n, (side/r)**2, out_dim]."""
        return self.mlp(pixel_shuffle(features, factor=self.factor))
