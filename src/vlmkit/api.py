"""The public entry point: ``VLM`` — build, load, save, and ask a vision-language model."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from vlmkit.cache import FeatureCache, PrefixCache
from vlmkit.config import (
    SCHEMA_VERSION,
    LanguageConfig,
    ProjectorConfig,
    PromptConfig,
    TilingConfig,
    VLMConfig,
)
from vlmkit.generation import DecodeOptions, GenerationConfig, GenerationResult, generate, stream
from vlmkit.generation.backend import DecodeResources, decide
from vlmkit.models.budget import check_fits, config_parts, element_bytes
from vlmkit.models.io import (
    ModelDirError,
    config_errors,
    load_weights,
    read_weights,
    replace_dir,
    save_weights,
)
from vlmkit.models.language import ensure_vocab
from vlmkit.models.parts import (
    add_image_token,
    check_model_dir,
    hf_config_dict,
    load_language_model,
    load_tokenizer,
    read_json,
)
from vlmkit.models.vision import load_vision
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.image import ImageInput, ImageProcessor
from vlmkit.processing.processor import Sample, VLMProcessor
from vlmkit.processing.prompting import normalize_messages
from vlmkit.processing.tokenizer_protocol import Tokenizer
from vlmkit.quantization import (
    QuantizationError,
    check_method,
    parameter_count,
    part_bytes,
    portable,
    prepare_quantized,
    quantize_model,
)
from vlmkit.runtime.prepare import ENCODE_MODES as ENCODE_MODES  # re-exported: vlmkit.api.ENCODE_MODES
from vlmkit.runtime.prepare import RequestPreparer, check_encode_mode

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"
# LLaVA-1.5-7B: one image's features are 4.5 MiB (576 x 4096 x bf16) and one image prompt's KV ~300 MiB
DEFAULT_FEATURE_CACHE_BYTES = 256 * 2**20
DEFAULT_PREFIX_CACHE_BYTES = 1 * 2**30
GPU_SYNC_EVERY = 8  # decode steps queued between host syncs on GPU (non-streaming); CPU syncs every step
# static_cache=None: preallocate from this batch size on (a dynamic cache copies all of its KV every step; measured
# on CPU at batch 32: 87 vs 103 ms per step, no difference at batch 1 and 8)
STATIC_CACHE_AUTO_BATCH = 16
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None / "auto" keep the stored dtype; names map to torch dtypes; anything else is an error."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _as_list(images: ImageInput | Sequence[ImageInput] | None) -> list[ImageInput]:
    if images is None:
        return []
    if isinstance(images, str | bytes | Path) or not isinstance(images, Sequence):
        return [images]
    return list(cast(Sequence[ImageInput], images))  # mypy keeps ``bytes`` (a Sequence) in the union


class VLM:
    """A model plus its processor. Create with ``VLM.build`` or ``VLM.from_pretrained``.

    Inference options (all keep greedy answers identical; see docs/inference.md):
    ``feature_cache_bytes`` / ``feature_cache_dir`` / ``feature_cache_disk_bytes`` - projected image features by
    image content (0 = off; the dir adds a safetensors disk tier); ``prefix_cache_bytes`` - KV of earlier prompts
    reused by later ones sharing a prefix (batch-1 requests; 0 = off); ``compile`` - ``torch.compile`` the decode
    step (``True`` or a dict of compile options), over a static cache; ``static_cache`` - a preallocated cache
    without compiling (``None``: from batch 16 on); ``sync_every`` - decode steps between host syncs (default: 1 on CPU, 8 on GPU);
    ``speculative`` - draft tokens per round from a float16 copy of the LM, verified by the LM in one pass (greedy
    batch-1 requests on a float32 Llama on CPU; 0 = off; ``None`` = on for LMs too big for the CPU caches);
    ``encode_mode`` - ``"parallel"`` (all new images of a request through the encoder at once) or
    ``"sequential"`` (one at a time: lower peak memory).
    """

    def __init__(
        self,
        *,
        model: VisionLanguageModel,
        tokenizer: Tokenizer,
        feature_cache_bytes: int = DEFAULT_FEATURE_CACHE_BYTES,
        feature_cache_dir: str | Path | None = None,
        feature_cache_disk_bytes: int | None = None,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        compile: bool | dict[str, Any] = False,
        static_cache: bool | None = None,
        sync_every: int | None = None,
        speculative: int | None = None,
        encode_mode: str = "parallel",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        # this model's static-cache pool and weight twins (oneDNN, float16 screen and draft)
        self.decode_resources = DecodeResources()
        self.processor = VLMProcessor(
            tokenizer=tokenizer,
            image_processor=ImageProcessor.from_vision_config(model.config.vision),
            prompt=model.config.prompt,
            num_image_tokens=model.num_image_tokens,
            anyres=model.anyres,
        )
        feature_cache, prefix_cache = _new_caches(
            feature_cache_bytes=feature_cache_bytes, feature_cache_dir=feature_cache_dir,
            feature_cache_disk_bytes=feature_cache_disk_bytes, prefix_cache_bytes=prefix_cache_bytes,
        )  # fmt: skip
        # request preparation: image keys, features and both caches (runtime/prepare.py)
        self.preparer = RequestPreparer(model=self.model, processor=self.processor, feature_cache=feature_cache,
                                        prefix_cache=prefix_cache, twins=self.decode_resources.twins,
                                        encode_mode=encode_mode)  # fmt: skip
        self.set_decoding(
            compile=compile, static_cache=static_cache, sync_every=sync_every, speculative=speculative
        )

    # ----------------------------------------------------------------------------------- inference options

    def enable_caches(
        self,
        *,
        feature_cache_bytes: int = DEFAULT_FEATURE_CACHE_BYTES,
        feature_cache_dir: str | Path | None = None,
        feature_cache_disk_bytes: int | None = None,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ) -> VLM:
        """Replace both caches (empty) with these sizes; 0 bytes turns one off. Returns self."""
        self.preparer.feature_cache, self.preparer.prefix_cache = _new_caches(
            feature_cache_bytes=feature_cache_bytes, feature_cache_dir=feature_cache_dir,
            feature_cache_disk_bytes=feature_cache_disk_bytes, prefix_cache_bytes=prefix_cache_bytes,
        )  # fmt: skip
        return self

    @property
    def feature_cache(self) -> FeatureCache:
        """Projected image features by image content (``stats()`` for its counters)."""
        return self.preparer.feature_cache

    @property
    def prefix_cache(self) -> PrefixCache:
        """Prompt-prefix KV reused by later batch-1 requests (``stats()`` for its counters)."""
        return self.preparer.prefix_cache

    @property
    def encode_mode(self) -> str:
        """``"parallel"`` or ``"sequential"`` (``set_encode_mode`` changes it)."""
        return self.preparer.encode_mode

    def set_decoding(
        self,
        *,
        compile: bool | dict[str, Any] = False,
        static_cache: bool | None = None,
        sync_every: int | None = None,
        speculative: int | None = None,
    ) -> VLM:
        """Choose how the decode loop runs (``compile`` implies a static cache). Returns self."""
        self.decode_options = DecodeOptions(
            static_cache=bool(static_cache),
            compile=compile,
            sync_every=sync_every or 1,
            speculative=speculative,
        )
        self._static_auto = static_cache is None
        self._sync_every = sync_every
        return self

    def set_encode_mode(self, mode: str) -> VLM:
        """``"parallel"`` or ``"sequential"`` image encoding (see the class docstring). Returns self."""
        self.preparer.encode_mode = check_encode_mode(mode)
        return self

    def clear_caches(self, *, static_kv: bool = False) -> None:
        """Empty the feature cache (memory tier) and the prefix cache, resetting their counters.

        ``static_kv=True`` also frees the idle preallocated KV caches; they hold no results, only buffers whose
        addresses compiled CUDA graphs are recorded against, so by default they stay.
        """
        self.feature_cache.clear()
        self.prefix_cache.clear()
        if static_kv:
            self.decode_resources.pool.clear()

    def _decode_options(self, *, batch: int) -> DecodeOptions:
        sync = self._sync_every or (
            1 if self.model.device.type == "cpu" else GPU_SYNC_EVERY
        )  # CPU syncs are free
        static = self.decode_options.static_cache or (self._static_auto and batch >= STATIC_CACHE_AUTO_BATCH)
        return dataclasses.replace(self.decode_options, sync_every=sync, static_cache=static)

    @property
    def config(self) -> VLMConfig:
        return self.model.config

    # ----------------------------------------------------------------------------------------- build / load

    @classmethod
    def build(
        cls,
        *,
        vision: str | Path | Sequence[str | Path],
        language: str | Path,
        projector: str | ProjectorConfig = "mlp",
        feature_layer: int = -2,
        select: str = "patch",
        image_size: int | None = None,
        resize_mode: str | None = None,
        conv_stem: tuple[int, ...] | list[int] = (),
        resolution: str = "fixed",
        tiling: TilingConfig | dict[str, Any] | None = None,
        template: str = "auto",
        system: str | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        **options: Any,
    ) -> VLM:
        """Compose a new VLM from a local vision tower dir and a local causal-LM dir (projector freshly initialised).

        ``vision`` is a transformers, open_clip or timm tower dir (``open_clip:DIR`` / ``timm:DIR`` force the
        library), or a list of them (or ``"A,B"``) for a fused tower (docs/parts.md).
        ``conv_stem`` (channel widths) replaces the tower's patch embedding with a new convolutional stem
        (``models/vision/stem.py``): for towers trained from scratch; it discards a pre-trained patch embedding.
        ``resolution="anyres"`` tiles each image (LLaVA-NeXT style) at ``image_size`` per tile: ``tiling`` is a
        ``TilingConfig`` (or its fields as a dict; default: every grid of at most 4 tiles) (docs/resolution.md).

        ``options`` are the constructor's inference options (caches, compile, ...).
        """
        torch_dtype = resolve_dtype(dtype)
        encoder = load_vision(
            vision,
            dtype=torch_dtype,
            overrides={"feature_layer": feature_layer, "select": select, "image_size": image_size,
                       "resize_mode": resize_mode, "conv_stem": tuple(conv_stem) or None},
        )  # fmt: skip
        vision_cfg = encoder.config
        vision_cfg.tiling = _tiling_for(resolution, tiling)
        vision_cfg.validate()
        language_model = load_language_model(language, dtype=torch_dtype)
        tokenizer = load_tokenizer(language)
        prompt = PromptConfig(template=template, system=system)
        prompt.image_token_id = add_image_token(tokenizer, prompt)
        ensure_vocab(language_model, size=len(tokenizer))
        projector_cfg = (
            projector if isinstance(projector, ProjectorConfig) else ProjectorConfig(type=projector)
        )
        config = VLMConfig(
            vision=vision_cfg,
            projector=projector_cfg,
            language=LanguageConfig(hf_config=hf_config_dict(language_model.config), source=str(language)),
            prompt=prompt,
        )
        torch.manual_seed(seed)  # reproducible projector initialisation
        model = VisionLanguageModel(config=config, vision=encoder, language_model=language_model)
        return cls(model=model.to(language_model.dtype), tokenizer=tokenizer, **options)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        vision_tower: str | Path | None = None,
        quantize: str | None = None,
        **options: Any,
    ) -> VLM:
        """Load a vlmkit, llava-hf or original-LLaVA directory (with no path: the shipped default model).

        ``vision_tower`` is the local tower directory an original LLaVA checkpoint refers to by hub id;
        ``quantize`` (``"int8"``, ``"int4"``, ``"nf4"``) quantizes the language model's linear layers for ``device``
        (docs/quantization.md; a combination this machine cannot run is a ``QuantizationError``);
        ``options`` are the constructor's inference options (caches, compile, ...).
        """
        method = check_method(quantize)
        directory = DEFAULT_MODEL_DIR if path is None else Path(path).expanduser()
        if path is None and not directory.exists():
            raise ModelDirError("no default model is bundled with this install; pass a model directory")
        check_model_dir(directory)
        raw = read_json(directory / "config.json")
        # memory before validation: a vlmkit model is built in float32 first, others straight in their dtype
        per_param = 4 if "vlmkit_version" in raw else element_bytes(resolve_dtype(dtype))
        check_fits(
            config_parts(raw), source=directory / "config.json", bytes_per_param=per_param, device=device
        )
        if "vlmkit_version" in raw:
            vlm = cls._load_vlmkit(directory, raw=raw, dtype=resolve_dtype(dtype), options=options)
        else:
            from vlmkit.models.convert import load_foreign

            model, tokenizer = load_foreign(
                directory, raw=raw, dtype=resolve_dtype(dtype), vision_tower=vision_tower
            )
            vlm = cls(model=model, tokenizer=tokenizer, **options)
        vlm._quantize(method, device=device)
        if device is not None:
            vlm.model.to(device)
        return vlm

    def _quantize(self, method: str | None, *, device: str | None) -> None:
        """Quantize the LM for ``device``; a directory saved quantized must match ``method`` and run on CPU."""
        stored = self.config.quantization
        if stored is None:
            if method is not None:
                self.config.quantization = quantize_model(self.model, method=method, device=device)
            return
        if method is not None and method != stored.method:
            raise QuantizationError(f"this model directory is quantized as {stored.method}; it cannot be loaded "
                                    f"as quantize={method!r} (load the unquantized model for that)")  # fmt: skip
        if device is not None and torch.device(device).type != "cpu":
            raise QuantizationError(f"this model directory holds {stored.method} weights in vlmkit's CPU format "
                                    f"({stored.scheme}); load it on CPU, or quantize the unquantized model on "
                                    f"{device}")  # fmt: skip

    @classmethod
    def _load_vlmkit(
        cls, directory: Path, *, raw: dict[str, Any], dtype: torch.dtype | None, options: dict[str, Any]
    ) -> VLM:
        config = VLMConfig.from_dict(raw)
        state = read_weights(directory)
        with config_errors(directory / "config.json"):  # zero heads, a string size, ...
            model = VisionLanguageModel(config=config)
        if config.quantization is not None:
            # empty quantized layers of the saved layout, filled by load_weights
            prepare_quantized(model.language_model, config=config.quantization)
        load_weights(model, state, source=directory)
        stored = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        model.to(dtype or stored)
        return cls(model=model, tokenizer=load_tokenizer(directory), **options)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.json + safetensors + tokenizer files. Written aside first, so a failure loses nothing."""
        target = Path(path).expanduser()
        _check_overwritable(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not portable(self.model):
            scheme = getattr(self.config.quantization, "scheme", None)
            raise QuantizationError(
                f"cannot save a model quantized by {scheme} (bitsandbytes / torchao "
                "formats are not saved); save the unquantized model and pass quantize= when loading it"
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            self.config.vlmkit_version = SCHEMA_VERSION
            self.config.to_json(staging / "config.json")
            save_weights(self.model, staging)
            self.tokenizer.save_pretrained(staging)
            _replace_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    # ---------------------------------------------------------------------------------------------- asking

    def ask(
        self, prompt: str, *, images: ImageInput | Sequence[ImageInput] | None = None, **generation: Any
    ) -> str:
        """Answer ``prompt`` about ``images`` (paths, bytes or PIL). Images without placeholders are prepended."""
        return self.ask_batch([prompt], images=[_as_list(images)], **generation)[0]

    def ask_batch(
        self,
        prompts: Sequence[str],
        *,
        images: Sequence[Sequence[ImageInput]] | None = None,
        **generation: Any,
    ) -> list[str]:
        """Answer several prompts in one left-padded batch; ``images[i]`` belongs to ``prompts[i]``."""
        images = images if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
        samples = [
            Sample(messages=self.processor.user_prompt(p, num_images=len(imgs)), images=list(imgs))
            for p, imgs in zip(prompts, images, strict=True)
        ]
        return self.generate(samples, **generation).texts

    def stream(
        self, prompt: str, *, images: ImageInput | Sequence[ImageInput] | None = None, **generation: Any
    ) -> Iterator[str]:
        """Yield the answer incrementally; ``"".join(...)`` equals ``ask`` for greedy decoding."""
        image_list = _as_list(images)
        sample = Sample(
            messages=self.processor.user_prompt(prompt, num_images=len(image_list)), images=image_list
        )
        return self.stream_sample(sample, **generation)

    def stream_sample(
        self, sample: Sample, *, tokenizer: Tokenizer | None = None, **generation: Any
    ) -> Iterator[str]:
        """``stream`` for a prepared ``Sample`` (any conversation); ``tokenizer`` may wrap ``self.tokenizer``
        (e.g. to count decoded tokens) and is what the loop decodes with."""
        config = GenerationConfig.from_kwargs(**generation)
        prepared = self.preparer.prepare([sample], config=config)
        return stream(self.model.language_model, inputs_embeds=prepared.embeds, attention_mask=prepared.mask,
                      tokenizer=tokenizer or self.tokenizer, config=config, options=self._decode_options(batch=1),
                      past=prepared.past, on_prefill=prepared.on_prefill,
                      resources=self.decode_resources)  # fmt: skip

    def chat(self, messages: list[dict[str, Any]], **generation: Any) -> str:
        """OpenAI-style messages (text, ``image_url`` data URLs, ``image`` parts) -> the assistant's reply."""
        plain, images = normalize_messages(messages, image_token=self.config.prompt.image_token)
        return self.generate([Sample(messages=plain, images=images)], **generation).texts[0]

    def generate(self, samples: Sequence[Sample], **generation: Any) -> GenerationResult:
        config = GenerationConfig.from_kwargs(**generation)
        prepared = self.preparer.prepare(samples, config=config)
        return generate(self.model.language_model, inputs_embeds=prepared.embeds, attention_mask=prepared.mask,
                        tokenizer=self.tokenizer, config=config, options=self._decode_options(batch=len(samples)),
                        past=prepared.past, on_prefill=prepared.on_prefill,
                        resources=self.decode_resources)  # fmt: skip

    def _prefill_inputs(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> inputs_embeds [batch, seq, dim], attention_mask [batch, seq]: ``RequestPreparer.prefill_inputs``."""
        return self.preparer.prefill_inputs(samples)

    def image_token_count(self, *, width: int, height: int, images_in_prompt: int = 1) -> int:
        """LM tokens one ``width`` x ``height`` image takes (fixed resolution: the same for every size)."""
        anyres = self.model.anyres
        if anyres is None:
            return self.model.num_image_tokens
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        tiled = anyres.tiles_for(num_images=images_in_prompt)
        return anyres.num_tokens(anyres.layout(height=height, width=width, tiled=tiled))

    def info(self, *, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """A summary for ``vlmkit info``: parts, sizes and parameter counts; ``image_size`` (width, height) gives
        that image's token count (AnyRes: otherwise the largest an image can take)."""
        m = self.model
        tiling = self.config.vision.tiling
        if image_size is not None:
            image_tokens = self.image_token_count(width=image_size[0], height=image_size[1])
        else:
            image_tokens = m.anyres.largest()[1] if m.anyres is not None else m.num_image_tokens
        counts = {name: parameter_count(getattr(m, name))
                  for name in ("vision", "projector", "language_model")}  # fmt: skip
        return {
            "vision": getattr(
                m.vision, "description", m.vision.model_type
            ),  # library / fused towers name more
            "language": self.config.language.hf_config.get("model_type"),
            "projector": self.config.projector.type,
            "image_size": self.config.vision.image_size,
            "image_tokens": image_tokens,
            "resolution": "anyres" if tiling is not None else "fixed",
            "tiling": dataclasses.asdict(tiling) if tiling is not None else None,
            "template": self.processor.template,
            "dtype": str(m.dtype).replace("torch.", ""),
            "parameters": counts | {"total": sum(counts.values())},
            "bytes": _part_bytes(m),
            "quantization": dataclasses.asdict(q) if (q := self.config.quantization) is not None else None,
            "decode": dict(zip(("backend", "reason"), self.decode_backend(), strict=True)),
        }

    def decode_backend(self, *, batch: int = 1, **generation: Any) -> tuple[str, str]:
        """The decode backend a request of ``batch`` unpadded prompts runs on with the current options, and why
        (``generation.backend.select_backend``'s rule; ``generation``: the request's keyword arguments)."""
        mask = torch.ones(batch, 1, dtype=torch.long, device=self.model.device)
        decision = decide(self.model.language_model, attention_mask=mask, options=self._decode_options(batch=batch),
                          config=GenerationConfig.from_kwargs(**generation))  # fmt: skip
        return decision.name, decision.reason


def _tiling_for(resolution: str, tiling: TilingConfig | dict[str, Any] | None) -> TilingConfig | None:
    """``VLM.build``'s resolution choice -> the vision config's tiling section."""
    if resolution not in ("fixed", "anyres"):
        raise ValueError(f"resolution must be 'fixed' or 'anyres', got {resolution!r}")
    if resolution == "fixed":
        if tiling is not None:
            raise ValueError("tiling settings need resolution='anyres'")
        return None
    if isinstance(tiling, dict):
        return TilingConfig.from_dict(tiling)  # names a bad field
    return tiling if tiling is not None else TilingConfig(max_tiles=4)


def _part_bytes(model: VisionLanguageModel) -> dict[str, int]:
    """Bytes held per part (quantized codes and scales included), and in all."""
    sizes = {name: part_bytes(getattr(model, name)) for name in ("vision", "projector", "language_model")}
    return sizes | {"total": part_bytes(model)}


def _new_caches(
    *,
    feature_cache_bytes: int,
    feature_cache_dir: str | Path | None,
    feature_cache_disk_bytes: int | None,
    prefix_cache_bytes: int,
) -> tuple[FeatureCache, PrefixCache]:
    """Empty feature and prefix caches of these sizes (0 bytes: off)."""
    feature = FeatureCache(
        max_bytes=feature_cache_bytes, disk_dir=feature_cache_dir, disk_max_bytes=feature_cache_disk_bytes
    )
    return feature, PrefixCache(max_bytes=prefix_cache_bytes)


def _replace_dir(staging: Path, target: Path) -> None:
    """Swap ``staging`` into place; an existing ``target`` is removed only after the new one is complete."""
    if target.exists() and not target.is_dir():
        raise ModelDirError(f"cannot save to {target}: it exists and is not a directory")
    replace_dir(staging, target)
    staging.parent.joinpath(target.name).chmod(0o755)


def _check_overwritable(target: Path) -> None:
    """Never replace a directory that holds something other than a vlmkit model."""
    if target.is_dir() and any(target.iterdir()):
        config = target / "config.json"
        if not config.exists() or "vlmkit_version" not in config.read_text(errors="replace"):
            raise ModelDirError(
                f"refusing to overwrite {target}: it is not empty and not a vlmkit model directory"
            )
