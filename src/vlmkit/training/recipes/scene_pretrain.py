"""Stage 1 with dense labels from scene descriptions (``scenes.jsonl``, as ``vlmkit synth`` writes it).

When a data set says what each image shows, the tower can be taught every object and every character
directly instead of through question/answer pairs (shared/notes/from-scratch-findings.md: 5 minutes of
dense labels then 15 of projector + LM reached a mean of 0.976 where end-to-end training stalled):

- shapes: each patch is labelled with the colour, kind and size of the shape covering it (or background)
  and with the grid cell that shape sits in (its own cell for background), so the features say *where*
  as well as *what* (the LM's rotary positions are relative, so it cannot easily count its way to a
  cell); the whole image with its shape count and background colour;
- documents: a small reader (learned queries, one per line and character slot, cross-attending to the
  patch tokens) must spell every rendered line, which forces the characters into the patch tokens where
  they are drawn;
- with ``where`` on, every patch token must also name its own place on the patch grid, and the reader loses
  its private position table: the tower's tokens then say *where* they are in a form a linear layer reads.
  The LM sees the tokens in raster order with relative (rotary) positions, so without this it must work out
  a token's column as an index modulo the grid width; a linear probe on the default model's image tokens
  finds the column of only 80-85% of them (the row of 84-89%), and its answers confuse left and right
  columns, which is where that is missing.

The heads are thrown away afterwards; only the tower is kept. Label maps are rendered from the same
geometry as the pixels (synth_render.shape_geometry), so a label never disagrees with what is drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from vlmkit.data.dataset import image_in_folder
from vlmkit.data.synth_render import draw_shape
from vlmkit.data.synth_scene import BACKGROUNDS, COLOURS, GRID, KINDS, SIZES, DocumentScene, Scene, ShapeScene
from vlmkit.models.vision.towers import VisionTower
from vlmkit.processing.image import ImageLoadError, ImageProcessor, load_image
from vlmkit.training.recipes.vision_pretrain import normalise, train_tower, uint8_pixels

IGNORE = -100
MAX_COUNT = 9
MIN_COVER = 6  # pixels of a patch a shape must cover to name the patch (small triangles are thin)
_COLOURS, _BACKGROUNDS = list(COLOURS), list(BACKGROUNDS)
NUM_PATCH_CLASSES = 1 + len(COLOURS) * len(KINDS) * len(SIZES)  # background + colour x kind x size


def patch_class(*, colour: str, kind: str, size: str) -> int:
    return 1 + (_COLOURS.index(colour) * len(KINDS) + KINDS.index(kind)) * len(SIZES) + SIZES.index(size)


@dataclass
class SceneLabels:
    """Images and their dense targets. uint8 pixels keep 30k 64 px images under 400 MB."""

    images: torch.Tensor  # [n, 3, S, S] uint8, the processor's geometry, not normalised
    patches: torch.Tensor  # [n, grid * grid] patch class, IGNORE for documents
    cells: (
        torch.Tensor
    )  # [n, grid * grid] 3x3 cell of the covering shape (else of the patch), IGNORE for documents
    counts: torch.Tensor  # [n] shape count, IGNORE for documents
    backgrounds: torch.Tensor  # [n] background index, IGNORE for documents
    text: torch.Tensor  # [n, lines, chars] character index (0 = blank), IGNORE for shape scenes
    charset: str  # index 0 is the blank
    skipped: int


def find_scenes(*, data: Path, image_folder: Path) -> Path | None:
    """``scenes.jsonl`` in the image folder or next to the data file, if the data set has one."""
    for folder in (Path(image_folder), Path(data).parent):
        if (folder / "scenes.jsonl").is_file():
            return folder / "scenes.jsonl"
    return None


def build_scene_labels(
    *, scenes: dict[str, Scene], names: Iterable[str], image_folder: Path, processor: ImageProcessor,
    patch_size: int, max_lines: int = 8, max_chars: int = 24,
) -> SceneLabels:  # fmt: skip
    """Load every image in ``names`` that has a scene and render its targets at the tower's patch grid."""
    size = processor.image_size
    grid = size // patch_size
    chosen = {name: scenes[name] for name in dict.fromkeys(names) if name in scenes}
    # the characters of the training documents only: held-out scenes in the same file must not shape the heads
    docs = [s for s in chosen.values() if isinstance(s, DocumentScene)]
    charset = "\0" + "".join(sorted({c for d in docs for line in d.lines() for c in line}))
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, torch.Tensor]] = []
    skipped = 0
    for name, scene in chosen.items():
        try:
            pixels = uint8_pixels(load_image(image_in_folder(Path(image_folder), name)), processor=processor)
        except ImageLoadError:
            skipped += 1
            continue
        rows.append((pixels, *_targets(scene, size=size, grid=grid, charset=charset,
                                       lines=max_lines, chars=max_chars)))  # fmt: skip
    if not rows:
        raise ValueError("stage 1: none of the training images has a scene description in scenes.jsonl")
    return SceneLabels(
        images=torch.stack([r[0] for r in rows]),
        patches=torch.stack([r[1] for r in rows]),
        cells=torch.stack([r[2] for r in rows]),
        counts=torch.tensor([r[3] for r in rows]),
        backgrounds=torch.tensor([r[4] for r in rows]),
        text=torch.stack([r[5] for r in rows]),
        charset=charset,
        skipped=skipped,
    )


