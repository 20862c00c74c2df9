"""Request preparation: samples -> what the decode loop starts from (docs/design.md, "Data flow").

``RequestPreparer`` tokenizes a batch of samples, keys each image by content, takes image features from the
feature cache or encodes them (fixed resolution or AnyRes tiles; a text-conditioned projector runs after the
cache, inside ``VisionLanguageModel.embed``), reuses the KV of a cached prompt prefix (batch-1 requests) and embeds
only the positions left. ``VLM`` owns one; it can also be used on its own with a model, a processor and caches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlmkit.cache import (
    FeatureCache,
    ImageRef,
    ModelIdentity,
    PrefixCache,
    feature_key,
    image_ref,
    prompt_codes,
)
from vlmkit.cache.identity import config_digest
from vlmkit.generation import GenerationConfig, PromptKV
from vlmkit.generation.cpu_llama.twins import TwinCache, onednn_gemm_twin
from vlmkit.generation.kv_cache import new_cache, plain_layers
from vlmkit.models.language.protocols import lm_module
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.image import ImageInput, load_image
from vlmkit.processing.processor import Sample, VLMProcessor
from vlmkit.processing.prompting import pad_batch
from vlmkit.processing.tiling import TileLayout

ENCODE_MODES = ("parallel", "sequential")


def check_encode_mode(mode: str) -> str:
    """``mode`` if it is one of ``ENCODE_MODES``; otherwise a ValueError naming the choices."""
    if mode not in ENCODE_MODES:
        raise ValueError(f"encode_mode must be one of {ENCODE_MODES}, got {mode!r}")
    return mode


@dataclass
class PreparedRequest:
    """One request, ready for the decode loop: embeddings of the positions still to compute, the whole mask."""

    embeds: torch.Tensor  # [batch, seq - past.length, dim]
    mask: torch.Tensor  # [batch, seq]
    past: PromptKV | None = None
    on_prefill: Callable[[PromptKV], None] | None = None


@dataclass
class _Images:
    """A request's images still to embed: content references, cache keys, AnyRes layouts (None: fixed)."""

    refs: list[ImageRef]
    keys: list[str]
    layouts: list[TileLayout] | None


