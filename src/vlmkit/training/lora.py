"""LoRA through peft: add adapters, save them as peft adapter directories, load them back, merge them.

A LoRA run's ``--out`` holds the merged model (an ordinary vlmkit directory that every command loads) and
``adapter/`` with the unmerged pieces: ``adapter/language`` (and ``adapter/vision`` with ``--lora-vision``)
are peft adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``), and
``adapter/projector.safetensors`` the trained projector, so the adapter can be re-applied to the base
model with ``load_adapters`` or shared on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from vlmkit.models.language.protocols import lm_module
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.quantization import is_quantized
from vlmkit.training.qlora import dequantize_bases, language_lora_config

ADAPTER_DIR = "adapter"


def _lora_config(*, rank: int, alpha: int, dropout: float, task_type: str | None) -> Any:
    from peft import LoraConfig

    # "all-linear": every attention and MLP linear; peft leaves the LM head out
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                      task_type=task_type)  # fmt: skip


def add_lora(model: VisionLanguageModel, *, rank: int, alpha: int, dropout: float, vision: bool) -> None:
    """Wrap the LM (and with ``vision`` the tower) in peft LoRA; base weights are frozen by peft.

    peft keeps adapters in fp32 when the base is bf16/fp16 (``autocast_adapter_dtype``), as ``plan`` assumes.
    A quantized LM gets QLoRA (``qlora.py``): the adapters sit on its quantized layers.
    """
    from peft import get_peft_model

    if is_quantized(model.language_model):
        lm_config = _lora_config(rank=rank, alpha=alpha, dropout=dropout, task_type="CAUSAL_LM")
        lm = lm_module(model.language_model)
        model.language_model = get_peft_model(lm, language_lora_config(lm, lm_config))
        if vision:
            model.vision.model = get_peft_model(
                model.vision.model, _lora_config(rank=rank, alpha=alpha, dropout=dropout, task_type=None)
            )
        return

    model.language_model = get_peft_model(
        lm_module(model.language_model),
        _lora_config(rank=rank, alpha=alpha, dropout=dropout, task_type="CAUSAL_LM"),
    )
    if vision:
        model.vision.model = get_peft_model(
            model.vision.model, _lora_config(rank=rank, alpha=alpha, dropout=dropout, task_type=None)
        )


def _peft_parts(model: VisionLanguageModel) -> dict[str, tuple[Any, str]]:
    """name -> (module holding the part, attribute) for each part that carries a peft wrapper."""
    from peft import PeftModel

    parts = {"language": (model, "language_model"), "vision": (model.vision, "model")}
    return {
        name: (owner, attr)
        for name, (owner, attr) in parts.items()
        if isinstance(getattr(owner, attr), PeftModel)
    }


def has_adapters(vlm: Any) -> bool:
    return bool(_peft_parts(vlm.model))


def save_adapters(vlm: Any, *, directory: str | Path) -> Path:
    """Write peft adapter dirs (``language``, ``vision``) and ``projector.safetensors`` under ``directory``."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    for name, (owner, attr) in _peft_parts(vlm.model).items():
        getattr(owner, attr).save_pretrained(target / name, safe_serialization=True)
    projector = {k: v.detach().contiguous() for k, v in vlm.model.projector.state_dict().items()}
    save_file(projector, str(target / "projector.safetensors"))
    return target


def load_adapters(vlm: Any, *, directory: str | Path, trainable: bool = False) -> Any:
    """Apply adapters saved by ``save_adapters`` to a base ``VLM`` (in place); -> the same VLM."""
    source = Path(directory)
    model = vlm.model
    for name, (owner, attr) in {
        "language": (model, "language_model"),
        "vision": (model.vision, "model"),
    }.items():
        if (source / name / "adapter_config.json").is_file():
            setattr(
                owner,
                attr,
                _from_pretrained(getattr(owner, attr), source / name, trainable=trainable),
            )
    if (source / "projector.safetensors").is_file():
        model.projector.load_state_dict(load_file(str(source / "projector.safetensors")))
    return vlm


def _from_pretrained(base: Any, directory: Path, *, trainable: bool) -> Any:
    """peft's ``PeftModel.from_pretrained``; a quantized base gets the QLoRA layer mapping (``qlora.py``)."""
    from peft import LoraConfig, PeftModel

    config = (
        language_lora_config(base, LoraConfig.from_pretrained(str(directory))) if is_quantized(base) else None
    )
    return PeftModel.from_pretrained(base, directory, is_trainable=trainable, config=config)


def merge_lora(vlm: Any) -> Any:
    """Fold LoRA adapters into the base weights in place (LM and tower); -> the same ``VLM``, adapter-free.

    A VLM without adapters is returned unchanged, so ``vlmkit export`` can call it unconditionally. A QLoRA
    model's quantized base layers are dequantized into the compute dtype first: the merged model is unquantized.
    """
    for owner, attr in _peft_parts(vlm.model).values():
        dequantize_bases(getattr(owner, attr), dtype=vlm.model.dtype)
        setattr(owner, attr, getattr(owner, attr).merge_and_unload())
    if vlm.model.config.quantization is not None and not is_quantized(vlm.model):
        vlm.model.config.quantization = None
    return vlm
