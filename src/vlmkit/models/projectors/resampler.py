"""Perceiver-style resampler: M learned queries cross-attend to the visual tokens (Flamingo / BLIP-2 idea).

The output token count is ``num_queries`` whatever the input count, so a 672px image costs the LM the
same as a 224px one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import ProjectorConfig
from vlmkit.models.projectors.registry import Projector, register_projector


class _CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention (queries attend to [media; queries], as in Flamingo) + GELU MLP."""

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"resampler width {dim} is not divisible by projector.num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_query = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        return x.view(n, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # [n, heads, t, head_dim]

    def forward(self, queries: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        """queries [n, M, dim], media [n, N, dim] -> [n, M, dim]."""
        q_in = self.norm_query(queries)
        context = torch.cat([self.norm_media(media), q_in], dim=1)  # [n, N + M, dim]
        k, v = self.kv(context).chunk(2, dim=-1)
        attn = F.scaled_dot_product_attention(self._heads(self.q(q_in)), self._heads(k), self._heads(v))
        n, _, m, _ = attn.shape
        queries = queries + self.out(attn.transpose(1, 2).reshape(n, m, -1))
        return queries + self.mlp(self.norm_mlp(queries))


@register_projector("resampler")
class ResamplerProjector(Projector):
    def __init__(self, *, config: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(config=config, in_dim=in_dim, out_dim=out_dim)
        # attention runs at the vision width (cheaper than the LM width), then one Linear maps to the LM
        self.queries = nn.Parameter(torch.randn(config.num_queries, in_dim) * in_dim**-0.5)
        self.blocks = nn.ModuleList(
            _CrossAttentionBlock(dim=in_dim, num_heads=config.num_heads) for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(in_dim)
        self.output = nn.Linear(in_dim, out_dim)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.config.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, N, in_dim] -> [n, num_queries, out_dim]."""
        queries = self.queries.to(features.dtype).expand(features.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, features)
        return self.output(self.norm(queries))
