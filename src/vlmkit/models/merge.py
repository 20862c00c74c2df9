"""Splice projected image features into the text embeddings at their placeholder tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def image_token_mask(input_ids: torch.Tensor, *, image_token_id: int) -> torch.Tensor:
    """input_ids [batch, seq] -> bool mask [batch, seq] of image-token positions."""
    return input_ids == image_token_id


def merge_image_features(
    *,
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    image_features: torch.Tensor | Sequence[torch.Tensor] | None,
    image_token_id: int,
) -> torch.Tensor:
    """Scatter each image's features onto its placeholder span, in reading order.

    inputs_embeds [batch, seq, dim]; input_ids [batch, seq]; image_features [images, tokens, dim], or one
    [tokens_i, dim] per image when counts differ (AnyRes).
    Images are consumed row by row, left to right, so image k of the batch fills the k-th span.
    """
    mask = image_token_mask(input_ids, image_token_id=image_token_id)
    if image_features is not None and not isinstance(image_features, torch.Tensor):
        return _merge_variable(inputs_embeds=inputs_embeds, mask=mask, image_features=list(image_features))
    found = int(mask.sum())
    n_images = 0 if image_features is None else image_features.shape[0]
    per_image = 0 if image_features is None else image_features.shape[1]
    if found != n_images * per_image:
        spans = (
            f"{found // per_image} placeholders"
            if per_image and found % per_image == 0
            else f"{found} image tokens"
        )
        raise ValueError(
            f"placeholder/image mismatch: the input has {spans} but {n_images} images were given "
            f"({per_image} tokens per image)"
        )
    if n_images == 0 or image_features is None:
        return inputs_embeds
    flat = image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds.dtype)
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), flat)


def _merge_variable(
    *, inputs_embeds: torch.Tensor, mask: torch.Tensor, image_features: list[torch.Tensor]
) -> torch.Tensor:
    """``merge_image_features`` for images of different token counts (a list of [tokens_i, dim])."""
    found = int(mask.sum())
    counts = [int(f.shape[0]) for f in image_features]
    if found != sum(counts):
        raise ValueError(
            f"placeholder/image mismatch: the input has {found} image tokens but the {len(counts)} images "
            f"given have {sum(counts)} ({', '.join(map(str, counts))} tokens)"
        )
    if not image_features:
        return inputs_embeds
    flat = torch.cat(image_features).to(inputs_embeds.dtype)
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), flat)
