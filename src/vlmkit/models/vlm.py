"""The composed model: vision encoder -> projector -> causal LM, joined at the image placeholders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import torch
from torch import nn

from vlmkit.config import VLMConfig
from vlmkit.models.language import build_language_model
from vlmkit.models.language.protocols import LanguageModel
from vlmkit.models.merge import merge_image_features
from vlmkit.models.projectors import build_projector, project_with_text
from vlmkit.models.projectors.registry import Projector
from vlmkit.models.tiling import TilePacker
from vlmkit.models.vision import build_vision_encoder
from vlmkit.models.vision.towers import VisionTower
from vlmkit.processing.prompting import IGNORE_INDEX
from vlmkit.processing.tiling import AnyRes, TileLayout

# image features: [images, tokens, dim] (fixed size) or one [tokens_i, dim] per image (AnyRes)
ImageFeatures = torch.Tensor | Sequence[torch.Tensor]


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [batch, seq] -> position_ids [batch, seq] that start at each row's first real token.

    A left-padded row then scores exactly like the row alone; right padding gives plain 0..seq-1, as
    transformers does (pads' own positions are irrelevant: nothing attends to them).
    """
    leading_pads = (attention_mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)  # [batch, 1]
    steps = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (steps - leading_pads).clamp(min=0)


def prompt_context(labels: torch.Tensor) -> torch.Tensor:
    """labels [batch, seq] -> [batch, seq] True at the tokens a text-conditioned projector may read in training:
    not an answer token and before the row's last answer, i.e. the prompt as it was when that answer was
    generated (earlier answers are left out too: they are trained on). A row without answers: every token."""
    answer = labels != IGNORE_INDEX
    steps = torch.arange(labels.shape[1], device=labels.device)
    last = torch.where(answer, steps, -1).max(dim=1, keepdim=True).values  # [batch, 1]; -1 = no answer
    return ~answer & ((steps < last) | (last < 0))


def _prompt_mask(
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    extra: torch.Tensor | None,
) -> torch.Tensor:
    """[batch, seq] True at real prompt tokens: attended, in ``prompt_context`` of the labels, in ``extra``."""
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    for part in (attention_mask, None if labels is None else prompt_context(labels), extra):
        if part is not None:
            mask = mask & part.to(mask.device).bool()
    return mask