class RequestPreparer:
    """Samples -> ``PreparedRequest`` through the feature cache and the prefix cache.

    ``encode_mode``: ``"parallel"`` (all new images of a request through the encoder at once) or ``"sequential"``
    (one at a time: lower peak memory). ``twins`` holds the oneDNN copies of the encoder (float32 on CPU).
    ``feature_cache`` / ``prefix_cache`` may be replaced (``VLM.enable_caches``); the rest is fixed.
    """

    def __init__(
        self,
        *,
        model: VisionLanguageModel,
        processor: VLMProcessor,
        feature_cache: FeatureCache,
        prefix_cache: PrefixCache,
        twins: TwinCache,
        encode_mode: str = "parallel",
    ) -> None:
        self.model = model
        self.processor = processor
        self.feature_cache = feature_cache
        self.prefix_cache = prefix_cache
        self.twins = twins
        self.encode_mode = check_encode_mode(encode_mode)
        self._encoder_identity = ModelIdentity(
            [model.vision, model.projector] + ([model.tiling] if model.tiling is not None else []),
            settings=[repr(model.config.vision), repr(model.config.projector)],
        )
        self._lm_identity = ModelIdentity(
            [lm_module(model.language_model)], settings=repr(model.config.language)
        )
        self._preprocess_digest = config_digest(
            processor.image_processor.to_dict(), model.anyres.to_dict() if model.anyres else None
        )
        # whether the LM's KV can be cut at any position (not sliding-window / hybrid); known on first use
        self._plain_kv: bool | None = None

    # ------------------------------------------------------------------------------------------- requests

    def prefill_inputs(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> inputs_embeds [batch, seq, dim] with images spliced in, attention_mask [batch, seq] (left padded).

        Image features come through the feature cache; the prefix cache is not used (the whole prompt is embedded).
        """
        prepared = self.prepare(samples, config=None)
        return prepared.embeds, prepared.mask

    @torch.inference_mode()
    def prepare(self, samples: Sequence[Sample], *, config: GenerationConfig | None) -> PreparedRequest:
        """Tokenize, find reusable prompt KV (batch 1), embed only what is left, with cached image features.

        ``config=None``: no prefix reuse (the whole prompt is embedded).
        """
        layouts = [self.processor.image_layouts(s.images) for s in samples]  # AnyRes: per image; else None
        rows = [self.processor.encode_sample(s, add_generation_prompt=True, with_labels=False, layouts=lay)
                for s, lay in zip(samples, layouts, strict=True)]  # fmt: skip
        batch = pad_batch(rows, pad_token_id=self.processor.pad_token_id, side="left")
        flat_layouts = None if self.model.anyres is None else [lay for row in layouts for lay in row or []]
        use_prefix = config is not None and self._prefix_applies(batch_size=len(samples), config=config)
        refs, keys = self.image_keys([image for s in samples for image in s.images],
                                     hashed=use_prefix or self.feature_cache.enabled, layouts=flat_layouts)  # fmt: skip
        images = _Images(refs=refs, keys=keys, layouts=flat_layouts)
        input_ids, past, on_prefill = batch["input_ids"], None, None
        if use_prefix:
            input_ids, images, past, on_prefill = self._reuse_prefix(input_ids, images=images)
        features = self.image_features(images.refs, keys=images.keys, cache=self.feature_cache.enabled,
                                       layouts=images.layouts)  # fmt: skip
        device = self.model.device
        embeds = self.model.embed(input_ids=input_ids.to(device), image_features=features,
                                  context_mask=batch["attention_mask"][:, -input_ids.shape[1] :].to(device))  # fmt: skip
        return PreparedRequest(
            embeds=embeds, mask=batch["attention_mask"].to(device), past=past, on_prefill=on_prefill
        )

    def _reuse_prefix(
        self, input_ids: torch.Tensor, *, images: _Images
    ) -> tuple[torch.Tensor, _Images, PromptKV | None, Callable[[PromptKV], None]]:
        """A batch-1 prompt's longest cached prefix: input_ids [1, seq] -> [1, seq - reused] and the images after it,
        the reused KV (None on a miss), and the callback that caches this prompt's KV once it is prefilled."""
        counts = self.processor.token_counts(images.layouts)
        codes = prompt_codes(input_ids[0].numpy(), image_token_id=self.model.config.prompt.image_token_id,
                             image_keys=images.keys, counts=counts)  # fmt: skip
        past = self.prefix_cache.lookup(codes)
        if past is not None:
            done = _images_before(codes[: past.length], counts=counts, num_images=len(images.keys))
            layouts = images.layouts[done:] if images.layouts is not None else None
            images = _Images(refs=images.refs[done:], keys=images.keys[done:], layouts=layouts)
            input_ids = input_ids[:, past.length :]
        return input_ids, images, past, _inserter(self.prefix_cache, codes)

    def _prefix_applies(self, *, batch_size: int, config: GenerationConfig) -> bool:
        if not self.prefix_cache.enabled or batch_size != 1 or config.num_beams != 1:
            return False
        if self.model.text_conditioned:  # an image's tokens depend on the whole prompt, not on its prefix
            return False
        if self._plain_kv is None:
            self._plain_kv = plain_layers(new_cache(self.model.language_model))
        return self._plain_kv

    # --------------------------------------------------------------------------------------------- images

    def image_keys(
        self, images: Sequence[ImageInput], *, hashed: bool, layouts: Sequence[TileLayout] | None = None
    ) -> tuple[list[ImageRef], list[str]]:
        """Content keys of the images (and bind the caches to the current weights); unhashed: positional keys.

        AnyRes ``layouts`` join the key: one image is tiled alone but not next to others (OneVision).
        """
        if not hashed:  # no cache will see them: skip hashing, key by position
            keys = [str(i) for i in range(len(images))]
            return [ImageRef(source=image, digest=key) for image, key in zip(images, keys, strict=True)], keys
        disk = self.feature_cache.disk_dir is not None
        encoder = self._encoder_identity.digest() if disk else self._encoder_identity.stamp()
        encoder += f":{self.model.training}"
        self.feature_cache.bind(encoder)
        self.prefix_cache.bind(f"{encoder}|{self._lm_identity.stamp()}")
        refs = [image_ref(image) for image in images]
        views = [""] * len(refs) if layouts is None else [f":{lay.grid}" for lay in layouts]
        keys = [
            feature_key(image_digest=r.digest + view, encoder=encoder, preprocess=self._preprocess_digest)
            for r, view in zip(refs, views, strict=True)
        ]
        return refs, keys

    def image_features(
        self,
        refs: Sequence[ImageRef],
        *,
        keys: Sequence[str],
        cache: bool,
        layouts: Sequence[TileLayout] | None = None,
    ) -> torch.Tensor | list[torch.Tensor] | None:
        """[images, tokens, dim] in the order given (AnyRes: a list of [tokens_i, dim]); each distinct image is
        encoded at most once, and taken from / put into the feature cache when ``cache``."""
        if not refs:
            return None
        device = self.model.device
        found = {
            key: f
            for key in dict.fromkeys(keys)
            if cache and (f := self.feature_cache.get(key, device=device)) is not None
        }
        todo = {key: ref for key, ref in zip(keys, refs, strict=True) if key not in found}
        if layouts is not None:  # AnyRes: counts differ per image
            by_key = dict(zip(keys, layouts, strict=True))
            encoded = self.encode_tiled([(r, by_key[k]) for k, r in todo.items()]) if todo else []
            self._keep(found, dict(zip(todo, encoded, strict=True)), cache=cache)
            return [found[key] for key in keys]
        if todo:
            image_processor = self.processor.image_processor
            pixels = torch.stack([image_processor.preprocess_one(r.rgb) if r.rgb is not None
                                  else image_processor([r.source])[0] for r in todo.values()])  # fmt: skip
            rows = self.encode(pixels)  # [new images, tokens, dim]
            # a row view would pin the whole batch in the cache
            new = {key: f.clone() if cache else f for key, f in zip(todo, rows, strict=True)}
            self._keep(found, new, cache=cache)
        return torch.stack([found[key] for key in keys])

    def _keep(self, found: dict[str, torch.Tensor], new: dict[str, torch.Tensor], *, cache: bool) -> None:
        """Add freshly encoded features to ``found`` (and to the feature cache when ``cache``)."""
        for key, features in new.items():
            found[key] = features
            if cache:
                self.feature_cache.put(key, features)

    def encode_tiled(self, items: Sequence[tuple[ImageRef, TileLayout]]) -> list[torch.Tensor]:
        """AnyRes: (image, layout) pairs -> one [tokens_i, dim] per image, all at once or one image at a time."""
        anyres = self.model.anyres
        assert anyres is not None  # called for a tiling model only
        tiles = [anyres.preprocess(r.rgb if r.rgb is not None else load_image(r.source),
                                   tiled=lay.grid != (0, 0)) for r, lay in items]  # fmt: skip
        layouts = [lay for _, lay in items]
        if self.encode_mode == "parallel":
            return self.model.encode_images(torch.cat(tiles), layouts=layouts)
        return [self.model.encode_images(t, layouts=[lay])[0] for t, lay in zip(tiles, layouts, strict=True)]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, S, S] -> [n, tokens, dim], all at once or one image at a time."""
        together = self.encode_mode == "parallel" or pixels.shape[0] == 1
        rows = self.model.vision.num_tokens * (pixels.shape[0] if together else 1)
        # float32 on CPU: the same maths through oneDNN's faster GEMM (generation/cpu_llama/twins.py)
        model = onednn_gemm_twin(self.model, rows=rows, twins=self.twins) or self.model
        if together:
            return model.encode_images(pixels)
        return torch.cat([model.encode_images(pixels[i : i + 1]) for i in range(pixels.shape[0])])


def _images_before(codes: np.ndarray, *, counts: int | Sequence[int], num_images: int) -> int:
    """How many whole images lie in ``codes`` (a reused prompt prefix; image positions have codes < 0)."""
    seen = int(np.count_nonzero(codes < 0))
    per_image = [counts] * num_images if isinstance(counts, int) else list(counts)
    return int(np.searchsorted(np.cumsum(per_image), seen, side="right"))


def _inserter(cache: PrefixCache, codes: np.ndarray) -> Callable[[PromptKV], None]:
    def insert(kv: PromptKV) -> None:
        cache.insert(codes, kv)

    return insert
