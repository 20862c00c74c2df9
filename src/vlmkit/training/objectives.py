"""Training objectives: the summed next-token loss on answer tokens, and the optional auxiliary ``where``
objective on image tokens (each token names its grid cell through a fixed seeded readout)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.models.vlm import ImageFeatures, VisionLanguageModel, prompt_context
from vlmkit.processing.prompting import IGNORE_INDEX
from vlmkit.processing.tiling import TileLayout


class TokenLoss(nn.Module):
    """Wraps the VLM so DDP (or FSDP's root unit) sees one forward per micro-batch; returns the summed
    next-token loss.

    ``blank_images``: a micro-batch without images still runs the tower on one blank image (at zero weight).
    FSDP needs this for a sharded tower: every process must gather the same units in the same order.
    ``where_weight`` > 0 adds ``where_loss`` on the image tokens, weighted per target token so that after the
    trainer's division by the global target count it stands at ``where_weight`` x its mean.
    """

    def __init__(
        self, model: VisionLanguageModel, *, blank_images: bool = False, where_weight: float = 0.0
    ) -> None:
        super().__init__()
        self.model = model
        self.blank_images = blank_images
        self.where_weight = where_weight
        self.where_part: torch.Tensor | None = None  # the weighted where term inside the last returned loss
        self.where_mean: torch.Tensor | None = None  # its unweighted mean cross-entropy

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_layouts: list[TileLayout] | None = None,
    ) -> torch.Tensor:
        """input_ids/attention_mask/labels [batch, seq]; pixel_values [images, 3, S, S] or
        vision_features [images, vision_tokens, vision_dim] (cached tower output) -> scalar summed loss.

        AnyRes: pixel_values / vision_features hold every tile ([tiles, ...]) and ``image_layouts`` one per image."""
        if image_layouts is not None and self.where_weight > 0:
            raise ValueError(
                "the where objective reads a square grid per image; it does not apply to AnyRes tiles"
            )
        image_features: ImageFeatures | None = None
        blank: ImageFeatures | None = None
        if vision_features is not None and self.model.text_conditioned:  # projected in the model's embed
            image_features = vision_features
        elif vision_features is not None:
            projector = self.model.projector
            image_features = projector(vision_features.to(next(projector.parameters()).dtype))
            if self.model.tiling is not None:
                image_features = self.model.tiling(image_features, layouts=image_layouts)
        elif pixel_values is not None:
            image_features = self.model.encode_images(pixel_values, layouts=image_layouts)
        elif self.blank_images:  # before the LM, where a batch with images runs the tower
            size = self.model.config.vision.image_size
            blank = self.model.encode_images(torch.zeros((1, 3, size, size), device=input_ids.device),
                                             layouts=_blank_layout(self.model))  # fmt: skip
        # a text-conditioned projector reads the prompt only, never the answers it is trained to produce
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, image_features=image_features,
                            context_mask=prompt_context(labels), use_cache=False).logits  # fmt: skip
        loss = token_loss_sum(logits, labels=labels)
        self.where_part = self.where_mean = None
        if self.where_weight > 0 and isinstance(image_features, torch.Tensor):  # no AnyRes (checked above)
            self.where_mean = where_loss(image_features)
            targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
            self.where_part = self.where_weight * targets * self.where_mean
            loss = loss + self.where_part
        if blank is not None:  # AnyRes: one tensor per image
            parts = [blank] if isinstance(blank, torch.Tensor) else list(blank)
            loss = loss + 0.0 * torch.stack([b.float().sum() for b in parts]).sum()
        elif image_features is None and torch.is_grad_enabled():
            # text only: the projector (and a trainable tower) took no part. A zero link gives them zero
            # gradients, so every process reduces the same parameters (DDP without unused-parameter search),
            # and backward has a graph even when nothing else trains (projector stage)
            idle = [
                p
                for part in (self.model.projector, self.model.vision)
                for p in part.parameters()
                if p.requires_grad
            ]
            loss = loss + 0.0 * sum(p.sum() for p in idle) if idle else loss
        return loss


def _blank_layout(model: VisionLanguageModel) -> list[TileLayout] | None:
    """AnyRes: the one-view layout of a blank S x S image (None for a fixed-size model)."""
    if model.anyres is None:
        return None
    size = model.config.vision.image_size
    return [model.anyres.layout(height=size, width=size, tiled=False)]


def where_readout(*, dim: int, grid: int, device: torch.device) -> torch.Tensor:
    """A fixed [dim, 2 * grid] readout with orthonormal columns (seeded, so a resumed run gets the same one):
    no parameters to train, save or shard; the features learn to meet it."""
    if dim < 2 * grid:
        raise ValueError(f"where_weight needs image tokens of at least {2 * grid} dims, got {dim}")
    return _orthonormal(dim, 2 * grid).to(device)


@functools.lru_cache(maxsize=8)
def _orthonormal(rows: int, cols: int) -> torch.Tensor:
    """Made once per shape, not on every micro-batch."""
    basis, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)))
    return basis


def where_loss(features: torch.Tensor, *, temperature: float = 20.0) -> torch.Tensor:
    """features [images, tokens, dim], the image tokens in the tower's raster order on a square patch grid ->
    mean cross-entropy (fp32 scalar) of naming each token's row and column from its direction.

    The LM sees image tokens in one sequence with relative positions, so a token's column is its index modulo
    the grid width, which attention must work out; this makes the column (and row) part of the token itself.
    The readout is cosine to fixed directions at ``temperature``: the loss saturates once a modest share of
    the feature points the right way, so the content is not crowded out.
    """
    images, tokens, dim = features.shape
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"where_weight needs a square grid of image tokens per image, got {tokens} tokens")
    readout = where_readout(dim=dim, grid=grid, device=features.device)
    logits = F.normalize(features.float(), dim=-1) @ readout * temperature  # [images, tokens, 2 * grid]
    index = torch.arange(tokens, device=features.device)
    rows, cols = (index // grid).repeat(images), (index % grid).repeat(images)
    flat = logits.flatten(0, 1)
    return (F.cross_entropy(flat[:, :grid], rows) + F.cross_entropy(flat[:, grid:], cols)) / 2


def token_loss_sum(logits: torch.Tensor, *, labels: torch.Tensor) -> torch.Tensor:
    """logits [batch, seq, vocab], labels [batch, seq] -> sum of next-token cross-entropies (fp32 scalar)."""
    shifted = logits[:, :-1].flatten(0, 1).float()
    targets = labels[:, 1:].flatten().to(shifted.device)
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")
