"""Image-feature cache and prefix KV cache: bounds, keys, disk tier, counters, and identical answers with reuse."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from conftest import make_image, png_bytes
from vlmkit.api import VLM
from vlmkit.cache import FeatureCache, PrefixCache, image_ref, prompt_codes
from vlmkit.cache.prefix_cache import reusable_length
from vlmkit.generation import PromptKV
from vlmkit.processing.processor import Sample

OFF = {"feature_cache_bytes": 0, "prefix_cache_bytes": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


def twin(vlm: VLM, **options: Any) -> VLM:
    """Another VLM over the same weights with its own caches."""
    return VLM(model=vlm.model, tokenizer=vlm.tokenizer, **options)


def tokens(vlm: VLM, prompt: str, images: list, **kwargs: Any) -> list[int]:
    sample = Sample(messages=vlm.processor.user_prompt(prompt, num_images=len(images)), images=images)
    return vlm.generate([sample], max_new_tokens=kwargs.pop("max_new_tokens", 10), **kwargs).token_ids[0]


def kv(length: int, *, layers: int = 2, value: float = 0.0) -> PromptKV:
    """A fake prompt KV: [1, 2 heads, length, 4] per layer (64 bytes per position per layer as float32)."""
    t = torch.full((1, 2, length, 4), value)
    return PromptKV(layers=tuple((t.clone(), t.clone()) for _ in range(layers)))


# ------------------------------------------------------------------------------------------ feature cache


def test_feature_cache_evicts_least_recent_within_its_byte_bound() -> None:
    entry = torch.zeros(4, 8)  # 128 bytes
    cache = FeatureCache(max_bytes=3 * entry.nbytes + 10)
    for key in "abc":
        cache.put(key, entry.clone())
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", entry.clone())
    stats = cache.stats()
    assert stats["bytes"] <= stats["max_bytes"] and stats["entries"] == 3 and stats["evictions"] == 1
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    cache.put("huge", torch.zeros(100, 100))  # larger than the whole budget: never kept in memory
    assert "huge" not in cache and cache.stats()["bytes"] <= cache.max_bytes


def test_images_differing_in_one_pixel_never_share_an_entry(tiny_vlm, tmp_path) -> None:
    vlm = twin(tiny_vlm, prefix_cache_bytes=0)
    image = make_image(seed=3, size=(32, 32))
    other = image.copy()
    other.putpixel((5, 7), tuple((c + 1) % 256 for c in image.getpixel((5, 7))))
    assert image_ref(image).digest != image_ref(other).digest
    assert image_ref(png_bytes(image)).digest != image_ref(png_bytes(other)).digest
    vlm.ask("Describe.", images=[image], max_new_tokens=2)
    vlm.ask("Describe.", images=[other], max_new_tokens=2)
    assert vlm.feature_cache.stats()["misses"] == 2 and vlm.feature_cache.stats()["hits"] == 0
    path = tmp_path / "same.png"
    path.write_bytes(png_bytes(image))
    vlm.ask("Describe.", images=[path], max_new_tokens=2)  # a path and its bytes are one entry
    vlm.ask("Describe.", images=[png_bytes(image)], max_new_tokens=2)
    assert vlm.feature_cache.stats()["hits"] == 1


def test_stats_count_hits_and_misses_and_answers_do_not_change(tiny_vlm, images) -> None:
    cached, plain = twin(tiny_vlm, prefix_cache_bytes=0), twin(tiny_vlm, **OFF)
    for prompt in ("Describe the image.", "What colour?", "Describe the image."):
        assert tokens(cached, prompt, images[:2]) == tokens(plain, prompt, images[:2])
    stats = cached.feature_cache.stats()
    assert (stats["misses"], stats["hits"], stats["lookups"], stats["entries"]) == (2, 4, 6, 2)
    assert plain.feature_cache.stats()["lookups"] == 0  # off: no hashing, no lookups


def test_same_image_twice_in_one_request_is_encoded_once(tiny_vlm, images) -> None:
    vlm = twin(tiny_vlm, prefix_cache_bytes=0)
    answer = tokens(vlm, "<image> and <image>: same?", [images[0], images[0]])
    assert vlm.feature_cache.stats()["misses"] == 1
    assert answer == tokens(twin(tiny_vlm, **OFF), "<image> and <image>: same?", [images[0], images[0]])


def test_disk_tier_round_trip(tiny_vlm, images, tmp_path) -> None:
    first = twin(tiny_vlm, prefix_cache_bytes=0, feature_cache_dir=tmp_path / "features")
    expected = tokens(first, "Describe.", [images[0]])
    files = list((tmp_path / "features").glob("*.safetensors"))
    assert len(files) == 1 and first.feature_cache.stats()["disk_writes"] == 1
    # a new process: empty memory tier, same weights -> served from disk, same answer
    second = twin(tiny_vlm, prefix_cache_bytes=0, feature_cache_dir=tmp_path / "features")
    assert tokens(second, "Describe.", [images[0]]) == expected
    assert second.feature_cache.stats()["disk_hits"] == 1 and second.feature_cache.stats()["misses"] == 0
    raw = FeatureCache(max_bytes=0, disk_dir=tmp_path / "features")
    assert raw.get(files[0].stem) is not None and raw.get("0" * 64) is None


def test_disk_tier_bound_and_clear(tmp_path) -> None:
    cache = FeatureCache(max_bytes=0, disk_dir=tmp_path, disk_max_bytes=3000)
    for i in range(4):
        cache.put(f"{i:064x}", torch.full((16, 16), float(i)))  # ~1.1 kB per file
    assert cache.stats()["disk_bytes"] <= 3000 and len(list(tmp_path.glob("*.safetensors"))) == 2
    assert torch.equal(cache.get(f"{3:064x}"), torch.full((16, 16), 3.0))
    cache.clear(disk=True)
    assert not list(tmp_path.glob("*.safetensors"))


def test_changed_weights_never_reuse_stale_entries(tiny_vlm, images, tmp_path) -> None:
    model = copy.deepcopy(tiny_vlm.model)
    vlm = VLM(model=model, tokenizer=tiny_vlm.tokenizer, feature_cache_dir=tmp_path / "f")
    tokens(vlm, "Describe.", [images[0]])
    with torch.no_grad():  # a training step: in place, like an optimizer
        next(model.projector.parameters()).add_(0.5)
        model.language_model.get_input_embeddings().weight.mul_(1.5)
    after = tokens(vlm, "Describe.", [images[0]])
    stats = vlm.feature_cache.stats()
    assert stats["misses"] == 2 and stats["hits"] == 0 and stats["disk_writes"] == 2
    assert vlm.prefix_cache.stats()["hits"] == 0
    assert after == tokens(VLM(model=model, tokenizer=tiny_vlm.tokenizer, **OFF), "Describe.", [images[0]])


# ------------------------------------------------------------------------------------------- prefix cache


def test_prefix_reuse_gives_identical_answers(tiny_vlm, images) -> None:
    cached, plain = twin(tiny_vlm), twin(tiny_vlm, **OFF)
    cases = [
        ("Describe the image.", images[:1]),
        ("What colour is the circle?", images[:1]),  # same image, new question
        ("What colour is the circle? And the square?", images[:1]),  # extends the previous prompt
        ("<image> or <image>: which is larger?", images[1:3]),
        ("<image> or <image>: which is brighter?", images[1:3]),
        ("What colour is the circle?", images[:1]),  # the exact prompt again
        ("No image, just text.", []),
    ]
    for prompt, imgs in cases:
        assert tokens(cached, prompt, imgs, max_new_tokens=12) == tokens(
            plain, prompt, imgs, max_new_tokens=12
        )
    stats = cached.prefix_cache.stats()
    assert stats["hits"] >= 4 and stats["reused_tokens"] > 2 * tiny_vlm.model.num_image_tokens
    stream = "".join(cached.stream("What colour is the circle?", images=images[:1], max_new_tokens=12))
    assert stream == plain.ask("What colour is the circle?", images=images[:1], max_new_tokens=12)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Hi"}]}
    ]
    assert cached.chat(messages, max_new_tokens=8) == plain.chat(messages, max_new_tokens=8)


def test_prefix_reuse_with_sampling_is_reproducible(tiny_vlm, images) -> None:
    cached, plain = twin(tiny_vlm), twin(tiny_vlm, **OFF)
    for prompt in ("Describe the image.", "Describe it again."):
        kwargs = {"temperature": 0.8, "top_k": 20, "seed": 7}
        assert tokens(cached, prompt, images[:1], **kwargs) == tokens(plain, prompt, images[:1], **kwargs)


def test_different_images_share_only_the_text_before_them(tiny_vlm) -> None:
    vlm = twin(tiny_vlm)
    image = make_image(seed=5, size=(32, 32))
    other = image.copy()
    other.putpixel((0, 0), (0, 0, 0) if image.getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    tokens(vlm, "Describe.", [image])
    tokens(vlm, "Describe.", [other])
    stats = vlm.prefix_cache.stats()
    sample = Sample(messages=vlm.processor.user_prompt("Describe.", num_images=1), images=[image])
    ids = vlm.processor([sample])["input_ids"][0]
    image_start = int(torch.nonzero(ids == vlm.model.image_token_id)[0])
    assert stats["hits"] == (1 if image_start > 0 else 0)
    assert stats["reused_tokens"] == image_start  # the template text before the image, nothing of the image


def test_prompt_codes_and_cut_points() -> None:
    codes = prompt_codes([5, 9, 9, 9, 6, 9, 9, 9, 7], image_token_id=9, image_keys=["a" * 64, "b" * 64])
    assert codes[0] == 5 and (codes[1:4] == codes[1]).all() and codes[1] < 0 and codes[4] == 6
    assert (codes[5:8] == codes[5]).all() and codes[5] < 0 and codes[5] != codes[1] and codes[8] == 7
    assert reusable_length(codes, common=3) == 1  # inside the first image: back to its start
    assert reusable_length(codes, common=4) == 4
    assert reusable_length(codes, common=7) == 5
    assert reusable_length(codes, common=9) == 8  # the last position always runs


def test_prefix_cache_bound_lru_and_superseding() -> None:
    cache = PrefixCache(max_bytes=2 * kv(10).nbytes)
    first = np.arange(10)
    cache.insert(first, kv(10))
    longer = np.arange(14)
    cache.insert(longer, kv(14))  # extends the first: replaces it
    assert len(cache) == 1
    hit = cache.lookup(np.concatenate([np.arange(12), [99, 98]]))
    assert hit is not None and hit.length == 12
    cache.insert(np.arange(100, 110), kv(10))  # the older entry no longer fits
    assert cache.stats()["bytes"] <= cache.max_bytes and cache.stats()["evictions"] == 1
    assert cache.lookup(np.arange(14)) is None
    with pytest.raises(ValueError, match="positions"):
        cache.insert(np.arange(5), kv(4))
