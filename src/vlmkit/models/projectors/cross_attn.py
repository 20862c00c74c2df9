"""Text-conditioned cross-attention projector: the visual tokens attend to the prompt's text.

The tutorial's third projector: each visual token is a query, the prompt's text embeddings (the LM's own input
embeddings of the prompt tokens) are the keys and values, so the same image gives different LM tokens for
"what colour is it?" and "how many are there?". It is an MLP projector (LLaVA-1.5's ``mlp2x_gelu``) followed by
``num_layers`` pre-norm gated cross-attention layers (Flamingo's tanh gates, starting at zero): at
initialisation it *is* the MLP projector, and training opens the gates as far as the text helps.
One output token per visual token.

Only the prompt conditions the image: padding, image placeholders and (in training) answer tokens are masked
out of the keys, so a model trained on full conversations sees at inference exactly what it saw in training.
A learned null key/value lets a token attend to "no text" (and keeps a prompt without text well defined).
Because the projection depends on the prompt, the feature cache stores the tower's output and the projection
runs per request (``VisionLanguageModel.embed``); prompt-prefix KV reuse is off for such models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import ProjectorConfig
from vlmkit.models.projectors.mlp import MLPProjector
from vlmkit.models.projectors.registry import Projector, register_projector


class _GatedCrossAttention(nn.Module):
    """x + tanh(a) * attn(norm(x), norm(text)), then x + tanh(b) * ffn(norm(x)); a = b = 0 at init."""

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_query = nn.LayerNorm(dim)
        self.norm_text = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.null_kv = nn.Parameter(torch.zeros(2 * dim))  # the "no text" key and value
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.gate_ffn = nn.Parameter(torch.zeros(1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        return x.view(n, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # [n, heads, t, head_dim]

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """x [n, N, dim] visual tokens, text [n, T, dim], text_mask [n, T] (True = attend) -> [n, N, dim]."""
        n = x.shape[0]
        kv = torch.cat([self.null_kv.to(x.dtype).expand(n, 1, -1), self.kv(self.norm_text(text))], dim=1)
        k, v = kv.chunk(2, dim=-1)  # [n, 1 + T, dim] each
        mask = torch.cat([text_mask.new_ones(n, 1), text_mask], dim=1)[:, None, None, :]  # [n, 1, 1, 1 + T]
        attn = F.scaled_dot_product_attention(
            self._heads(self.q(self.norm_query(x))), self._heads(k), self._heads(v), attn_mask=mask
        )  # [n, heads, N, head_dim]
        x = x + torch.tanh(self.gate_attn) * self.out(attn.transpose(1, 2).reshape(x.shape))
        return x + torch.tanh(self.gate_ffn) * self.ffn(self.norm_ffn(x))


@register_projector("cross-attn")
class CrossAttentionProjector(Projector):
    text_conditioned = True

    def __init__(self, *, config: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(config=config, in_dim=in_dim, out_dim=out_dim)
        if out_dim % config.num_heads:
            raise ValueError(
                f"cross-attn projector: the LM width {out_dim} is not divisible by projector.num_heads="
                f"{config.num_heads}"
            )
        self.mlp = MLPProjector(config=config, in_dim=in_dim, out_dim=out_dim)
        self.layers = nn.ModuleList(
            _GatedCrossAttention(dim=out_dim, num_heads=config.num_heads) for _ in range(config.num_layers)
        )

    def forward(
        self,
        features: torch.Tensor,
        *,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """features [n, N, in_dim], text [n, T, out_dim] (the prompt's token embeddings), text_mask [n, T]
        -> [n, N, out_dim]. Without text (``text=None``) every token attends to the null key only."""
        x = self.mlp(features)
        if text is None:
            text = x.new_zeros(x.shape[0], 0, x.shape[-1])
            text_mask = torch.zeros(x.shape[0], 0, dtype=torch.bool, device=x.device)
        assert text_mask is not None
        for layer in self.layers:
            x = layer(x, text.to(x.dtype), text_mask)
        return x


def project_with_text(
    projector: Projector,
    features: torch.Tensor,
    *,
    embeds: torch.Tensor,
    is_image: torch.Tensor,
    context_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Project each image against the text of the row it sits in.

    features [images, N, vision_dim] (tower output, images in reading order); embeds [batch, seq, lm_dim] (the
    rows' token embeddings); is_image [batch, seq]; context_mask [batch, seq] (True = prompt text that may
    condition, e.g. attention mask & not an answer token; None = every token) -> [images, N, lm_dim].
    """
    per_image = projector.num_output_tokens(features.shape[1])
    counts = is_image.sum(dim=1)
    if bool((counts % per_image).any()) or int(counts.sum()) != features.shape[0] * per_image:
        raise ValueError(
            f"placeholder/image mismatch: the input has {int(counts.sum())} image tokens but "
            f"{features.shape[0]} images were given ({per_image} tokens per image)"
        )
    rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts // per_image)
    keep = ~is_image if context_mask is None else ~is_image & context_mask.to(is_image.device).bool()
    dtype = next(projector.parameters()).dtype
    return projector(features.to(dtype), text=embeds[rows].to(dtype), text_mask=keep[rows])
