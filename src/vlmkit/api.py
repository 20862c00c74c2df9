"""The public entry point: ``VLM`` — build, load, save, and ask a vision-language model."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import SCHEMA_VERSION, LanguageConfig, ProjectorConfig, PromptConfig, VLMConfig
from vlmkit.generation import GenerationConfig, GenerationResult, generate, stream
from vlmkit.models.io import ModelDirError, load_weights, read_weights, save_weights
from vlmkit.models.language import ensure_vocab
from vlmkit.models.parts import (
    check_model_dir,
    hf_config_dict,
    load_language_model,
    load_tokenizer,
    load_vision_tower,
    read_json,
    vision_config_for,
)
from vlmkit.models.vision import VisionEncoder
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.image import ImageInput, ImageProcessor
from vlmkit.processing.processor import Sample, VLMProcessor
from vlmkit.processing.prompting import normalize_messages

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"
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
        return [images]  # type: ignore[list-item]
    return list(images)


def add_image_token(tokenizer: Any, prompt: PromptConfig) -> int:
    """Register the image placeholder as a special token (idempotent) and give the tokenizer a pad token."""
    from tokenizers import AddedToken

    if prompt.image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(prompt.image_token, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style tokenizers ship without one
    return tokenizer.convert_tokens_to_ids(prompt.image_token)


class VLM:
    """A model plus its processor. Create with ``VLM.build`` or ``VLM.from_pretrained``."""

    def __init__(self, *, model: VisionLanguageModel, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = VLMProcessor(
            tokenizer=tokenizer,
            image_processor=ImageProcessor.from_vision_config(model.config.vision),
            prompt=model.config.prompt,
            num_image_tokens=model.num_image_tokens,
        )

    @property
    def config(self) -> VLMConfig:
        return self.model.config

    # ----------------------------------------------------------------------------------------- build / load

    @classmethod
    def build(
        cls,
        *,
        vision: str | Path,
        language: str | Path,
        projector: str | ProjectorConfig = "mlp",
        feature_layer: int = -2,
        select: str = "patch",
        image_size: int | None = None,
        resize_mode: str | None = None,
        template: str = "auto",
        system: str | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
    ) -> VLM:
        """Compose a new VLM from a local vision tower dir and a local causal-LM dir (projector freshly initialised)."""
        torch_dtype = resolve_dtype(dtype)
        tower = load_vision_tower(vision, dtype=torch_dtype)
        vision_cfg = vision_config_for(
            tower=tower,
            source=vision,
            overrides={"feature_layer": feature_layer, "select": select, "image_size": image_size,
                       "resize_mode": resize_mode},
        )  # fmt: skip
        language_model = load_language_model(language, dtype=torch_dtype)
        tokenizer = load_tokenizer(language)
        prompt = PromptConfig(template=template, system=system)
        prompt.image_token_id = add_image_token(tokenizer, prompt)
        ensure_vocab(language_model, size=len(tokenizer))
        projector_cfg = projector if isinstance(projector, ProjectorConfig) else ProjectorConfig(type=projector)
        config = VLMConfig(
            vision=vision_cfg,
            projector=projector_cfg,
            language=LanguageConfig(hf_config=hf_config_dict(language_model.config), source=str(language)),
            prompt=prompt,
        )
        torch.manual_seed(seed)  # reproducible projector initialisation
        model = VisionLanguageModel(
            config=config, vision=VisionEncoder(config=vision_cfg, model=tower), language_model=language_model
        )
        return cls(model=model.to(language_model.dtype), tokenizer=tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        vision_tower: str | Path | None = None,
    ) -> VLM:
        """Load a vlmkit, llava-hf or original-LLaVA directory (with no path: the shipped default model).

        ``vision_tower`` is the local tower directory an original LLaVA checkpoint refers to by hub id.
        """
        directory = DEFAULT_MODEL_DIR if path is None else Path(path).expanduser()
        if path is None and not directory.exists():
            raise ModelDirError("no default model is bundled with this install; pass a model directory")
        check_model_dir(directory)
        raw = read_json(directory / "config.json")
        if "vlmkit_version" in raw:
            vlm = cls._load_vlmkit(directory, raw=raw, dtype=resolve_dtype(dtype))
        else:
            from vlmkit.models.convert import load_foreign

            model, tokenizer = load_foreign(directory, raw=raw, dtype=resolve_dtype(dtype), vision_tower=vision_tower)
            vlm = cls(model=model, tokenizer=tokenizer)
        if device is not None:
            vlm.model.to(device)
        return vlm

    @classmethod
    def _load_vlmkit(cls, directory: Path, *, raw: dict[str, Any], dtype: torch.dtype | None) -> VLM:
        config = VLMConfig.from_dict(raw)
        state = read_weights(directory)
        model = VisionLanguageModel(config=config)
        load_weights(model, state, source=directory)
        stored = next(iter(state.values())).dtype if state else torch.float32
        model.to(dtype or stored)
        return cls(model=model, tokenizer=load_tokenizer(directory))

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.json + safetensors + tokenizer files. Written aside first, so a failure loses nothing."""
        target = Path(path).expanduser()
        _check_overwritable(target)
        target.parent.mkdir(parents=True, exist_ok=True)
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

    def ask(self, prompt: str, *, images: ImageInput | Sequence[ImageInput] | None = None, **generation: Any) -> str:
        """Answer ``prompt`` about ``images`` (paths, bytes or PIL). Images without placeholders are prepended."""
        return self.ask_batch([prompt], images=[_as_list(images)], **generation)[0]

    def ask_batch(
        self, prompts: Sequence[str], *, images: Sequence[Sequence[ImageInput]] | None = None, **generation: Any
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
        sample = Sample(messages=self.processor.user_prompt(prompt, num_images=len(image_list)), images=image_list)
        embeds, mask = self._prefill_inputs([sample])
        config = GenerationConfig.from_kwargs(**generation)
        return stream(self.model.language_model, inputs_embeds=embeds, attention_mask=mask,
                      tokenizer=self.tokenizer, config=config)  # fmt: skip

    def chat(self, messages: list[dict[str, Any]], **generation: Any) -> str:
        """OpenAI-style messages (text, ``image_url`` data URLs, ``image`` parts) -> the assistant's reply."""
        plain, images = normalize_messages(messages, image_token=self.config.prompt.image_token)
        return self.generate([Sample(messages=plain, images=images)], **generation).texts[0]

    def generate(self, samples: Sequence[Sample], **generation: Any) -> GenerationResult:
        config = GenerationConfig.from_kwargs(**generation)
        embeds, mask = self._prefill_inputs(samples)
        return generate(self.model.language_model, inputs_embeds=embeds, attention_mask=mask,
                        tokenizer=self.tokenizer, config=config)  # fmt: skip

    @torch.inference_mode()
    def _prefill_inputs(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> inputs_embeds [batch, seq, dim] with images spliced in, attention_mask [batch, seq] (left padded)."""
        batch = self.processor(samples, padding_side="left", add_generation_prompt=True)
        embeds = self.model.embed(input_ids=batch["input_ids"].to(self.model.device),
                                  pixel_values=batch["pixel_values"])  # fmt: skip
        return embeds, batch["attention_mask"].to(self.model.device)

    def info(self) -> dict[str, Any]:
        """A summary for ``vlmkit info``: parts, sizes and parameter counts."""
        m = self.model
        counts = {name: sum(p.numel() for p in getattr(m, name).parameters())
                  for name in ("vision", "projector", "language_model")}  # fmt: skip
        return {
            "vision": m.vision.model_type,
            "language": self.config.language.hf_config.get("model_type"),
            "projector": self.config.projector.type,
            "image_size": self.config.vision.image_size,
            "image_tokens": m.num_image_tokens,
            "template": self.processor.template,
            "dtype": str(m.dtype).replace("torch.", ""),
            "parameters": counts | {"total": sum(counts.values())},
        }


def _replace_dir(staging: Path, target: Path) -> None:
    """Swap ``staging`` into place; an existing ``target`` is removed only after the new one is complete."""
    if target.exists() and not target.is_dir():
        raise ModelDirError(f"cannot save to {target}: it exists and is not a directory")
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)
    staging.parent.joinpath(target.name).chmod(0o755)


def _check_overwritable(target: Path) -> None:
    """Never replace a directory that holds something other than a vlmkit model."""
    if target.is_dir() and any(target.iterdir()):
        config = target / "config.json"
        if not config.exists() or "vlmkit_version" not in config.read_text(errors="replace"):
            raise ModelDirError(f"refusing to overwrite {target}: it is not empty and not a vlmkit model directory")
