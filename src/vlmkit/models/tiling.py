"""AnyRes packing: per-tile projected features -> one variable-length token sequence per image.

The geometry (grid, unpad, OneVision's cap) comes from ``processing/tiling.py``, the same code that counts the
image's placeholder tokens, so the sequence always fits its placeholder span. Follows transformers'
``LlavaNextModel.pack_image_features`` / ``LlavaOnevisionModel.pack_image_features`` operation for operation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vlmkit.processing.tiling import AnyRes, TileLayout, unpadded_size


class TilePacker(nn.Module):
    """Holds the learned ``image_newline`` [lm_dim] (when the tiling uses one) and packs tile features."""

    def __init__(self, *, anyres: AnyRes, lm_dim: int) -> None:
        super().__init__()
        self.anyres = anyres
        self.image_newline = (
            nn.Parameter(torch.randn(lm_dim) / math.sqrt(lm_dim)) if anyres.tiling.image_newline else None
        )

    def forward(self, features: torch.Tensor, *, layouts: Sequence[TileLayout]) -> list[torch.Tensor]:
        """features [all tiles, side*side, dim] (each image's base view, then its tiles) -> per image [n_i, dim]."""
        out, start = [], 0
        for layout in layouts:
            tiles = features[start : start + layout.num_tiles]
            start += layout.num_tiles
            out.append(self.pack_one(tiles, layout=layout))
        if start != features.shape[0]:
            raise ValueError(
                f"got features of {features.shape[0]} tiles but the images' layouts need {start}"
            )
        return out

    def pack_one(self, tiles: torch.Tensor, *, layout: TileLayout) -> torch.Tensor:
        """tiles [1 + grid tiles, side*side, dim] -> [tokens, dim]: base, then the packed map row by row."""
        base = tiles[0]  # [side*side, dim]
        if layout.grid == (0, 0):
            return (
                base if self.image_newline is None else torch.cat([base, self.image_newline[None].to(base)])
            )
        side, (grid_rows, grid_cols) = self.anyres.side, layout.grid
        grid = tiles[1:].view(grid_rows, grid_cols, side, side, -1)
        fmap = grid.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # [dim, rows, cols]
        if self.anyres.tiling.unpad:
            fmap = _unpad(fmap, layout=layout)
        if tuple(fmap.shape[1:]) != layout.packed:  # OneVision's cap
            fmap = nn.functional.interpolate(fmap[None], list(layout.packed), mode="bilinear")[0]
        if self.image_newline is not None:
            newline = self.image_newline[:, None, None].expand(*fmap.shape[:-1], 1).to(fmap)
            fmap = torch.cat([fmap, newline], dim=-1)  # [dim, rows, cols + 1]
        return torch.cat([base, fmap.flatten(1, 2).transpose(0, 1)])


def _unpad(fmap: torch.Tensor, *, layout: TileLayout) -> torch.Tensor:
    """[dim, rows, cols] -> the centred part that shows the image (padding split evenly, as transformers)."""
    rows, cols = fmap.shape[1:]
    new_rows, new_cols = unpadded_size(rows=rows, cols=cols, height=layout.height, width=layout.width)
    top, left = (rows - new_rows) // 2, (cols - new_cols) // 2
    return fmap[:, top : top + new_rows, left : left + new_cols]
