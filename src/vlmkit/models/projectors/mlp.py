"""Linear (LLaVA-1) and MLP (LLaVA-1.5 ``mlp2x_gelu``) projectors."""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import ProjectorConfig
from vlmkit.models.projectors.registry import Projector, register_projector


@register_projector("linear")
class LinearProjector(Projector):
    def __init__(self, *, config: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(config=config, in_dim=in_dim, out_dim=out_dim)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, tokens, in_dim] -> [n, tokens, out_dim]."""
        return self.linear(features)


@register_projector("mlp")
class MLPProjector(Projector):
    """``depth`` Linear layers with GELU between them. Names ``linear_1`` … match llava-hf for depth 2."""

    def __init__(self, *, config: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(config=config, in_dim=in_dim, out_dim=out_dim)
        self.depth = config.depth
        self.act = nn.GELU()
        for i in range(config.depth):
            setattr(self, f"linear_{i + 1}", nn.Linear(in_dim if i == 0 else out_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, tokens, in_dim] -> [n, tokens, out_dim]."""
        x = features
        for i in range(self.depth):
            if i:
                x = self.act(x)
            x = getattr(self, f"linear_{i + 1}")(x)
        return x
