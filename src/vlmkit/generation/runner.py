"""The generic decode backends: the model's own forward over a dynamic, static (optionally compiled) cache, and
beam search's; ``backend.select_backend`` picks one per request (the CPU-Llama fast path is ``cpu_llama/``).

``DynamicRunner`` grows transformers' ``DynamicCache`` step by step (eager; the CPU default: on CPU the
static/compiled path measured no faster, see docs/inference.md). ``StaticRunner`` writes into a pooled
``StaticCache`` whose attention mask is preallocated at the full cache length, so every decode step has the same
shapes and can run compiled. ``BeamRunner`` is the dynamic one with rows reordered between steps. Each can start
from a ``PromptKV`` (a reused prompt prefix, batch 1) and hand the prompt's KV back after prefill for the prefix
cache.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmkit.generation.config import DecodeOptions
from vlmkit.generation.cpu_llama.twins import TwinCache, onednn_gemm_twin
from vlmkit.generation.forward import decode_step, prefill, prompt_position_ids
from vlmkit.generation.kv_cache import (
    PromptKV,
    accepts_logits_to_keep,
    cache_kwarg,
    fill_cache,
    new_cache,
    reorder_cache,
    snapshot_prompt,
)
from vlmkit.generation.static_cache import (
    DecodeStep,
    StaticCachePool,
    bucket_length,
    compile_options,
    forward_logits,
)
from vlmkit.models.language.protocols import LanguageModel


class DynamicRunner:
    """Eager prefill + decode over a ``DynamicCache``, through the model's own forward (``DecodeBackend``).

    attention_mask  # [batch, seq] the whole prompt (cached prefix included), left padded
    ``twins``: where the prefill's oneDNN GEMM twin is kept (float32 on CPU, see ``cpu_llama/twins.py``).
    """

    name = "dynamic"

    def __init__(
        self,
        lm: LanguageModel,
        *,
        attention_mask: torch.Tensor,
        past: PromptKV | None,
        twins: TwinCache | None,
        cache: Any = None,
    ) -> None:
        self.lm, self.twins = lm, twins
        # an empty ``new_cache(lm)`` (given: the one select_backend checked); a StaticCache in StaticRunner
        self.cache: Any = cache if cache is not None else new_cache(lm)
        self.past_length = past.length if past is not None else 0
        if past is not None:
            fill_cache(self.cache, past)
        self.mask = attention_mask
        self.prompt_length = attention_mask.shape[1]
        self.positions = attention_mask.long().sum(-1, keepdim=True)  # [batch, 1] next token's position

    def prefill(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [batch, seq - past, dim] -> first new token's logits [batch, vocab] float32."""
        lm = self.lm
        if self.twins is not None:  # a prompt of many rows is compute-bound: oneDNN's GEMM where it is faster
            rows = inputs_embeds.shape[0] * inputs_embeds.shape[1]
            lm = onednn_gemm_twin(self.lm, rows=rows, twins=self.twins) or self.lm
        return prefill(lm, inputs_embeds=inputs_embeds, attention_mask=self.mask, cache=self.cache,
                       past_length=self.past_length)  # fmt: skip

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch] -> next logits [batch, vocab] float32."""
        self.mask = torch.cat((self.mask, self.mask.new_ones(self.mask.shape[0], 1)), dim=-1)
        logits = decode_step(self.lm, input_ids=tokens[:, None], attention_mask=self.mask,
                             position_ids=self.positions, cache=self.cache)  # fmt: skip
        self.positions = self.positions + 1
        return logits

    def greedy_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch] -> the next greedy tokens [batch] (plain greedy requests: the argmax of ``step``)."""
        return self.step(tokens).argmax(dim=-1)

    def prompt_kv(self) -> PromptKV:
        return snapshot_prompt(self.cache, length=self.prompt_length)

    def close(self) -> None:
        self.cache = None


class BeamRunner(DynamicRunner):
    """Beam search's backend: the dynamic one, prefilled by the model itself, whose rows follow the beams."""

    name = "beam"

    def prefill(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return prefill(self.lm, inputs_embeds=inputs_embeds, attention_mask=self.mask, cache=self.cache,
                       past_length=self.past_length)  # fmt: skip

    def expand(self, rows: torch.Tensor) -> None:
        """Repeat the prompt's rows to beams.  rows [batch * beams] int64: the prompt row of each beam."""
        reorder_cache(self.cache, rows)
        self.mask = self.mask[rows.to(self.mask.device)]
        self.positions = self.mask.long().sum(-1, keepdim=True)

    def reorder(self, rows: torch.Tensor) -> None:
        """Each beam continues from cache row ``rows[i]`` (its parent; always a beam of the same prompt)."""
        reorder_cache(self.cache, rows)


class StaticRunner(DynamicRunner):
    """Prefill eagerly into a pooled ``StaticCache``; decode steps (optionally compiled) see fixed shapes.

    The mask is [batch, cache_len]: the prompt's mask, then ones (causality hides the positions not written yet).
    """

    name = "static"

    def __init__(
        self,
        lm: LanguageModel,
        *,
        attention_mask: torch.Tensor,
        past: PromptKV | None,
        max_new_tokens: int,
        options: DecodeOptions,
        dtype: torch.dtype,
        pool: StaticCachePool,
    ) -> None:
        batch, seq = attention_mask.shape
        device = attention_mask.device
        cache_len = bucket_length(seq + max_new_tokens)
        self.pool, self.twins = pool, None
        self.pool_key, cache = pool.acquire(lm, batch=batch, max_len=cache_len, dtype=dtype, device=device)
        self.lm, self.cache, self.prompt_length = lm, cache, seq
        self.past_length = past.length if past is not None else 0
        if past is not None:
            fill_cache(cache, past)
        self.mask = attention_mask.new_ones(batch, cache_len)
        self.mask[:, :seq] = attention_mask
        self.positions = attention_mask.long().sum(-1, keepdim=True)
        self.prompt_positions = prompt_position_ids(attention_mask)
        use_compile = options.compile is not False
        self.name = "compiled" if use_compile else "static"
        self.decode = DecodeStep(
            options=compile_options(options.compile, device=device) if use_compile else None
        )
        self.inputs: dict[str, Any] = {cache_kwarg(lm): cache, "use_cache": True, "attention_mask": self.mask}
        if accepts_logits_to_keep(lm):
            self.inputs["logits_to_keep"] = 1

    def prefill(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        positions = self.prompt_positions[:, self.past_length :]
        return self.decode_inputs(inputs_embeds=inputs_embeds, position_ids=positions, eager=True)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.decode_inputs(input_ids=tokens[:, None], position_ids=self.positions, eager=False)
        self.positions = self.positions + 1
        return logits

    def decode_inputs(self, *, eager: bool, **inputs: torch.Tensor) -> torch.Tensor:
        call = forward_logits if eager else self.decode
        return call(self.lm, self.inputs | inputs)

    def close(self) -> None:
        if self.cache is not None:
            self.pool.release(self.pool_key, self.cache)
            self.cache = None
