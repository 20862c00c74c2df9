"""Projector registry: adding a projector is one class plus one ``@register_projector`` line."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vlmkit.config import ProjectorConfig

PROJECTORS: dict[str, type[Projector]] = {}


class Projector(nn.Module):
    """Maps [n, tokens_in, in_dim] visual tokens to [n, tokens_out, out_dim] LM embeddings.

    A ``text_conditioned`` projector also reads the prompt: ``forward(features, text=..., text_mask=...)``.
    """

    text_conditioned = False

    def __init__(self, *, config: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.config = config
        self.in_dim = in_dim
        self.out_dim = out_dim

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens


def register_projector(name: str) -> Callable[[type[Projector]], type[Projector]]:
    def decorator(cls: type[Projector]) -> type[Projector]:
        if name in PROJECTORS:
            raise ValueError(f"projector {name!r} is already registered")
        PROJECTORS[name] = cls
        return cls

    return decorator


def build_projector(*, config: ProjectorConfig, in_dim: int, out_dim: int) -> Projector:
    if config.type not in PROJECTORS:
        raise ValueError(f"unknown projector type {config.type!r}; known: {', '.join(sorted(PROJECTORS))}")
    return PROJECTORS[config.type](config=config, in_dim=in_dim, out_dim=out_dim)