class VisionLanguageModel(nn.Module):
    """Three explicit sub-modules; parameter names are ``vision.*``, ``projector.*``, ``language_model.*``."""

    # declared so that type checkers see them, not ``nn.Module.__getattr__``'s ``Tensor | Module``
    config: VLMConfig
    vision: VisionTower
    projector: Projector
    language_model: LanguageModel
    tiling: TilePacker | None

    def __init__(
        self,
        *,
        config: VLMConfig,
        vision: VisionTower | None = None,
        language_model: LanguageModel | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.vision = vision if vision is not None else build_vision_encoder(config=config.vision)
        self.language_model = (
            language_model if language_model is not None else build_language_model(config.language.hf_config)
        )
        lm_dim = self.language_model.get_input_embeddings().weight.shape[1]
        self.projector = build_projector(
            config=config.projector, in_dim=self.vision.hidden_size, out_dim=lm_dim
        )
        self.tiling = self._tile_packer(lm_dim=lm_dim) if config.vision.tiling is not None else None
        if self.tiling is not None and self.text_conditioned:
            raise ValueError(f"AnyRes tiling does not combine with the text-conditioned {config.projector.type!r} "
                             "projector (it packs projected tiles; use a fixed resolution)")  # fmt: skip

    def _tile_packer(self, *, lm_dim: int) -> TilePacker:
        anyres = AnyRes.from_vision_config(self.config.vision, patch_size=self.vision.patch_size)
        per_tile = self.vision.num_tokens
        if per_tile != anyres.side**2 or self.projector.num_output_tokens(per_tile) != per_tile:
            raise ValueError(
                f"AnyRes tiling needs one token per patch of a {anyres.side}x{anyres.side} grid through the "
                f"projector; this tower gives {per_tile} (select={self.config.vision.select!r}) and the "
                f"{self.config.projector.type!r} projector {self.projector.num_output_tokens(per_tile)}"
            )
        return TilePacker(anyres=anyres, lm_dim=lm_dim)

    @property
    def anyres(self) -> AnyRes | None:
        """The tiling geometry when the model tiles images (AnyRes), else None."""
        return self.tiling.anyres if self.tiling is not None else None

    def image_layouts(self, image_sizes: Sequence[Sequence[int]], *, tiled: Sequence[bool] | None = None
                      ) -> list[TileLayout]:  # fmt: skip
        """(height, width) per image (+ whether each is tiled) -> its AnyRes layout."""
        if self.anyres is None:
            raise ValueError("image layouts exist only for a model with AnyRes tiling")
        flags = tiled if tiled is not None else [True] * len(image_sizes)
        return [self.anyres.layout(height=int(h), width=int(w), tiled=t)
                for (h, w), t in zip(image_sizes, flags, strict=True)]  # fmt: skip

    @property
    def image_token_id(self) -> int:
        token_id = self.config.prompt.image_token_id
        if token_id is None:
            raise ValueError("config.prompt.image_token_id is not set: the tokenizer has no image token yet")
        return token_id

    @property
    def num_image_tokens(self) -> int:
        """LM tokens each image occupies (the placeholder expands to this many image tokens)."""
        return self.projector.num_output_tokens(self.vision.num_tokens)

    @property
    def text_conditioned(self) -> bool:
        """True when the projector reads the prompt: ``encode_images`` then returns the tower's output (what the
        feature caches keep) and ``embed`` projects each image against its own row's prompt text."""
        return self.projector.text_conditioned

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    @overload
    def encode_images(self, pixel_values: torch.Tensor, *, layouts: None = None) -> torch.Tensor: ...

    @overload
    def encode_images(
        self, pixel_values: torch.Tensor, *, layouts: Sequence[TileLayout]
    ) -> list[torch.Tensor]: ...

    def encode_images(
        self, pixel_values: torch.Tensor, *, layouts: Sequence[TileLayout] | None = None
    ) -> ImageFeatures:
        """pixel_values [images, 3, S, S] -> LM-space features [images, num_image_tokens, lm_dim].

        With AnyRes tiling: pixel_values [all tiles, 3, S, S] (per image its base view, then its tiles) and one
        layout per image -> a list of [tokens_i, lm_dim].
        """
        if (self.tiling is None) != (layouts is None):
            raise ValueError("tile layouts are needed exactly when the model tiles images (AnyRes)")
        features = self.vision(pixel_values.to(self.device))  # [images or tiles, vision_tokens, vision_dim]
        projector_dtype = next(self.projector.parameters()).dtype
        # a text-conditioned projector (cross-attn) runs in ``embed``, where the prompt is known
        projected = features if self.text_conditioned else self.projector(features.to(projector_dtype))
        return projected if self.tiling is None else self.tiling(projected, layouts=layouts)

    def embed(
        self,
        *,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: ImageFeatures | None = None,
        image_layouts: Sequence[TileLayout] | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [batch, seq] (+ images) -> inputs_embeds [batch, seq, lm_dim] with images spliced in.

        ``context_mask`` [batch, seq]: the prompt tokens a text-conditioned projector may read (True; padding
        and answer tokens False); None = every non-image token.

        Pass ``image_features`` (from ``encode_images``, e.g. a cache) instead of ``pixel_values`` to skip encoding;
        ``image_layouts`` go with ``pixel_values`` of an AnyRes model.
        """
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.encode_images(pixel_values, layouts=image_layouts)
        image_id = self.config.prompt.image_token_id
        is_image = (
            input_ids == image_id if image_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        )
        # image ids may lie past the LM vocabulary (as in llava-hf); their rows are overwritten anyway
        safe_ids = input_ids.masked_fill(is_image, 0)
        embeds = self.language_model.get_input_embeddings()(safe_ids)
        if image_id is None:
            if image_features is not None:
                raise ValueError("images were given but the model has no image token configured")
            return embeds
        if self.text_conditioned and image_features is not None:
            if not isinstance(image_features, torch.Tensor):  # one tensor per image: AnyRes tiles
                raise ValueError("a text-conditioned projector does not take AnyRes tiled images")
            image_features = project_with_text(self.projector, image_features, embeds=embeds, is_image=is_image,
                                               context_mask=context_mask)  # fmt: skip
        return merge_image_features(
            inputs_embeds=embeds, input_ids=input_ids, image_features=image_features, image_token_id=image_id
        )

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: ImageFeatures | None = None,
        image_layouts: Sequence[TileLayout] | None = None,
        labels: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        **lm_kwargs: Any,
    ) -> Any:
        """input_ids [batch, seq], attention_mask [batch, seq], pixel_values [images, 3, S, S], labels [batch, seq].

        An AnyRes model takes pixel_values [all tiles, 3, S, S] with ``image_layouts`` (one per image).

        Returns the language model's output (``.logits`` [batch, seq, vocab], ``.loss`` when labels are given).
        Without explicit ``position_ids`` they are derived from the mask, as transformers' ``generate`` does.
        A text-conditioned projector reads the unpadded tokens that are not answers (``labels`` of -100) and,
        if given, in ``context_mask`` [batch, seq].
        """
        device = self.device
        if self.text_conditioned:
            context_mask = _prompt_mask(
                input_ids, attention_mask=attention_mask, labels=labels, extra=context_mask
            )
        embeds = self.embed(input_ids=input_ids.to(device), pixel_values=pixel_values,
                            image_features=image_features, image_layouts=image_layouts,
                            context_mask=context_mask)  # fmt: skip
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
            if (
                "position_ids" not in lm_kwargs
                and "past_key_values" not in lm_kwargs
                and "cache" not in lm_kwargs
            ):
                lm_kwargs["position_ids"] = padded_positions(attention_mask)
        if labels is not None:
            labels = labels.to(device)
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **lm_kwargs
        )
