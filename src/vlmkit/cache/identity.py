"""Who computed a cached value: fingerprints of model weights and of the inputs' preprocessing.

Two levels, because hashing weights is expensive and comparing them must be cheap:

* ``weights_stamp`` - the address, version counter, dtype, device and shape of every parameter and buffer. It
  changes whenever weights are replaced (``load_state_dict`` into new tensors, ``.to()``) or modified in place by
  autograd-visible ops (optimizer steps bump the version counter). About 1 us per tensor: checked every request.
  Writes through ``tensor.data`` bypass the version counter: call ``clear()`` on the caches after such edits.
* ``weights_digest`` - SHA-256 of the weights' bytes: the same across processes, so it names entries on disk.
  Computed only for the disk tier, and again only when the stamp changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def _tensors(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for module in modules:
        for sub in module.modules():  # cheaper than named_parameters(): no name strings built
            out.extend(t for t in sub._parameters.values() if t is not None)
            out.extend(t for t in sub._buffers.values() if t is not None)
    return out


def weights_stamp(modules: Iterable[nn.Module]) -> int:
    """A cheap in-process identity of the weights of ``modules`` (see module docstring for what it sees)."""
    return hash(tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in _tensors(modules)))


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw bytes of any dtype (bf16 has no NumPy equivalent, so view it as bytes first)."""
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def weights_digest(modules: Iterable[nn.Module]) -> str:
    """SHA-256 over the dtype, shape and bytes of every parameter and buffer, in module order."""
    digest = hashlib.sha256()
    for tensor in _tensors(modules):
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy().data)  # a memoryview: no extra copy
    return digest.hexdigest()


def config_digest(*parts: Any) -> str:
    """SHA-256 of JSON-serialisable settings (sorted keys), e.g. preprocessing and encoder configs."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ModelIdentity:
    """Caches ``weights_digest`` against ``weights_stamp``: the digest is recomputed only after the weights change."""

    def __init__(self, modules: Iterable[nn.Module], *, settings: Any) -> None:
        self.modules = list(modules)
        self.settings = config_digest(settings)
        self._stamp: int | None = None
        self._digest: str | None = None

    def stamp(self) -> str:
        """In-process identity: settings + weights stamp (cheap)."""
        return f"{self.settings}:{weights_stamp(self.modules):x}"

    def digest(self) -> str:
        """Cross-process identity: settings + weights content (hashes the weights when they changed)."""
        stamp = weights_stamp(self.modules)
        if stamp != self._stamp or self._digest is None:
            self._digest = hashlib.sha256(
                f"{self.settings}:{weights_digest(self.modules)}".encode()
            ).hexdigest()
            self._stamp = stamp
        return self._digest
