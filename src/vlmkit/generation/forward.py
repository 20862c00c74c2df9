"""The two model calls of the decode loop: prefill the prompt embeddings, then one token per step.

Both return float32 logits of the last position only; position ids follow transformers for left padding
(``cumsum(mask) - 1``, pads clamped to 0). ``runner.py`` drives them over a dynamic or a static cache.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmkit.generation.kv_cache import accepts_logits_to_keep, cache_kwarg
from vlmkit.models.language.protocols import LanguageModel


def _forward_last_logits(lm: LanguageModel, *, cache: Any, **inputs: torch.Tensor) -> torch.Tensor:
    """One forward pass that updates ``cache``; returns the last position's logits as float32.  # [batch, vocab]"""
    kwargs: dict[str, Any] = {cache_kwarg(lm): cache, "use_cache": True, **inputs}
    if accepts_logits_to_keep(lm):
        kwargs["logits_to_keep"] = 1  # skip the lm_head on prompt positions
    logits = lm(**kwargs).logits[:, -1, :]
    return logits.to(torch.float32)


def prompt_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded prompt: cumsum(mask) - 1, pads clamped to 0.  # [batch, seq]"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prefill(
    lm: LanguageModel,
    *,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Any,
    past_length: int = 0,
) -> torch.Tensor:
    """Run the prompt, filling ``cache``; returns the logits for the first new token.

    inputs_embeds   # [batch, seq - past_length, dim] left padded (the positions ``cache`` does not hold yet)
    attention_mask  # [batch, seq] 0 on pads (a static cache takes [batch, cache_len]: the prompt, then ones)
    returns         # [batch, vocab] float32
    """
    positions = prompt_position_ids(attention_mask)[:, past_length : past_length + inputs_embeds.shape[1]]
    return _forward_last_logits(
        lm, cache=cache, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=positions
    )


def decode_step(
    lm: LanguageModel,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Any,
) -> torch.Tensor:
    """Feed one new token per row on top of ``cache``; returns the next logits.

    input_ids       # [batch, 1]
    attention_mask  # [batch, cached + 1] (prompt mask followed by ones)
    position_ids    # [batch, 1]
    returns         # [batch, vocab] float32
    """
    return _forward_last_logits(
        lm, cache=cache, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    )


def check_inputs(*, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past_length: int = 0) -> None:
    """Shapes match and padding is on the left (one host sync, once per call).

    With ``past_length`` cached positions, ``inputs_embeds`` covers only the rest: [batch, seq - past_length, dim].
    """
    if inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be [batch, seq, dim], got shape {tuple(inputs_embeds.shape)}")
    expected = (inputs_embeds.shape[0], inputs_embeds.shape[1] + past_length)
    if tuple(attention_mask.shape) != expected:
        what = (
            f"[batch, seq] = {expected}"
            if not past_length
            else f"[batch, {past_length} cached + new] = {expected}"
        )
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match inputs_embeds {what}"
        )
    if inputs_embeds.shape[1] == 0 or not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "attention_mask must be left padded: the last prompt position of every row must be 1"
        )
