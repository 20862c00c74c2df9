"""Our own KV-cached decode loop over a transformers causal LM fed with ``inputs_embeds``.

Generation does not care where the embeddings came from (text only, or with image features spliced in): the
prompt is prefilled from ``inputs_embeds`` and each decode step feeds the new token ids. Prefill, the decode
step and token selection are separate functions so a static cache / compiled decode step can replace them.
Per step there is one host sync (a ``.tolist()`` of the new tokens and finished flags); rows that finish keep
running on the pad id until the whole batch is done.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from vlmkit.generation.beam import beam_search
from vlmkit.generation.config import GenerationConfig, GenerationResult
from vlmkit.generation.forward import check_inputs, decode_step, prefill
from vlmkit.generation.kv_cache import new_cache
from vlmkit.generation.sampling import make_generator, mark_seen, new_seen_mask, select_next_tokens
from vlmkit.generation.stopping import (
    RowState,
    StopStrings,
    record_step,
    resolve_eos_token_ids,
    resolve_pad_token_id,
)


@torch.no_grad()
def _token_steps(
    lm: Any,
    *,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    stops: StopStrings,
) -> Iterator[list[RowState]]:
    """Greedy / sampling loop; yields the (mutated) row records after every step, the last time with all done."""
    batch = inputs_embeds.shape[0]
    cache = new_cache(lm)
    logits = prefill(lm, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache)
    device = logits.device
    generator = make_generator(seed=config.seed, device=device)
    penalise = config.repetition_penalty != 1
    seen = new_seen_mask(batch=batch, vocab=logits.shape[-1], device=device) if penalise else None
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # [batch]
    mask = attention_mask
    positions = attention_mask.long().sum(-1, keepdim=True).to(device)  # [batch, 1] next token's position
    rows = [RowState() for _ in range(batch)]
    for step in range(config.max_new_tokens):
        tokens = select_next_tokens(logits, config=config, seen=seen, generator=generator)  # [batch]
        tokens = torch.where(finished, pad_token_id, tokens)
        finished = finished | torch.isin(tokens, eos)
        host_tokens, host_eos = torch.stack((tokens, finished.long())).tolist()  # the one sync per step
        stopped = record_step(rows, tokens=host_tokens, eos_hit=host_eos, stops=stops)
        if stopped:
            finished[torch.tensor(stopped, device=device)] = True
        if step == config.max_new_tokens - 1:
            for row in rows:
                row.finish_reason = row.finish_reason or "length"
        yield rows
        if all(row.done for row in rows):
            return
        seen = mark_seen(seen, tokens=tokens) if seen is not None else None
        mask = torch.cat((mask, mask.new_ones(batch, 1)), dim=-1)
        logits = decode_step(
            lm, input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, cache=cache
        )
        positions = positions + 1


def _prepare(
    lm: Any,
    *,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: Any,
    config: GenerationConfig,
    eos_token_ids: Sequence[int] | None,
) -> tuple[list[int], int, StopStrings]:
    config.validate()
    check_inputs(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    eos = resolve_eos_token_ids(lm=lm, tokenizer=tokenizer, eos_token_ids=eos_token_ids)
    pad = resolve_pad_token_id(lm=lm, tokenizer=tokenizer, eos_token_ids=eos)
    return eos, pad, StopStrings(tokenizer=tokenizer, stops=config.stop)


def generate(
    lm: Any,
    *,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: Any,
    config: GenerationConfig,
    eos_token_ids: Sequence[int] | None = None,
) -> GenerationResult:
    """Generate continuations for a left-padded batch of prompt embeddings.

    inputs_embeds   # [batch, seq, dim] left padded, in the LM's dtype / device
    attention_mask  # [batch, seq] 0 on pads
    ``eos_token_ids`` defaults to the LM's generation config eos ids plus the tokenizer's; pass ``[]`` to never
    stop on eos. Greedy when ``config.temperature == 0``, sampling otherwise, beam search when ``num_beams > 1``.
    """
    eos, pad, stops = _prepare(
        lm,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        tokenizer=tokenizer,
        config=config,
        eos_token_ids=eos_token_ids,
    )
    run = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, config=config)
    if config.num_beams > 1:
        rows = beam_search(lm, **run, eos_token_ids=eos, pad_token_id=pad, stops=stops)
    else:
        *_, rows = _token_steps(lm, **run, eos_token_ids=eos, pad_token_id=pad, stops=stops)  # last: all done
    texts = [stops.cut(stops.decode(row.token_ids)) for row in rows]
    return GenerationResult(
        token_ids=[list(row.token_ids) for row in rows],
        texts=texts,
        finish_reasons=[row.finish_reason or "length" for row in rows],
    )


def stream(
    lm: Any,
    *,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: Any,
    config: GenerationConfig,
    eos_token_ids: Sequence[int] | None = None,
) -> Iterator[str]:
    """Yield text deltas for one prompt as tokens arrive; ``"".join`` equals ``generate(...).texts[0]``.

    inputs_embeds   # [1, seq, dim]
    attention_mask  # [1, seq]
    Never yields half a UTF-8 character nor text that may still become a stop string. Beams -> ValueError.
    """
    if config.num_beams > 1:
        raise ValueError(
            f"num_beams={config.num_beams}: stream supports greedy or sampling only (num_beams=1)"
        )
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
        raise ValueError(f"stream takes a batch of 1, got inputs_embeds shape {tuple(inputs_embeds.shape)}")
    eos, pad, stops = _prepare(
        lm,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        tokenizer=tokenizer,
        config=config,
        eos_token_ids=eos_token_ids,
    )
    steps = _token_steps(
        lm,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        config=config,
        eos_token_ids=eos,
        pad_token_id=pad,
        stops=stops,
    )
    return _text_deltas(steps, stops=stops)


def _text_deltas(steps: Iterator[list[RowState]], *, stops: StopStrings) -> Iterator[str]:
    """Turn per-step row records (batch of 1) into text deltas that are never taken back."""
    emitted = ""
    for (row,) in steps:
        text = stops.decode(row.token_ids)
        visible = stops.cut(text) if row.done else stops.stream_safe(text)
        # decoding is prefix-stable for byte-level tokenizers; anything else waits until it is
        if len(visible) > len(emitted) and visible.startswith(emitted):
            yield visible[len(emitted) :]
            emitted = visible
