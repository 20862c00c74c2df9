"""AnyRes tiling (LLaVA-NeXT / LLaVA-OneVision): geometry, token counts and tile preprocessing.

An image becomes a *base* view (the whole image squashed to the tower's S x S) plus a grid of S x S tiles cut
from the image resized onto the best-fitting canvas of ``grid_pinpoints`` (aspect ratio kept, centred, black
padding). After the tower and projector the tiles' features are laid out as one feature map, the padding is cut
off again (``unpad``), OneVision caps its size (``max_tile_tokens``, bilinear), and a learned ``image_newline``
ends every row. Every formula here is the one transformers' ``LlavaNext*`` / ``LlavaOnevision*`` classes use, so
token counts and pixels are identical to theirs; ``models/tiling.py`` packs features with the same geometry.

Sizes are ``(height, width)`` throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlmkit.config import TilingConfig, VisionConfig
from vlmkit.processing.image import ImageProcessor, _expand_to_square

# OneVision downsamples only when the unpadded grid exceeds the cap by more than this factor (per side)
DOWNSAMPLE_SLACK = 1.1


def select_best_resolution(
    *, height: int, width: int, pinpoints: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The canvas that keeps the most of the image's pixels, then wastes the least (LLaVA-NeXT's rule)."""
    best, best_effective, best_waste = None, 0, math.inf
    for canvas_h, canvas_w in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = canvas_h * canvas_w - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (canvas_h, canvas_w), effective, waste
    if best is None:
        raise ValueError(f"no grid pinpoint fits a {width}x{height} image")
    return best


