"""On-disk cache of a frozen vision tower's outputs, so each image is encoded once per run, not once per epoch.

An entry is the ``VisionEncoder`` output for one image (selected layer, CLS dropped or kept: what the
projector consumes), stored as ``<dir>/<encoder id>/<key[:2]>/<key>.safetensors`` where

* encoder id = SHA-256 of the tower's weights, its ``VisionConfig`` and the compute dtype, so a different
  or retrained tower, another feature layer or precision never reads stale features;
* key = SHA-256 of the preprocessed pixels and the preprocessing config.

Entries are written to a temporary file and renamed, so concurrent processes (DDP ranks) and crashes
never leave a partial entry. Only valid while the tower is frozen; the trainer enables it only then.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from vlmkit.cache.identity import config_digest, tensor_bytes, weights_digest
from vlmkit.models.io import save_file_atomic


def encoder_identity(encoder: nn.Module, *, config: dict[str, Any], dtype: torch.dtype) -> str:
    """SHA-256 over the tower's weights (the package's one weights digest), its config and the compute dtype."""
    return config_digest({"config": config, "dtype": str(dtype)}, weights_digest([encoder]))


class FeatureCache:
    """Maps preprocessed pixels [n, 3, S, S] to vision features [n, tokens, dim], encoding only misses."""

    def __init__(self, directory: str | Path, *, identity: str, preprocess: dict[str, Any]) -> None:
        self.root = Path(directory).expanduser() / identity[:32]
        self.preprocess = json.dumps(preprocess, sort_keys=True).encode()
        self.hits = 0
        self.misses = 0

    def key(self, pixels: torch.Tensor) -> str:
        """pixels [3, S, S] -> hex key."""
        digest = hashlib.sha256(self.preprocess)
        digest.update(f"{tuple(pixels.shape)}:{pixels.dtype}".encode())
        digest.update(tensor_bytes(pixels))
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def __call__(
        self,
        pixel_values: torch.Tensor,
        *,
        encode: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
    ) -> torch.Tensor:
        """pixel_values [n, 3, S, S] -> features [n, tokens, dim] on ``device``; ``encode`` runs once on the misses."""
        keys = [self.key(p) for p in pixel_values]
        found: dict[str, torch.Tensor] = {}
        for key in dict.fromkeys(keys):
            entry = self._read(key)
            if entry is not None:
                found[key] = entry
        # an image repeated within the batch is encoded once
        missing = {key: i for i, key in enumerate(keys) if key not in found}
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            with torch.no_grad():
                fresh = encode(pixel_values[list(missing.values())])
            for row, key in enumerate(missing):
                found[key] = fresh[row]
                self._write(key, fresh[row])
        return torch.stack([found[key].to(device) for key in keys])

    def _read(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["features"]
        except Exception:  # a damaged entry is recomputed and rewritten, never fatal
            return None

    def _write(self, key: str, features: torch.Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file_atomic({"features": features.detach().cpu().contiguous()}, path)
