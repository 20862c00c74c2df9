"""Caches that make repeated work free: projected image features, and the KV of shared prompt prefixes."""

from vlmkit.cache.feature_cache import FeatureCache, ImageRef, feature_key, image_ref
from vlmkit.cache.identity import ModelIdentity, weights_digest, weights_stamp
from vlmkit.cache.prefix_cache import PrefixCache, prompt_codes

__all__ = [
    "FeatureCache",
    "ImageRef",
    "ModelIdentity",
    "PrefixCache",
    "feature_key",
    "image_ref",
    "prompt_codes",
    "weights_digest",
    "weights_stamp",
]