def fit_size(*, height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """The image's size resized into ``canvas`` with its aspect ratio kept (the long side rounded up)."""
    canvas_h, canvas_w = canvas
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def unpadded_size(*, rows: int, cols: int, height: int, width: int) -> tuple[int, int]:
    """Feature-map size [rows, cols] with the letterbox padding of a ``height`` x ``width`` image cut off."""
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        return rows - 2 * ((rows - new_rows) // 2), cols
    new_cols = int(round(width * (rows / height), 7))
    return rows, cols - 2 * ((cols - new_cols) // 2)


def capped_size(*, rows: int, cols: int, side: int, max_tiles: int | None) -> tuple[int, int]:
    """OneVision's ``anyres_max_N``: a map above N tiles' worth of tokens shrinks (bilinearly) to about N."""
    if max_tiles is None:
        return rows, cols
    ratio = math.sqrt(rows * cols / (max_tiles * side**2))
    if ratio <= DOWNSAMPLE_SLACK:
        return rows, cols
    return int(rows // ratio), int(cols // ratio)


@dataclass(frozen=True)
class TileLayout:
    """How one image is tiled and packed: its size, its tile grid and the packed feature map's size."""

    height: int
    width: int
    grid: tuple[int, int]  # tile rows, tile cols; (0, 0) = base view only
    packed: tuple[int, int]  # feature-map rows, cols after unpad / cap (without the newline column)

    @property
    def num_tiles(self) -> int:
        """Tower inputs: the base view plus the grid's tiles."""
        return 1 + self.grid[0] * self.grid[1]


class AnyRes:
    """A model's tiling settings resolved against its tower: layouts, token counts and pixels per image."""

    def __init__(
        self, *, tiling: TilingConfig, tile_size: int, patch_size: int, base: ImageProcessor | None = None
    ) -> None:
        if tile_size % patch_size:
            raise ValueError(
                f"tile size {tile_size} is not a multiple of the tower's patch size {patch_size}"
            )
        self.tiling = tiling
        self.tile_size = tile_size
        self.side = tile_size // patch_size  # feature-map cells per tile side
        self.pinpoints = tiling.pinpoints(tile_size)
        self.base = base

    @classmethod
    def from_vision_config(cls, config: VisionConfig, *, patch_size: int) -> AnyRes:
        if config.tiling is None:
            raise ValueError("the vision config has no tiling section")
        return cls(tiling=config.tiling, tile_size=config.image_size, patch_size=patch_size,
                   base=ImageProcessor.from_vision_config(config))  # fmt: skip

    def to_dict(self) -> dict:
        """Everything that changes pixels or counts (part of feature-cache keys)."""
        return {"tiling": repr(self.tiling), "tile_size": self.tile_size, "side": self.side,
                "base": self.base.to_dict() if self.base else None}  # fmt: skip

    def layout(self, *, height: int, width: int, tiled: bool = True) -> TileLayout:
        if not tiled:
            return TileLayout(height=height, width=width, grid=(0, 0), packed=(0, 0))
        canvas = select_best_resolution(height=height, width=width, pinpoints=self.pinpoints)
        grid = (canvas[0] // self.tile_size, canvas[1] // self.tile_size)
        rows, cols = grid[0] * self.side, grid[1] * self.side
        if self.tiling.unpad:
            rows, cols = unpadded_size(rows=rows, cols=cols, height=height, width=width)
        rows, cols = capped_size(rows=rows, cols=cols, side=self.side, max_tiles=self.tiling.max_tile_tokens)
        return TileLayout(height=height, width=width, grid=grid, packed=(rows, cols))

    def num_tokens(self, layout: TileLayout) -> int:
        """LM tokens of one image: base view, packed map, one newline per map row (or one after a lone base)."""
        newline = int(self.tiling.image_newline)
        base = self.side**2
        if layout.grid == (0, 0):
            return base + newline
        rows, cols = layout.packed
        return base + rows * (cols + newline)

    def largest(self) -> tuple[int, int]:
        """(tower views, LM tokens) of the biggest image the tiling allows: one filling its largest canvas."""
        layouts = [self.layout(height=h, width=w) for h, w in self.pinpoints]
        return max((lay.num_tiles, self.num_tokens(lay)) for lay in layouts)

    def tiles_for(self, *, num_images: int) -> bool:
        """Whether images of a prompt with ``num_images`` images are tiled (OneVision tiles lone images only)."""
        return not (self.tiling.multi_image_base_only and num_images > 1)

    # ------------------------------------------------------------------------------------------ pixels

    def preprocess(self, image: Image.Image, *, tiled: bool = True) -> torch.Tensor:
        """One RGB image -> [1 + tiles, 3, S, S]: the base view, then the tiles row by row."""
        if self.base is None:
            raise ValueError("this AnyRes geometry has no image preprocessing settings")
        size = self.tile_size
        if not tiled:  # OneVision's multi-image view: letterbox with the mean colour, then squash
            square = _expand_to_square(image, fill=self.base.pad_colour)
            return self._normalised([square.resize((size, size), resample=self.base.resample)])
        canvas = select_best_resolution(height=image.height, width=image.width, pinpoints=self.pinpoints)
        views: list[Image.Image | np.ndarray] = [image.resize((size, size), resample=self.base.resample)]
        views += _cut_tiles(self._on_canvas(image, canvas=canvas), size=size)
        return self._normalised(views)

    def _on_canvas(self, image: Image.Image, *, canvas: tuple[int, int]) -> np.ndarray:
        """Resize into ``canvas`` keeping the aspect ratio, centred on black: uint8 [H, W, 3]."""
        assert self.base is not None  # preprocess checked
        new_h, new_w = fit_size(height=image.height, width=image.width, canvas=canvas)
        resized = np.asarray(image.resize((new_w, new_h), resample=self.base.resample))
        top, left = (canvas[0] - new_h) // 2, (canvas[1] - new_w) // 2
        out = np.zeros((canvas[0], canvas[1], 3), dtype=np.uint8)
        out[top : top + new_h, left : left + new_w] = resized
        return out

    def _normalised(self, views: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        assert self.base is not None  # preprocess checked
        pixels = [np.asarray(v) for v in views]
        return torch.stack([torch.from_numpy(np.ascontiguousarray(self.base.normalise(p).transpose(2, 0, 1)))
                            for p in pixels])  # fmt: skip


def _cut_tiles(canvas: np.ndarray, *, size: int) -> list[np.ndarray]:
    """[H, W, 3] -> S x S tiles, row by row (H and W are multiples of S)."""
    rows, cols = canvas.shape[0] // size, canvas.shape[1] // size
    return [
        canvas[r * size : (r + 1) * size, c * size : (c + 1) * size] for r in range(rows) for c in range(cols)
    ]
