"""Shared fixtures: tiny parts saved to disk once per session, composed VLMs built from them."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import tiny

warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """Directories of tiny vision towers and language models (with tokenizers), keyed by kind."""
    root = tmp_path_factory.mktemp("parts")
    dirs = {kind: tiny.save_vision(root / kind, kind) for kind in ("clip", "siglip", "dinov2")}
    dirs.update({kind: tiny.save_language(root / kind, kind) for kind in ("llama", "qwen2", "gpt2")})
    return dirs


@pytest.fixture(scope="session")
def tiny_vlm(parts):
    """CLIP + MLP + Llama, eval mode, fp32."""
    from vlmkit.api import VLM

    return VLM.build(vision=parts["clip"], language=parts["llama"], projector="mlp")


@pytest.fixture(scope="session")
def tiny_vlm_dir(tiny_vlm, tmp_path_factory):
    return tiny_vlm.save_pretrained(tmp_path_factory.mktemp("models") / "tiny-vlm")


def make_image(*, seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def images():
    return [make_image(seed=i, size=(40 + 7 * i, 30 + 3 * i)) for i in range(3)]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP threads spin-wait behind other
    work. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
