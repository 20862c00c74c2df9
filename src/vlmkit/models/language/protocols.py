"""What vlmkit needs of a causal language model, as a static type (a transformers ``*ForCausalLM`` fits).

The models package builds the LM (``build_language_model``, ``load_language_model``) and everything above it
(generation, cache, api, training, serving) takes a ``LanguageModel`` instead of ``Any``. Only the members
vlmkit calls are listed; the object is an ``nn.Module`` too, whose module API is declared here as far as used.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import GenerationConfig, PretrainedConfig


class LanguageModelOutput(Protocol):
    """The forward result: ``logits`` [batch, seq, vocab] (``loss`` when labels were given)."""

    @property
    def logits(self) -> torch.Tensor: ...


class LanguageModel(Protocol):
    """A causal LM driven through ``inputs_embeds`` (or ``input_ids``) with a KV cache keyword (``kv_cache.py``)."""

    @property
    def config(self) -> PretrainedConfig: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def generation_config(self) -> GenerationConfig | None: ...

    @property
    def base_model_prefix(self) -> str: ...

    @property
    def training(self) -> bool: ...

    def __call__(self, **inputs: Any) -> Any:
        """inputs_embeds [batch, seq, dim] or input_ids [batch, seq], attention_mask, position_ids, the cache
        keyword, use_cache, labels, logits_to_keep -> a ``LanguageModelOutput``."""

    def get_input_embeddings(self) -> nn.Embedding: ...

    def get_output_embeddings(self) -> nn.Module | None: ...

    def set_output_embeddings(self, value: nn.Module) -> None: ...

    def resize_token_embeddings(self, new_num_tokens: int, *, mean_resizing: bool = ...) -> Any: ...

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> Any: ...

    def parameters(self, recurse: bool = ...) -> Iterator[nn.Parameter]: ...

    def named_parameters(
        self, prefix: str = ..., recurse: bool = ...
    ) -> Iterator[tuple[str, nn.Parameter]]: ...

    def named_buffers(self, prefix: str = ..., recurse: bool = ...) -> Iterator[tuple[str, torch.Tensor]]: ...

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def get_submodule(self, target: str) -> nn.Module: ...

    def eval(self) -> Any: ...


def lm_module(lm: LanguageModel) -> nn.Module:
    """``lm`` as the ``nn.Module`` it is, for APIs typed on modules (PEFT, checkpointing, weight digests)."""
    if not isinstance(lm, nn.Module):
        raise TypeError(f"the language model must be a torch nn.Module, got {type(lm).__name__}")
    return lm
