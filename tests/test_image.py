"""Tests for vlmkit.processing.image: loading, mode conversion, errors and parity with transformers."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vlmkit.config import CLIP_MEAN, CLIP_STD, VisionConfig
from vlmkit.processing.image import ImageLoadError, ImageProcessor, load_image

SIGLIP_MEAN = (0.5, 0.5, 0.5)
PARITY_SIZES = [(50, 37), (640, 480), (31, 97), (224, 224), (225, 224)]


def _noise(width: int, height: int, *, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _gradient(width: int, height: int) -> Image.Image:
    x = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    y = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    return Image.fromarray(np.stack([x, y, (x + y) / 2], axis=-1).astype(np.uint8))


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` but whose pixel data is garbage: decoding it would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"not zlib data")
        + _png_chunk(b"IEND", b"")
    )


def _quiet(factory, **kwargs):
    # Without torchvision transformers warns that it falls back to the PIL backend; that is expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory(**kwargs)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


# ------------------------------------------------------------------------------------------ parity


@pytest.fixture(scope="module")
def clip_processor():
    from transformers import CLIPImageProcessor

    return _quiet(CLIPImageProcessor, size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


@pytest.mark.parametrize("size", PARITY_SIZES)
@pytest.mark.parametrize("make", [_noise, _gradient])
def test_crop_matches_clip_image_processor(clip_processor, make, size: tuple[int, int]) -> None:
    image = make(*size)
    ours = ImageProcessor(image_size=224, image_mean=CLIP_MEAN, image_std=CLIP_STD, resize_mode="crop")
    ref = clip_processor(image, return_tensors="pt")["pixel_values"]
    got = ours([image])
    assert got.shape == ref.shape == (1, 3, 224, 224)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= 1e-5


def test_crop_matches_clip_small_target_and_rgba(clip_processor) -> None:
    from transformers import CLIPImageProcessor

    small = _quiet(CLIPImageProcessor, size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    ours = ImageProcessor(image_size=30, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    rgba = np.random.default_rng(1).integers(0, 256, (37, 50, 4), dtype=np.uint8)
    for image in (_noise(97, 31), Image.fromarray(rgba)):
        ref = small(image, return_tensors="pt")["pixel_values"]
        assert (ours([image]) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", PARITY_SIZES)
@pytest.mark.parametrize("make", [_noise, _gradient])
def test_resize_matches_siglip_image_processor(make, size: tuple[int, int]) -> None:
    from transformers import SiglipImageProcessor

    siglip = _quiet(SiglipImageProcessor, size={"height": 64, "width": 64})
    ours = ImageProcessor(image_size=64, image_mean=SIGLIP_MEAN, image_std=SIGLIP_MEAN, resize_mode="resize")
    image = make(*size)
    ref = siglip(image, return_tensors="pt")["pixel_values"]
    got = ours([image])
    assert got.shape == ref.shape == (1, 3, 64, 64)
    assert (got - ref).abs().max().item() <= 1e-5


def test_pad_matches_llava_expand2square_then_clip(clip_processor) -> None:
    """LLaVA pads, then runs the CLIP processor on the square image; ``pad`` mode must agree."""
    image = _noise(50, 37)
    fill = tuple(int(x * 255) for x in CLIP_MEAN)
    square = Image.new("RGB", (50, 50), fill)
    square.paste(image, (0, (50 - 37) // 2))
    ours = ImageProcessor(image_size=224, image_mean=CLIP_MEAN, image_std=CLIP_STD, resize_mode="pad")
    ref = clip_processor(square, return_tensors="pt")["pixel_values"]
    assert (ours([image]) - ref).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------- pad mode


def _expected_pad_value() -> torch.Tensor:
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    colour = torch.tensor([int(x * 255) for x in CLIP_MEAN], dtype=torch.float32)
    return ((colour / 255 - mean) / std)[:, None, None]


def test_pad_region_is_mean_colour() -> None:
    red = Image.new("RGB", (20, 10), (255, 0, 0))
    out = ImageProcessor(image_size=40, image_mean=CLIP_MEAN, image_std=CLIP_STD, resize_mode="pad")([red])[0]
    tol = (1 / 255) / min(CLIP_STD)
    pad = _expected_pad_value()
    # Rows 0..9 and 30..39 are padding; stay clear of the bicubic kernel's reach at the seam.
    assert (out[:, :5] - pad).abs().max().item() <= tol
    assert (out[:, 35:] - pad).abs().max().item() <= tol
    red_value = ((torch.tensor([1.0, 0, 0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))[
        :, None, None
    ]
    assert (out[:, 15:25] - red_value).abs().max().item() <= tol


@pytest.mark.parametrize(("width", "height"), [(20, 11), (11, 20)])
def test_pad_content_is_centred(width: int, height: int) -> None:
    # image_size == side: no resampling, so the letterbox offsets are visible exactly.
    white = Image.new("RGB", (width, height), (255, 255, 255))
    out = ImageProcessor(image_size=20, image_mean=CLIP_MEAN, image_std=CLIP_STD, resize_mode="pad")([white])[
        0
    ]
    is_content = (out[0] > 1.5).numpy()  # white normalises to ~1.93, the mean colour to ~0
    rows, cols = np.nonzero(is_content)
    assert is_content.sum() == width * height
    assert (rows.min(), cols.min()) == ((20 - height) // 2, (20 - width) // 2)
    assert torch.allclose(out[:, ~torch.from_numpy(is_content)], _expected_pad_value()[:, :, 0], atol=1e-5)


# ------------------------------------------------------------------------------------------ loading


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    assert loaded.mode == "RGB"
    top, bottom = _pixels(loaded)[5, 10], _pixels(loaded)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_rgba_and_la_composite_on_white() -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[0, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    out = _pixels(load_image(Image.fromarray(rgba)))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 255]
    assert np.all(np.abs(out[1, 0] - 127) <= 1)
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), mode="LA")
    assert _pixels(load_image(la)).reshape(-1, 3).tolist() == [[255, 255, 255], [0, 0, 0]]


def test_palette_with_and_without_transparency() -> None:
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    assert _pixels(load_image(palette_image)).reshape(-1, 3).tolist() == [[255, 0, 0], [0, 255, 0]]
    palette_image.info["transparency"] = 0  # index 0 (red) is transparent
    round_tripped = Image.open(io.BytesIO(_png_bytes(palette_image)))
    assert round_tripped.mode == "P"
    for source in (palette_image, round_tripped):
        assert _pixels(load_image(source)).reshape(-1, 3).tolist() == [[255, 255, 255], [0, 255, 0]]


def test_l_cmyk_and_one_bit() -> None:
    grey = load_image(Image.new("L", (3, 3), 100))
    assert grey.mode == "RGB" and np.all(_pixels(grey) == 100)
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 255, 255, 0))
    assert _pixels(load_image(cmyk)).reshape(-1, 3).tolist() == [[255, 255, 255], [255, 0, 0]]
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    assert _pixels(load_image(bits)).reshape(-1, 3).tolist() == [[0, 0, 0], [255, 255, 255]]


def _gradient16() -> np.ndarray:
    return np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :].repeat(4, axis=0)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "png"])
def test_sixteen_bit_gradient_is_scaled_not_clipped(mode: str) -> None:
    values = _gradient16()
    if mode == "I;16B":
        source = Image.frombytes("I;16B", (256, 4), values.astype(">u2").tobytes())
    elif mode == "I":
        source = Image.fromarray(values.astype(np.int32))
    else:
        source = Image.fromarray(values)
        source = Image.open(io.BytesIO(_png_bytes(source))) if mode == "png" else source
    assert source.mode == {"png": "I;16"}.get(mode, mode)  # Pillow reads 16-bit grey PNGs as I;16
    out = _pixels(load_image(source))
    assert np.all(out[..., 0] == out[..., 2])
    row = out[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    assert np.abs(row - np.arange(256)).max() <= 1  # 0..65535 maps linearly onto 0..255


def test_float_image_in_unit_range() -> None:
    values = np.linspace(0, 1, 11, dtype=np.float32)[None, :]
    source = Image.fromarray(values)
    assert source.mode == "F"
    out = _pixels(load_image(source))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and out[0, 5, 0] in (127, 128)


def test_path_str_bytes_and_pil_inputs_agree(tmp_path: Path) -> None:
    image = _noise(45, 30, seed=3)
    path = tmp_path / "noise.png"
    path.write_bytes(_png_bytes(image))
    processor = ImageProcessor(image_size=32, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    batch = processor([str(path), path, path.read_bytes(), image])
    assert batch.shape == (4, 3, 32, 32)
    for i in range(1, 4):
        assert torch.equal(batch[0], batch[i])
    assert torch.equal(batch[0], processor.preprocess_one(image))


# ------------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError, match="nope.png.*not found"):
        load_image(path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="directory") as info:
        load_image(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_non_image_bytes() -> None:
    with pytest.raises(ImageLoadError, match=r"<bytes, 23 bytes>.*not a recognised image"):
        load_image(b"definitely not an image")


def test_zero_size_image() -> None:
    with pytest.raises(ImageLoadError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


def test_truncated_png(tmp_path: Path) -> None:
    data = _png_bytes(_noise(64, 64))
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated.png.*truncated"):
        load_image(path)


def test_max_pixels_is_checked_before_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(5000, 5000))
    with pytest.raises(ImageLoadError, match="corrupt"):  # its pixel data cannot be decoded...
        load_image(path)

    def fail_load(self):  # ...so with max_pixels, any decode attempt would be a bug
        raise AssertionError("decoded before the max_pixels check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail_load)
    with pytest.raises(ImageLoadError, match=r"huge.png.*5000x5000.*max_pixels=1000"):
        load_image(path, max_pixels=1000)
    processor = ImageProcessor(image_size=8, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    with pytest.raises(ImageLoadError, match="max_pixels"):
        processor([path.read_bytes()], max_pixels=1000)


@pytest.mark.parametrize("side", [10_000, 20_000])  # PIL's warning zone, then its hard error
def test_decompression_bomb_is_an_image_load_error(side: int) -> None:
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(_png_header_only(side, side))


# ---------------------------------------------------------------------------------------- processor


def test_empty_batch_shape() -> None:
    out = ImageProcessor(image_size=16, image_mean=CLIP_MEAN, image_std=CLIP_STD)([])
    assert out.shape == (0, 3, 16, 16) and out.dtype == torch.float32


def test_bad_resize_mode_is_named() -> None:
    with pytest.raises(ValueError, match="squish"):
        ImageProcessor(image_size=16, image_mean=CLIP_MEAN, image_std=CLIP_STD, resize_mode="squish")


def test_single_image_instead_of_list_is_rejected() -> None:
    processor = ImageProcessor(image_size=16, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    with pytest.raises(TypeError, match="sequence"):
        processor("image.png")  # type: ignore[arg-type]


def test_from_vision_config_and_to_dict_round_trip() -> None:
    config = VisionConfig(hf_config={"model_type": "siglip_vision_model"}, image_size=384, resize_mode="pad")
    processor = ImageProcessor.from_vision_config(config)
    assert (processor.image_size, processor.resize_mode) == (384, "pad")
    assert processor.image_mean == CLIP_MEAN and processor.image_std == CLIP_STD
    data = json.loads(json.dumps(processor.to_dict()))
    assert data["resample"] == int(Image.Resampling.BICUBIC)
    assert ImageProcessor.from_dict(data) == processor
    assert hash(ImageProcessor.from_dict(data)) == hash(processor)
