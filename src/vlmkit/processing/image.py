"""Image loading and preprocessing for vision towers (Pillow + NumPy + torch, no torchvision).

``load_image`` turns a path, raw bytes or a PIL image into an upright 8-bit RGB image and reports every
failure (missing file, corrupt or truncated data, oversized image) as one ``ImageLoadError`` that names
the source. ``ImageProcessor`` turns RGB images into normalised ``[n, 3, S, S]`` float32 tensors:

* ``crop``   - shortest edge to S, centre crop; bit-identical to transformers' ``CLIPImageProcessor``
  (PIL backend).
* ``resize`` - squash to S x S; bit-identical to transformers' ``SiglipImageProcessor`` (PIL backend).
* ``pad``    - LLaVA's ``expand2square`` (letterbox with the mean colour), then resize to S x S.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmkit.config import RESIZE_MODES, VisionConfig

__all__ = ["ImageInput", "ImageLoadError", "ImageProcessor", "load_image"]

ImageInput = str | os.PathLike | bytes | Image.Image

# Exceptions Pillow's decoders raise on corrupt or truncated data (besides OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the source and the problem."""


# ---------------------------------------------------------------------------------------------- loading


def load_image(source: ImageInput, *, max_pixels: int | None = None) -> Image.Image:
    """Load ``source`` as an upright (EXIF-transposed) 8-bit RGB image.

    ``max_pixels`` is checked against the header size before any pixel data is decoded. It can only
    tighten Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``), which is always enforced.
    """
    desc = _describe(source)
    if isinstance(source, Image.Image):
        return _finish(source, desc=desc, max_pixels=max_pixels)
    if isinstance(source, bytes):
        return _open_and_finish(io.BytesIO(source), desc=desc, max_pixels=max_pixels)
    if isinstance(source, str | os.PathLike):
        path = Path(os.fspath(source))
        if path.is_dir():
            raise ImageLoadError(f"{desc}: is a directory, not an image file")
        return _open_and_finish(path, desc=desc, max_pixels=max_pixels)
    raise TypeError(f"expected a path, bytes or PIL.Image.Image, got {type(source).__name__}")


def _describe(source: Any) -> str:
    if isinstance(source, bytes):
        return f"<bytes, {len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL.Image mode={source.mode} size={source.width}x{source.height}>"
    if isinstance(source, str | os.PathLike):
        return str(os.fspath(source))
    return repr(source)


def _open_and_finish(fp: Path | io.BytesIO, *, desc: str, max_pixels: int | None) -> Image.Image:
    try:
        with _bomb_warnings_as_errors():
            image = Image.open(fp)  # lazy: reads the header only
    except FileNotFoundError:
        raise ImageLoadError(f"{desc}: file not found") from None
    except PermissionError:
        raise ImageLoadError(f"{desc}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{desc}: not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{desc}: refused as a possible decompression bomb ({exc})") from None
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"{desc}: cannot read image header ({exc})") from exc
    with image:
        return _finish(image, desc=desc, max_pixels=max_pixels)


@contextlib.contextmanager
def _bomb_warnings_as_errors() -> Iterator[None]:
    """Turn Pillow's DecompressionBombWarning into an exception so it cannot slip through as a log line.

    ``catch_warnings`` swaps process-global filters (not thread-safe before Python 3.14); the window is
    only the header read / decode of one image.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _finish(image: Image.Image, *, desc: str, max_pixels: int | None) -> Image.Image:
    """Size check (header only), full decode, EXIF orientation, RGB conversion."""
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"{desc}: image has zero size ({image.width}x{image.height})")
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageLoadError(
            f"{desc}: {image.width}x{image.height} = {image.width * image.height} pixels "
            f"exceeds max_pixels={max_pixels}"
        )
    try:
        with _bomb_warnings_as_errors():
            image.load()  # force the decode here so truncation surfaces as ImageLoadError
            upright = ImageOps.exif_transpose(image)
            return _to_rgb(upright)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{desc}: refused as a possible decompression bomb ({exc})") from None
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"{desc}: corrupt, truncated or unsupported image data ({exc})") from exc


# ------------------------------------------------------------------------------------- mode conversion


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # Pillow's own convert() clips >255 to white; rescale the real range instead.
        return _high_depth_to_l(image).convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float single-channel image onto 0..255 (mode L)."""
    values = np.nan_to_num(np.asarray(image).astype(np.float64))
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0  # float images in [0, 1]
    elif image.mode == "F" and lo >= 0.0 and hi <= 255.0:
        scaled = values  # float images already on the 8-bit scale
    elif image.mode != "F" and lo >= 0.0 and hi <= 65535.0:
        # "I;16*" and "I" (how Pillow stores 16-bit samples): 65535 -> 255 exactly.
        scaled = values / 257.0
    else:
        # Values outside any known sample range: stretch what is there.
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


