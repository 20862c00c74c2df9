"""The model side of the decode loop: prefill once, then one token per step, over a dynamic or a static cache.

``DynamicRunner`` grows transformers' ``DynamicCache`` step by step (eager; the CPU default: on CPU the
static/compiled path measured no faster, see docs/inference.md); for a float32 Llama on CPU and a batch without
padding its decode step is ``lean_step.py``'s op-for-op copy of the model's forward (bitwise equal logits, without
the per-call overhead that dominates small models, and appending KV in place instead of re-concatenating); on
models too big for the CPU caches it multiplies through oneDNN (``twins.py``: the same float32 maths, streamed
faster). ``StaticRunner`` writes into a pooled ``StaticCache`` whose
attention mask is preallocated at the full cache length, so every decode step has the same shapes and can run
compiled. Both can start from a ``PromptKV`` (a reused prompt prefix, batch 1) and hand the
prompt's KV back after prefill for the prefix cache.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmkit.generation.config import DecodeOptions
from vlmkit.generation.forward import decode_step, prefill, prompt_position_ids
from vlmkit.generation.greedy_head import ScreenedHead, screened_head
from vlmkit.generation.kv_cache import (
    PromptKV,
    accepts_logits_to_keep,
    cache_kwarg,
    fill_cache,
    new_cache,
    snapshot_prompt,
)
from vlmkit.generation.lean_step import lean_decode_step, lean_hidden, lean_step_model, plain_dynamic_cache
from vlmkit.generation.static_cache import (
    DEFAULT_POOL,
    DecodeStep,
    StaticCachePool,
    bucket_length,
    compile_options,
    forward_logits,
    static_cache_supported,
)
from vlmkit.generation.twins import onednn_gemm_twin, onednn_twin


class DynamicRunner:
    """Eager prefill + decode over a ``DynamicCache``.

    attention_mask  # [batch, seq] the whole prompt (cached prefix included), left padded
    """

    def __init__(self, lm: Any, *, attention_mask: torch.Tensor, past: PromptKV | None) -> None:
        self.lm = lm
        self.cache = new_cache(lm)
        self.past_length = past.length if past is not None else 0
        if past is not None:
            fill_cache(self.cache, past)
        self.mask = attention_mask
        self.prompt_length = attention_mask.shape[1]
        self.positions = attention_mask.long().sum(-1, keepdim=True)  # [batch, 1] next token's position
        # small Llama on CPU without padding: the same ops as the model's forward without its per-call overhead
        # (bitwise equal logits; see lean_step.py); the mask is then never needed again
        self.lean = lean_step_model(lm, attention_mask=attention_mask)
        # a bandwidth-bound step streams every weight once: oneDNN streams them faster (see twins.py)
        self.fast = self.lean and (onednn_twin(self.lean) or self.lean)

    def prefill(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        # a prompt of many rows is compute-bound: oneDNN's GEMM where it is faster (see twins.py)
        lm = onednn_gemm_twin(self.lm, rows=inputs_embeds.shape[0] * inputs_embeds.shape[1]) or self.lm
        logits = prefill(lm, inputs_embeds=inputs_embeds, attention_mask=self.mask, cache=self.cache,
                         past_length=self.past_length)  # fmt: skip
        if self.lean is not None and not plain_dynamic_cache(
            self.cache, num_layers=len(self.lean.model.layers)
        ):
            # the cache has its layers now: a sliding-window / quantised layer takes the model's path
            self.lean = self.fast = None
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch] -> next logits [batch, vocab] float32."""
        if self.lean is not None:
            logits = lean_decode_step(self.fast, input_ids=tokens[:, None], position_ids=self.positions,
                                      cache=self.cache)  # fmt: skip
            self.positions = self.positions + 1
            return logits
        self.mask = torch.cat((self.mask, self.mask.new_ones(self.mask.shape[0], 1)), dim=-1)
        logits = decode_step(self.lm, input_ids=tokens[:, None], attention_mask=self.mask,
                             position_ids=self.positions, cache=self.cache)  # fmt: skip
        self.positions = self.positions + 1
        return logits

    def greedy_head(self) -> ScreenedHead | None:
        """The screened argmax of the output layer when this runner's steps can use it (see ``greedy_step``)."""
        return screened_head(self.lean) if self.lean is not None else None

    def greedy_step(self, tokens: torch.Tensor, *, head: ScreenedHead) -> torch.Tensor:
        """tokens [batch] -> the next greedy tokens [batch], the output layer's argmax through ``head``."""
        hidden = lean_hidden(
            self.fast, input_ids=tokens[:, None], position_ids=self.positions, cache=self.cache
        )
        self.positions = self.positions + 1
        return head(hidden[:, -1])

    def prompt_kv(self) -> PromptKV:
        return snapshot_prompt(self.cache, length=self.prompt_length)

    def close(self) -> None:
        self.cache = None


class StaticRunner(DynamicRunner):
    """Prefill eagerly into a pooled ``StaticCache``; decode steps (optionally compiled) see fixed shapes.

    The mask is [batch, cache_len]: the prompt's mask, then ones (causality hides the positions not written yet).
    """

    def __init__(
        self,
        lm: Any,
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
        self.pool = pool
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

    def greedy_head(self) -> ScreenedHead | None:
        return None  # the static path keeps the model's own (compilable) step

    def close(self) -> None:
        if self.cache is not None:
            self.pool.release(self.pool_key, self.cache)
            self.cache = None


def make_runner(
    lm: Any,
    *,
    attention_mask: torch.Tensor,
    past: PromptKV | None,
    max_new_tokens: int,
    options: DecodeOptions,
    dtype: torch.dtype,
    pool: StaticCachePool | None = None,
) -> DynamicRunner:
    """A static runner when the options ask for one and the model's cache layout allows it, else dynamic."""
    if options.uses_static_cache and static_cache_supported(lm):
        return StaticRunner(lm, attention_mask=attention_mask, past=past, max_new_tokens=max_new_tokens,
                            options=options, dtype=dtype, pool=pool or DEFAULT_POOL)  # fmt: skip
    return DynamicRunner(lm, attention_mask=attention_mask, past=past)
