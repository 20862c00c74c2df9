"""Projectors. Importing this package registers the built-in ones."""

from vlmkit.models.projectors import mlp, resampler  # noqa: F401  (registration side effect)
from vlmkit.models.projectors.registry import PROJECTORS, Projector, build_projector, register_projector

__all__ = ["PROJECTORS", "Projector", "build_projector", "register_projector"]