# -------------------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class ImageProcessor:
    """Turns images into normalised ``[n, 3, image_size, image_size]`` float32 tensors."""

    image_size: int
    image_mean: tuple[float, ...]  # 3 values (checked)
    image_std: tuple[float, ...]
    resize_mode: str = "crop"  # "resize" | "pad" | "crop"
    resample: int = Image.Resampling.BICUBIC

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        mean = tuple(float(x) for x in self.image_mean)
        std = tuple(float(x) for x in self.image_std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {mean} and {std}")
        if not all(s > 0 for s in std):
            raise ValueError(f"image_std must be positive, got {std}")
        # Normalised plain types keep the processor hashable and to_dict() stable for cache keys.
        object.__setattr__(self, "image_mean", mean)
        object.__setattr__(self, "image_std", std)
        object.__setattr__(self, "resample", int(Image.Resampling(self.resample)))

    @classmethod
    def from_vision_config(cls, config: VisionConfig) -> ImageProcessor:
        return cls(
            image_size=config.image_size,
            image_mean=tuple(config.image_mean),
            image_std=tuple(config.image_std),
            resize_mode=config.resize_mode,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageProcessor:
        return cls(**{**data, "image_mean": tuple(data["image_mean"]), "image_std": tuple(data["image_std"])})

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resize_mode": self.resize_mode,
            "resample": self.resample,
        }

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        """Letterbox fill for ``pad`` mode, as LLaVA computes it (truncation, not rounding)."""
        red, green, blue = (int(x * 255) for x in self.image_mean)
        return red, green, blue

    def __call__(self, images: Sequence[ImageInput], *, max_pixels: int | None = None) -> torch.Tensor:
        """Load and preprocess a batch; an empty batch gives shape ``[0, 3, S, S]``."""
        if isinstance(images, str | bytes | os.PathLike | Image.Image):
            raise TypeError("ImageProcessor expects a sequence of images; wrap a single image in a list")
        size = self.image_size
        if len(images) == 0:
            return torch.empty((0, 3, size, size), dtype=torch.float32)
        return torch.stack([self.preprocess_one(load_image(im, max_pixels=max_pixels)) for im in images])

    def preprocess_one(self, image: Image.Image) -> torch.Tensor:
        """One image -> ``[3, S, S]`` float32."""
        rgb = image if image.mode == "RGB" else _to_rgb(image)
        if self.resize_mode == "crop":
            pixels = self._resize_and_crop(rgb)
        elif self.resize_mode == "pad":
            pixels = np.asarray(self._square_resize(_expand_to_square(rgb, fill=self.pad_colour)))
        else:
            pixels = np.asarray(self._square_resize(rgb))
        return torch.from_numpy(np.ascontiguousarray(self._normalise(pixels).transpose(2, 0, 1)))

    def fit(self, image: Image.Image) -> Image.Image:
        """The ``S x S`` RGB image the tower sees (resized, cropped or letterboxed by ``resize_mode``).

        ``preprocess_one(fit(x))`` equals ``preprocess_one(x)`` bit for bit (each step is then a no-op), so a
        server can shrink an image at decode time and never hold the full-resolution pixels.
        """
        rgb = image if image.mode == "RGB" else _to_rgb(image)
        if self.resize_mode == "crop":
            return Image.fromarray(np.ascontiguousarray(self._resize_and_crop(rgb)))
        if self.resize_mode == "pad":
            return self._square_resize(_expand_to_square(rgb, fill=self.pad_colour))
        return self._square_resize(rgb)

    def _square_resize(self, image: Image.Image) -> Image.Image:
        return image.resize((self.image_size, self.image_size), resample=self.resample)

    def _resize_and_crop(self, image: Image.Image) -> np.ndarray:
        size = self.image_size
        height, width = _shortest_edge_size(height=image.height, width=image.width, size=size)
        pixels = np.asarray(image.resize((width, height), resample=self.resample))
        # Same offsets as transformers' center_crop: floor of half the excess.
        top, left = (height - size) // 2, (width - size) // 2
        return pixels[top : top + size, left : left + size]

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> normalised float32 [H, W, 3] (e.g. AnyRes tiles already at S x S)."""
        return self._normalise(pixels)

    def _normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 HWC -> float32 HWC, with transformers' exact arithmetic (x * (1/255) in float64, then
        float32 ``(x - mean) / std``) so results are bit-identical to its processors."""
        scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        return (scaled - mean) / std


def _shortest_edge_size(*, height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the short edge at ``size``; the same expression and truncation as
    transformers' ``get_resize_output_image_size(default_to_square=False)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _expand_to_square(image: Image.Image, *, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: centre the image on a square canvas of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
