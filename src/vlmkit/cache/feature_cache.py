"""Image-feature cache: projected features of images seen before, so a hit skips preprocessing, vision and projector.

Key = SHA-256 over (encoder identity, preprocessing config, image content). The image content is hashed as given:
the raw file bytes for paths and bytes (a path and its bytes share an entry; nothing is decoded on a hit), the
upright RGB pixels for PIL images. The encoder identity (``ModelIdentity`` over vision + projector) is a weights
stamp in memory and a weights content digest when a disk tier is used, so features from other weights are never
served - also after training steps, which change the stamp.

Values are ``[num_image_tokens, lm_dim]`` tensors on the model's device, in an LRU bounded in bytes. The optional
disk tier keeps one ``<key>.safetensors`` per image in a directory (optionally bounded too, oldest first out).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file

from vlmkit.models.io import save_file_atomic
from vlmkit.processing.image import ImageInput, load_image


@dataclass(frozen=True)
class ImageRef:
    """One input image, its content digest, and (for PIL inputs) the upright RGB image already made from it."""

    source: ImageInput
    digest: str
    rgb: Image.Image | None = None


def image_ref(source: ImageInput) -> ImageRef:
    """Hash an image input without decoding it when it is a path or bytes (a missing file falls through to
    ``load_image`` so the error names the path)."""
    if isinstance(source, bytes):
        return ImageRef(source=source, digest=_bytes_digest(source))
    if isinstance(source, str | os.PathLike):
        try:
            data = Path(os.fspath(source)).read_bytes()
        except OSError:
            load_image(source)  # raises ImageLoadError naming the path (missing, directory, no permission)
            raise
        return ImageRef(source=source, digest=_bytes_digest(data))
    rgb = load_image(source)  # upright RGB, exactly what preprocessing will see
    digest = hashlib.sha256(f"pixels:{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return ImageRef(source=source, digest=digest.hexdigest(), rgb=rgb)


def _bytes_digest(data: bytes) -> str:
    digest = hashlib.sha256(b"bytes:")
    digest.update(data)
    return digest.hexdigest()


def feature_key(*, image_digest: str, encoder: str, preprocess: str) -> str:
    """The cache key of one image under one encoder identity and one preprocessing config."""
    return hashlib.sha256(f"{encoder}|{preprocess}|{image_digest}".encode()).hexdigest()


class FeatureCache:
    """Byte-bounded LRU of image features with an optional safetensors disk tier. Thread-safe.

    ``max_bytes=0`` keeps nothing in memory (the disk tier, if any, still works).
    """

    def __init__(
        self, *, max_bytes: int, disk_dir: str | Path | None = None, disk_max_bytes: int | None = None
    ) -> None:
        if max_bytes < 0 or (disk_max_bytes is not None and disk_max_bytes < 0):
            raise ValueError(
                f"cache sizes must be >= 0, got max_bytes={max_bytes}, disk_max_bytes={disk_max_bytes}"
            )
        self.max_bytes = max_bytes
        self.disk_dir = Path(disk_dir).expanduser() if disk_dir is not None else None
        self.disk_max_bytes = disk_max_bytes
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._identity: str | None = None
        self._lock = threading.Lock()
        self._counts = {"memory_hits": 0, "disk_hits": 0, "misses": 0, "evictions": 0, "disk_writes": 0}
        self._disk: OrderedDict[str, int] = OrderedDict()  # key -> file bytes, oldest first
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            files = sorted(self.disk_dir.glob("*.safetensors"), key=lambda f: f.stat().st_mtime)
            self._disk.update((f.stem, f.stat().st_size) for f in files)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 or self.disk_dir is not None

    def bind(self, identity: str) -> None:
        """Entries are keyed by identity already; dropping the memory tier on a change just frees it sooner."""
        with self._lock:
            if identity != self._identity:
                self._memory.clear()
                self._bytes = 0
                self._identity = identity

    def get(self, key: str, *, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The features for ``key`` (memory first, then disk), or None; counts the hit or miss."""
        with self._lock:
            features = self._memory.get(key)
            if features is not None:
                self._memory.move_to_end(key)
                self._counts["memory_hits"] += 1
                return features if device is None else features.to(device)
        features = self._read_disk(key, device=device)
        with self._lock:
            self._counts["disk_hits" if features is not None else "misses"] += 1
        if features is not None:
            self._remember(key, features)
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        """Store ``features`` [tokens, dim] (pass a tensor that owns its memory: a slice would pin its batch)."""
        self._remember(key, features)
        if self.disk_dir is not None and key not in self._disk:
            self._write_disk(key, features)

    def _remember(self, key: str, features: torch.Tensor) -> None:
        size = features.nbytes
        with self._lock:
            if size > self.max_bytes:
                return
            old = self._memory.pop(key, None)
            self._bytes -= old.nbytes if old is not None else 0
            self._memory[key] = features
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._memory.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._counts["evictions"] += 1

    # ------------------------------------------------------------------------------------------- disk tier

    def _path(self, key: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / f"{key}.safetensors"

    def _read_disk(self, key: str, *, device: torch.device | str | None) -> torch.Tensor | None:
        if self.disk_dir is None or key not in self._disk:
            return None
        path = self._path(key)
        try:
            features = load_file(path, device=str(device) if device is not None else "cpu")["features"]
        except (OSError, KeyError, ValueError):  # removed or damaged by someone else: a miss
            with self._lock:
                self._disk.pop(key, None)
            return None
        with self._lock:
            self._disk.move_to_end(key)
        os.utime(path)  # recency for the oldest-first eviction of a later process
        return features

    def _write_disk(self, key: str, features: torch.Tensor) -> None:
        """Write aside, then rename: a reader never sees half a file."""
        path = self._path(key)
        save_file_atomic({"features": features.detach().contiguous().cpu()}, path, metadata={"key": key})
        with self._lock:
            self._disk[key] = path.stat().st_size
            self._counts["disk_writes"] += 1
            evict = self._disk_overflow()
        for old in evict:
            self._path(old).unlink(missing_ok=True)

    def _disk_overflow(self) -> list[str]:
        """Keys to delete (oldest first) so the disk tier fits ``disk_max_bytes``; called under the lock."""
        if self.disk_max_bytes is None:
            return []
        total, out = sum(self._disk.values()), []
        while total > self.disk_max_bytes and len(self._disk) > 1:
            key, size = self._disk.popitem(last=False)
            total -= size
            out.append(key)
        return out

    # ------------------------------------------------------------------------------------------- reporting

    def stats(self) -> dict[str, Any]:
        """Counters since creation (or ``clear``) and current occupancy."""
        with self._lock:
            counts = dict(self._counts)
            hits = counts["memory_hits"] + counts["disk_hits"]
            return counts | {
                "hits": hits,
                "lookups": hits + counts["misses"],
                "entries": len(self._memory),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "disk_entries": len(self._disk),
                "disk_bytes": sum(self._disk.values()),
            }

    def clear(self, *, disk: bool = False) -> None:
        """Forget the memory tier and reset the counters; ``disk=True`` also deletes this tier's files."""
        with self._lock:
            self._memory.clear()
            self._bytes = 0
            self._counts = dict.fromkeys(self._counts, 0)
            doomed = list(self._disk) if disk else []
            if disk:
                self._disk.clear()
        for key in doomed:
            self._path(key).unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._memory)

    def __contains__(self, key: object) -> bool:
        return key in self._memory