def _targets(
    scene: Scene, *, size: int, grid: int, charset: str, lines: int, chars: int
) -> tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor]:
    no_text = torch.full((lines, chars), IGNORE)
    if isinstance(scene, ShapeScene):
        count = min(len(scene.shapes), MAX_COUNT)
        patches = _patch_labels(scene, size=size, grid=grid)
        cells = _cell_labels(scene, patches=patches, grid=grid)
        return patches, cells, count, _BACKGROUNDS.index(scene.background), no_text
    text = torch.zeros(lines, chars, dtype=torch.long)
    for row, line in enumerate(scene.lines()[:lines]):
        codes = [charset.index(c) for c in line[:chars]]
        text[row, : len(codes)] = torch.tensor(codes, dtype=torch.long)
    no_patches = torch.full((grid * grid,), IGNORE)
    return no_patches, no_patches, IGNORE, IGNORE, text


def _cell_labels(scene: ShapeScene, *, patches: torch.Tensor, grid: int) -> torch.Tensor:
    """[grid * grid] the GRID x GRID cell of the shape covering each patch, else the cell of the patch centre."""
    centre = (torch.arange(grid) + 0.5) * GRID / grid  # patch centres in cell units
    own = (centre.floor().long()[:, None] * GRID + centre.floor().long()[None, :]).flatten()
    cells = own.clone()
    for shape in scene.shapes:
        cls = patch_class(colour=shape.colour, kind=shape.kind, size=shape.size)
        cells[patches == cls] = shape.row * GRID + shape.col
    return cells


def _patch_labels(scene: ShapeScene, *, size: int, grid: int) -> torch.Tensor:
    """[grid * grid] the class of the shape covering most of each patch (>= MIN_COVER pixels), else 0."""
    label_map = Image.new("L", (scene.size, scene.size), 0)
    draw = ImageDraw.Draw(label_map)
    for shape in scene.shapes:
        draw_shape(draw, shape, size=scene.size, fill=patch_class(colour=shape.colour, kind=shape.kind,
                                                                  size=shape.size))  # fmt: skip
    if scene.size != size:
        label_map = label_map.resize((size, size), Image.Resampling.NEAREST)
    labels = torch.frombuffer(bytearray(label_map.tobytes()), dtype=torch.uint8).long().view(size, size)
    patch = size // grid
    blocks = labels[: grid * patch, : grid * patch].reshape(grid, patch, grid, patch).permute(0, 2, 1, 3)
    blocks = blocks.reshape(grid * grid, patch * patch)  # [patches, pixels]
    cover = F.one_hot(blocks, NUM_PATCH_CLASSES).sum(1)  # [patches, classes]
    cover[:, 0] = 0
    best = cover.max(1)
    return torch.where(best.values >= MIN_COVER, best.indices, torch.zeros_like(best.indices))


