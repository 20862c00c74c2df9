"""Language model: any transformers causal LM, driven through ``inputs_embeds``."""

from __future__ import annotations

from typing import Any

from vlmkit.models.language.protocols import LanguageModel


def language_hf_config(hf_config: dict[str, Any]):
    from transformers import AutoConfig

    data = {k: v for k, v in hf_config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(hf_config["model_type"], **data)
    except ValueError as exc:
        raise ValueError(f"unsupported language model_type {hf_config['model_type']!r}: {exc}") from None


def build_language_model(hf_config: dict[str, Any]) -> LanguageModel:
    """A randomly initialised causal LM from its config dict (weights are loaded separately)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(language_hf_config(hf_config), trust_remote_code=False)


def ensure_vocab(model: LanguageModel, *, size: int) -> None:
    """Grow the input/output embeddings to hold ``size`` tokens (new rows: mean of the old ones)."""
    current = model.get_input_embeddings().weight.shape[0]
    if size > current:
        model.resize_token_embeddings(size, mean_resizing=True)
