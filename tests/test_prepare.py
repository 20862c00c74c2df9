"""RequestPreparer on its own: the same prefill inputs as ``VLM``, features from its cache on the second call."""

from __future__ import annotations

import pytest
import torch

from vlmkit.api import VLM
from vlmkit.cache import FeatureCache, PrefixCache
from vlmkit.generation.cpu_llama.twins import TwinCache
from vlmkit.processing.image import ImageProcessor
from vlmkit.processing.processor import Sample, VLMProcessor
from vlmkit.runtime import RequestPreparer

pytestmark = pytest.mark.usefixtures("one_thread")


def standalone(vlm: VLM) -> RequestPreparer:
    """A preparer over ``vlm``'s weights and tokenizer, with its own processor and caches (no VLM involved)."""
    model = vlm.model
    processor = VLMProcessor(
        tokenizer=vlm.tokenizer,
        image_processor=ImageProcessor.from_vision_config(model.config.vision),
        prompt=model.config.prompt,
        num_image_tokens=model.num_image_tokens,
        anyres=model.anyres,
    )
    return RequestPreparer(model=model, processor=processor, feature_cache=FeatureCache(max_bytes=2**24),
                           prefix_cache=PrefixCache(max_bytes=0), twins=TwinCache())  # fmt: skip


def test_preparer_alone_matches_vlm_and_hits_its_feature_cache(tiny_vlm, images) -> None:
    uncached = VLM(
        model=tiny_vlm.model, tokenizer=tiny_vlm.tokenizer, feature_cache_bytes=0, prefix_cache_bytes=0
    )
    prompts = [("Describe.", images[:1]), ("Compare both pictures, please.", [images[1], images[0]])]
    samples = [Sample(messages=uncached.processor.user_prompt(p, num_images=len(imgs)), images=list(imgs))
               for p, imgs in prompts]  # fmt: skip
    want_embeds, want_mask = uncached._prefill_inputs(samples)  # [batch, seq, dim], [batch, seq]
    preparer = standalone(tiny_vlm)
    embeds, mask = preparer.prefill_inputs(samples)
    assert torch.equal(mask, want_mask) and mask[0, 0] == 0  # left padded: the shorter prompt starts with pad
    torch.testing.assert_close(embeds, want_embeds, rtol=0, atol=1e-6)
    stats = preparer.feature_cache.stats()
    assert stats["misses"] == 2 and stats["hits"] == 0  # two distinct images, each encoded once
    again, _ = preparer.prefill_inputs(samples)
    assert preparer.feature_cache.stats()["hits"] == 2 and preparer.feature_cache.stats()["misses"] == 2
    torch.testing.assert_close(again, want_embeds, rtol=0, atol=1e-6)
    assert uncached.feature_cache.stats()["lookups"] == 0  # the VLM's own preparer kept its cache off


def test_vlm_settings_reach_its_preparer(tiny_vlm) -> None:
    vlm = VLM(model=tiny_vlm.model, tokenizer=tiny_vlm.tokenizer, encode_mode="sequential")
    assert vlm.preparer.encode_mode == vlm.encode_mode == "sequential"
    vlm.enable_caches(feature_cache_bytes=0, prefix_cache_bytes=0)
    assert vlm.preparer.feature_cache is vlm.feature_cache and not vlm.feature_cache.enabled
    assert vlm.preparer.prefix_cache is vlm.prefix_cache and not vlm.prefix_cache.enabled
    vlm.set_encode_mode("parallel")
    assert vlm.preparer.encode_mode == "parallel"
    with pytest.raises(ValueError, match="encode_mode must be one of"):
        vlm.set_encode_mode("threads")