class SceneHeads(nn.Module):
    """Patch classifier, image-level count/background, and a line reader over the tower's tokens."""

    def __init__(
        self,
        *,
        dim: int,
        tokens: int,
        lines: int,
        chars: int,
        charset: int,
        heads: int = 4,
        where: bool = False,
    ) -> None:
        super().__init__()
        self.where = nn.Linear(dim, tokens) if where else None  # each token's own index on the patch grid
        self.patch = nn.Linear(dim, NUM_PATCH_CLASSES)
        self.cell = nn.Linear(dim, GRID * GRID)
        self.count = nn.Linear(dim, MAX_COUNT + 1)
        self.background = nn.Linear(dim, len(BACKGROUNDS))
        self.slots = nn.Parameter(torch.randn(lines * chars, dim) * 0.02)
        # without ``where`` the reader has its own position table, so the tower need not encode place
        self.token_position = None if where else nn.Parameter(torch.zeros(tokens, dim))
        self.read = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(2))
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        )
        self.char = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, charset))
        self.shape = (lines, chars)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """features [n, tokens, dim] -> logits: patches [n, tokens, C], count/background [n, K], text [n, L, W, V],
        where [n, tokens, tokens] (with ``where``)."""
        pooled = features.mean(1)
        keys = features if self.token_position is None else features + self.token_position
        query = self.slots.expand(features.shape[0], -1, -1)  # [n, lines * chars, dim]
        for attention in self.read:
            query = query + attention(query, keys, keys, need_weights=False)[0]
        query = query + self.mlp(query)
        text = self.char(query).view(features.shape[0], *self.shape, -1)
        out = {"patches": self.patch(features), "cells": self.cell(features), "count": self.count(pooled),
               "background": self.background(pooled), "text": text}  # fmt: skip
        if self.where is not None:
            out["where"] = self.where(features)
        return out


def scene_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the mean cross-entropies of the heads that have targets in this batch."""
    total = logits["patches"].new_zeros(())
    for key, logit in logits.items():
        target = targets[key]
        if (target != IGNORE).any():
            total = total + F.cross_entropy(logit.flatten(0, -2).float(), target.flatten(),
                                            ignore_index=IGNORE)  # fmt: skip
    return total


def pretrain_vision_on_scenes(
    *, vision: VisionTower, labels: SceneLabels, processor: ImageProcessor, minutes: float,
    max_steps: int | None = None, batch_size: int, lr: float, weight_decay: float, seed: int, where: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, float]:  # fmt: skip
    """Train ``vision`` (a VisionEncoder) on the dense targets for ``minutes`` (or exactly ``max_steps``);
    ``where`` adds the per-token position objective (module docstring)."""
    torch.manual_seed(seed)
    lines, chars = labels.text.shape[1:]
    heads = SceneHeads(dim=vision.hidden_size, tokens=labels.patches.shape[1], lines=lines, chars=chars,
                       charset=len(labels.charset), where=where)  # fmt: skip
    generator = torch.Generator().manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(len(labels.images), (batch_size,), generator=generator)
        pixels = normalise(labels.images[idx], processor=processor)
        return scene_loss(heads(vision(pixels)), _batch_targets(labels, idx))

    # a short warmup: the reader's attention is unstable at full LR
    report = train_tower(vision=vision, heads=heads, batch_loss=batch_loss, minutes=minutes, max_steps=max_steps,
                         lr=lr, weight_decay=weight_decay, log=log, label="stage 1 (scene labels)",
                         warmup_steps=50)  # fmt: skip
    return report | scene_accuracy(vision=vision, heads=heads, labels=labels, processor=processor)


def _batch_targets(labels: SceneLabels, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The targets of images ``idx``; "where" is each token's own index (used only by heads with ``where``)."""
    tokens = labels.patches.shape[1]
    return {"patches": labels.patches[idx], "cells": labels.cells[idx], "count": labels.counts[idx],
            "background": labels.backgrounds[idx], "text": labels.text[idx],
            "where": torch.arange(tokens).expand(len(idx), tokens)}  # fmt: skip


@torch.no_grad()
def scene_accuracy(
    *, vision: nn.Module, heads: SceneHeads, labels: SceneLabels, processor: ImageProcessor, limit: int = 512
) -> dict[str, float]:
    """Training-set accuracy of each head on the first ``limit`` images (a quick sanity figure for the log)."""
    pixels = normalise(labels.images[:limit], processor=processor)
    logits = heads(vision(pixels))
    targets = _batch_targets(labels, torch.arange(min(limit, len(labels.images))))
    out = {}
    for key, target in targets.items():
        if key not in logits:
            continue
        valid = target != IGNORE
        if valid.any():
            hits = logits[key].argmax(-1)[valid] == target[valid]
            out[f"{key}_accuracy"] = hits.float().mean().item()
    for key, blank in (("patches", 0), ("text", 0)):  # the part that matters: shapes and characters
        valid = (targets[key] != IGNORE) & (targets[key] != blank)
        if valid.any():
            hits = logits[key].argmax(-1)[valid] == targets[key][valid]
            out[f"{key}_foreground_accuracy"] = hits.float().mean().item()
    return out
