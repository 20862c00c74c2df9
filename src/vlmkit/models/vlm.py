"""The composed model: vision encoder -> projector -> causal LM, joined at the image placeholders."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmkit.config import VLMConfig
from vlmkit.models.language import build_language_model
from vlmkit.models.merge import merge_image_features
from vlmkit.models.projectors import build_projector
from vlmkit.models.vision import VisionEncoder


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [batch, seq] -> position_ids [batch, seq] that start at each row's first real token.

    A left-padded row then scores exactly like the row alone; right padding gives plain 0..seq-1, as
    transformers does (pads' own positions are irrelevant: nothing attends to them).
    """
    leading_pads = (attention_mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)  # [batch, 1]
    steps = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (steps - leading_pads).clamp(min=0)


class VisionLanguageModel(nn.Module):
    """Three explicit sub-modules; parameter names are ``vision.*``, ``projector.*``, ``language_model.*``."""

    def __init__(
        self,
        *,
        config: VLMConfig,
        vision: VisionEncoder | None = None,
        language_model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.vision = vision if vision is not None else VisionEncoder(config=config.vision)
        self.language_model = (
            language_model if language_model is not None else build_language_model(config.language.hf_config)
        )
        lm_dim = self.language_model.get_input_embeddings().weight.shape[1]
        self.projector = build_projector(
            config=config.projector, in_dim=self.vision.hidden_size, out_dim=lm_dim
        )

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
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [images, 3, S, S] -> LM-space features [images, num_image_tokens, lm_dim]."""
        features = self.vision(pixel_values.to(self.device))  # [images, vision_tokens, vision_dim]
        projector_dtype = next(self.projector.parameters()).dtype
        return self.projector(features.to(projector_dtype))

    def embed(
        self,
        *,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [batch, seq] (+ images) -> inputs_embeds [batch, seq, lm_dim] with images spliced in.

        Pass ``image_features`` (from ``encode_images``, e.g. a cache) instead of ``pixel_values`` to skip encoding.
        """
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.encode_images(pixel_values)
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
        return merge_image_features(
            inputs_embeds=embeds, input_ids=input_ids, image_features=image_features, image_token_id=image_id
        )

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **lm_kwargs: Any,
    ) -> Any:
        """input_ids [batch, seq], attention_mask [batch, seq], pixel_values [images, 3, S, S], labels [batch, seq].

        Returns the language model's output (``.logits`` [batch, seq, vocab], ``.loss`` when labels are given).
        Without explicit ``position_ids`` they are derived from the mask, as transformers' ``generate`` does.
        """
        device = self.device
        embeds = self.embed(
            input_ids=input_ids.to(device), pixel_values=pixel_values, image_features=image_features
        )
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
