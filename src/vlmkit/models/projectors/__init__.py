"""Projectors. Importing this package registers the built-in ones."""

from vlmkit.models.projectors import cross_attn, mlp, pixel_shuffle, resampler  # noqa: F401  (registration)
from vlmkit.models.projectors.cross_attn import project_with_text
from vlmkit.models.projectors.registry import PROJECTORS, Projector, build_projector, register_projector

__all__ = ["PROJECTORS", "Projector", "build_projector", "project_with_text", "register_projector"]
