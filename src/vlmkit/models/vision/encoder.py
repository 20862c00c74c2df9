"""Vision tower: any transformers vision model, read out at one hidden layer as a sequence of tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.models.vision.stem import install_conv_stem

# model_type -> number of leading non-patch tokens (CLS, registers) that select="patch" drops
_PREFIX_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0, "dinov2": 1, "vit": 1}
# full-model configs whose vision half is what we want (CLIP/SigLIP checkpoints carry text towers too)
_VISION_SUBCONFIG = {"clip": "vision_config", "siglip": "vision_config"}
SUPPORTED = tuple(_PREFIX_TOKENS)


def vision_hf_config(hf_config: dict[str, Any]):
    """Instantiate a transformers config from its dict, keeping only the vision half of dual-tower models."""
    from transformers import AutoConfig

    model_type = hf_config.get("model_type")
    if model_type in _VISION_SUBCONFIG:
        hf_config = dict(hf_config[_VISION_SUBCONFIG[model_type]])
        hf_config["model_type"] = f"{model_type}_vision_model"
        model_type = hf_config["model_type"]
    if model_type not in _PREFIX_TOKENS:
        raise ValueError(
            f"unsupported vision tower model_type {model_type!r}; supported: {', '.join(SUPPORTED)}"
        )
    data = {k: v for k, v in hf_config.items() if k != "model_type"}
    return AutoConfig.for_model(model_type, **data)


class VisionEncoder(nn.Module):
    """Wraps a transformers vision model; ``forward`` returns the selected layer's tokens."""

    def __init__(self, *, config: VisionConfig, model: nn.Module | None = None) -> None:
        super().__init__()
        from transformers import AutoModel

        hf_config = vision_hf_config(config.hf_config)
        self.config = config
        self.model = model if model is not None else AutoModel.from_config(hf_config, trust_remote_code=False)
        self.model_type = hf_config.model_type
        self.hidden_size: int = hf_config.hidden_size
        self.patch_size: int = hf_config.patch_size
        self.native_size: int = hf_config.image_size
        self.num_prefix = _PREFIX_TOKENS[self.model_type] + int(
            getattr(hf_config, "num_register_tokens", 0) or 0
        )
        self._check_layer(hf_config.num_hidden_layers)
        if config.conv_stem:
            install_conv_stem(self.model, channels=tuple(config.conv_stem), patch_size=self.patch_size,
                              hidden_size=self.hidden_size)  # fmt: skip

    def _check_layer(self, num_layers: int) -> None:
        layer = self.config.feature_layer
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"vision.feature_layer={layer} is out of range for a tower with {num_layers} layers "
                f"(valid: {-(num_layers + 1)}..{num_layers})"
            )

    @property
    def num_tokens(self) -> int:
        """Tokens per image after selection, at the configured runtime image size."""
        patches = (self.config.image_size // self.patch_size) ** 2
        return patches + (self.num_prefix if self.config.select == "full" else 0)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, S, S] -> features [n, tokens, hidden]."""
        kwargs: dict[str, Any] = {"output_hidden_states": True, "return_dict": True}
        if self.model_type != "dinov2" and pixel_values.shape[-1] != self.native_size:
            # CLIP/SigLIP keep a fixed grid of position embeddings; DINOv2 always interpolates
            kwargs["interpolate_pos_encoding"] = True
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), **kwargs)
        features = out.hidden_states[self.config.feature_layer]  # [n, prefix + patches, hidden]
        if self.config.select == "patch":
            features = features[:, self.num_prefix :]
        return features
