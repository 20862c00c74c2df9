"""Our own KV-cached decode loop over a transformers causal LM fed with ``inputs_embeds``.

Generation does not care where the embeddings came from (text only, or with image features spliced in): the
prompt is prefilled from ``inputs_embeds`` and each decode step feeds the new token ids. Prefill, the decode
step and token selection are separate: ``runner.py`` runs the model over a dynamic or a static (optionally
compiled) cache, this module picks tokens. Host syncs (a ``.tolist()`` of the new tokens and finished flags) happen
every ``DecodeOptions.sync_every`` steps (1 by default and always when streaming); rows that finish keep running on
the pad id until the whole batch is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from vlmkit.generation.beam import beam_search
from vlmkit.generation.config import DecodeOptions, GenerationConfig, GenerationResult
from vlmkit.generation.draft import affordable as draft_affordable
from vlmkit.generation.draft import float16_draft
from vlmkit.generation.forward import check_inputs
from vlmkit.generation.kv_cache import PromptKV
from vlmkit.generation.runner import DynamicRunner, make_runner
from vlmkit.generation.sampling import make_generator, mark_seen, new_seen_mask, select_next_tokens
from vlmkit.generation.speculative import speculative_steps
from vlmkit.generation.stopping import (
    RowState,
    StopStrings,
    record_step,
    resolve_eos_token_ids,
    resolve_pad_token_id,
)
from vlmkit.quantization import is_quantized

# draft tokens per round when ``DecodeOptions.speculative`` is None (auto): a float16 draft agrees with its model
# on nearly every token, so long rounds pay (CPU benchmark: 15.5 of 16 proposals accepted per round)
AUTO_DRAFT_TOKENS = 16


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
    options: DecodeOptions,
    past: PromptKV | None = None,
    on_prefill: Callable[[PromptKV], None] | None = None,
) -> Iterator[list[RowState]]:
    """Greedy / sampling loop; yields the (mutated) row records after every host sync, the last time with all done.

    inputs_embeds   # [batch, seq - past.length, dim]
    attention_mask  # [batch, seq]
    """
    batch = inputs_embeds.shape[0]
    runner = make_runner(lm, attention_mask=attention_mask, past=past, max_new_tokens=config.max_new_tokens,
                         options=options, dtype=inputs_embeds.dtype)  # fmt: skip
    try:
        logits = runner.prefill(inputs_embeds)
        if on_prefill is not None:
            on_prefill(runner.prompt_kv())
        draft_tokens = _draft_tokens(runner, config=config, options=options, batch=batch)
        draft = float16_draft(runner.lean) if draft_tokens else None
        if draft is not None:
            yield from speculative_steps(runner.fast, draft, logits=logits, position=attention_mask.shape[1],
                                         cache=runner.cache, max_new_tokens=config.max_new_tokens,
                                         draft_tokens=draft_tokens, eos_token_ids=eos_token_ids,
                                         stops=stops, head=runner.greedy_head())  # fmt: skip
            return
        yield from _select_loop(runner, logits=logits, batch=batch, config=config, eos_token_ids=eos_token_ids,
                                pad_token_id=pad_token_id, stops=stops, sync_every=options.sync_every)  # fmt: skip
    finally:
        runner.close()


def _draft_tokens(
    runner: DynamicRunner, *, config: GenerationConfig, options: DecodeOptions, batch: int
) -> int:
    """Draft tokens per round for this request (0: decode plainly; see ``DecodeOptions.speculative``)."""
    lean = getattr(runner, "lean", None)  # a plain float32 Llama on CPU, unpadded, over a plain dynamic cache
    if lean is None or batch != 1 or config.do_sample or config.repetition_penalty != 1:
        return 0
    if is_quantized(lean):  # its float16 draft would stream more bytes than the quantized model itself
        return 0
    if options.speculative is not None:
        return options.speculative
    # auto: where a step streams weights too big for the CPU caches (the oneDNN twin's threshold), if the draft's
    # memory is affordable
    return AUTO_DRAFT_TOKENS if runner.fast is not lean and draft_affordable(lean) else 0


def _select_loop(
    runner: DynamicRunner,
    *,
    logits: torch.Tensor,
    batch: int,
    config: GenerationConfig,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    stops: StopStrings,
    sync_every: int,
) -> Iterator[list[RowState]]:
    """Pick tokens on device; every ``sync_every`` steps read them back once and update the host row records.

    Stop strings are found on the host, so with ``sync_every > 1`` a stopped row may run a few extra steps before
    it is fed pads; its record is already closed and rows never see each other, so the output does not change.
    """
    device = logits.device
    generator = make_generator(seed=config.seed, device=device)
    seen = (
        new_seen_mask(batch=batch, vocab=logits.shape[-1], device=device)
        if config.repetition_penalty != 1
        else None
    )
    # plain greedy needs only the argmax: a large output layer is screened first (greedy_head.py)
    head = runner.greedy_head() if not config.do_sample and seen is None else None
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # [batch]
    rows = [RowState() for _ in range(batch)]
    pending: list[torch.Tensor] = []  # per unsynced step: [2, batch] (token, finished)
    tokens = select_next_tokens(logits, config=config, seen=seen, generator=generator)  # [batch]
    for step in range(config.max_new_tokens):
        tokens = torch.where(finished, pad_token_id, tokens)
        finished = finished | torch.isin(tokens, eos)
        pending.append(torch.stack((tokens, finished.long())))
        last = step == config.max_new_tokens - 1
        if last or len(pending) == sync_every:
            stopped = _record(rows, steps=torch.stack(pending).tolist(), stops=stops)  # the one sync
            pending = []
            if stopped:
                finished[torch.tensor(stopped, device=device)] = True
            if last:
                for row in rows:
                    row.finish_reason = row.finish_reason or "length"
            yield rows
            if all(row.done for row in rows):
                return
        if head is not None:
            tokens = runner.greedy_step(tokens, head=head)
            continue
        seen = mark_seen(seen, tokens=tokens) if seen is not None else None
        logits = runner.step(tokens)
        tokens = select_next_tokens(logits, config=config, seen=seen, generator=generator)


def _record(rows: list[RowState], *, steps: list[list[list[int]]], stops: StopStrings) -> list[int]:
    """Apply synced steps ([steps, 2, batch] host ints) in order; returns the rows that hit a stop string."""
    stopped: list[int] = []
    for host_tokens, host_eos in steps:
        stopped += record_step(rows, tokens=host_tokens, eos_hit=host_eos, stops=stops)
    return stopped


def _prepare(
    lm: Any,
    *,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: Any,
    config: GenerationConfig,
    eos_token_ids: Sequence[int] | None,
    past: PromptKV | None,
) -> tuple[list[int], int, StopStrings]:
    config.validate()
    past_length = past.length if past is not None else 0
    check_inputs(inputs_embeds=inputs_embeds, attention_mask=attention_mask, past_length=past_length)
    if past is not None and (config.num_beams > 1 or inputs_embeds.shape[0] != 1):
        raise ValueError("a reused prompt prefix (past) needs a batch of 1 and num_beams=1")
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
    options: DecodeOptions | None = None,
    past: PromptKV | None = None,
    on_prefill: Callable[[PromptKV], None] | None = None,
) -> GenerationResult:
    """Generate continuations for a left-padded batch of prompt embeddings.

    inputs_embeds   # [batch, seq, dim] left padded, in the LM's dtype / device ([1, seq - past.length, dim] with past)
    attention_mask  # [batch, seq] 0 on pads
    ``eos_token_ids`` defaults to the LM's generation config eos ids plus the tokenizer's; pass ``[]`` to never
    stop on eos. Greedy when ``config.temperature == 0``, sampling otherwise, beam search when ``num_beams > 1``.
    ``options`` picks the cache / compiled step / sync interval (greedy output is the same for all); ``past`` is the
    KV of the prompt's first positions (batch 1), ``on_prefill`` receives the whole prompt's KV after prefill.
    Beam search always runs eagerly on a dynamic cache.
    """
    eos, pad, stops = _prepare(lm, inputs_embeds=inputs_embeds, attention_mask=attention_mask, tokenizer=tokenizer,
                               config=config, eos_token_ids=eos_token_ids, past=past)  # fmt: skip
    run = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, config=config)
    if config.num_beams > 1:
        rows = beam_search(lm, **run, eos_token_ids=eos, pad_token_id=pad, stops=stops)
    else:
        steps = _token_steps(lm, **run, eos_token_ids=eos, pad_token_id=pad, stops=stops,
                             options=options or DecodeOptions(), past=past, on_prefill=on_prefill)  # fmt: skip
        *_, rows = steps  # the last yield has every row done
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
    options: DecodeOptions | None = None,
    past: PromptKV | None = None,
    on_prefill: Callable[[PromptKV], None] | None = None,
) -> Iterator[str]:
    """Yield text deltas for one prompt as tokens arrive; ``"".join`` equals ``generate(...).texts[0]``.

    inputs_embeds   # [1, seq, dim]  ([1, seq - past.length, dim] with past)
    attention_mask  # [1, seq]
    Never yields half a UTF-8 character nor text that may still become a stop string. Beams -> ValueError.
    ``options.sync_every`` is ignored: a stream reads every token back as soon as it exists.
    """
    if config.num_beams > 1:
        raise ValueError(
            f"num_beams={config.num_beams}: stream supports greedy or sampling only (num_beams=1)"
        )
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
        raise ValueError(f"stream takes a batch of 1, got inputs_embeds shape {tuple(inputs_embeds.shape)}")
    eos, pad, stops = _prepare(lm, inputs_embeds=inputs_embeds, attention_mask=attention_mask, tokenizer=tokenizer,
                               config=config, eos_token_ids=eos_token_ids, past=past)  # fmt: skip
    options = dataclasses.replace(options or DecodeOptions(), sync_every=1)
    steps = _token_steps(lm, inputs_embeds=inputs_embeds, attention_mask=attention_mask, config=config,
                         eos_token_ids=eos, pad_token_id=pad, stops=stops, options=options, past=past,
                         on_prefill=on_prefill)  # fmt: skip
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
