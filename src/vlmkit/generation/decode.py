"""Our own KV-cached decode loop over a transformers causal LM fed with ``inputs_embeds``.

Generation does not care where the embeddings came from (text only, or with image features spliced in): the
prompt is prefilled from ``inputs_embeds`` and each decode step feeds the new token ids. Prefill, the decode
step and token selection are separate: a decode backend (``backend.select_backend`` picks one per request:
``runner.py``'s dynamic, static, compiled and beam ones, ``cpu_llama/``'s lean CPU ones) runs the model, this
module picks tokens. Host syncs (a ``.tolist()`` of the new tokens and finished flags) happen
every ``DecodeOptions.sync_every`` steps (1 by default and always when streaming); rows that finish keep running on
the pad id until the whole batch is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch

from vlmkit.generation.backend import DecodeBackend, DecodeResources, Speculator, select_backend
from vlmkit.generation.beam import beam_search
from vlmkit.generation.config import DecodeOptions, GenerationConfig, GenerationResult
from vlmkit.generation.forward import check_inputs
from vlmkit.generation.kv_cache import PromptKV
from vlmkit.generation.runner import BeamRunner
from vlmkit.generation.sampling import make_generator, mark_seen, new_seen_mask, select_next_tokens
from vlmkit.generation.stopping import (
    RowState,
    StopStrings,
    record_step,
    resolve_eos_token_ids,
    resolve_pad_token_id,
)
from vlmkit.models.language.protocols import LanguageModel
from vlmkit.processing.tokenizer_protocol import Tokenizer


@torch.no_grad()
def _token_steps(
    lm: LanguageModel,
    *,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    stops: StopStrings,
    options: DecodeOptions,
    resources: DecodeResources | None,
    past: PromptKV | None = None,
    on_prefill: Callable[[PromptKV], None] | None = None,
) -> Iterator[list[RowState]]:
    """The decode loop over the backend ``select_backend`` picks: yields the (mutated) row records after every host
    sync (a speculative round, the whole beam search), the last time with all done.

    inputs_embeds   # [batch, seq - past.length, dim]
    attention_mask  # [batch, seq]
    """
    backend, _ = select_backend(lm, attention_mask=attention_mask, config=config, options=options,
                                resources=resources, past=past, dtype=inputs_embeds.dtype)  # fmt: skip
    try:
        if isinstance(backend, BeamRunner):
            yield beam_search(backend, inputs_embeds=inputs_embeds, config=config, eos_token_ids=eos_token_ids,
                              pad_token_id=pad_token_id, stops=stops)  # fmt: skip
            return
        logits = backend.prefill(inputs_embeds)
        if on_prefill is not None:
            on_prefill(backend.prompt_kv())
        if isinstance(backend, Speculator):  # several greedy tokens per pass
            yield from backend.rounds(logits, max_new_tokens=config.max_new_tokens, eos_token_ids=eos_token_ids,
                                      stops=stops)  # fmt: skip
            return
        yield from _select_loop(backend, logits=logits, batch=inputs_embeds.shape[0], config=config,
                                eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, stops=stops,
                                sync_every=options.sync_every)  # fmt: skip
    finally:
        backend.close()


def _select_loop(
    backend: DecodeBackend,
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
    # plain greedy needs only the argmax: the backend may get it without the whole output layer (screened head)
    greedy = not config.do_sample and seen is None
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
        if greedy:
            tokens = backend.greedy_step(tokens)
            continue
        seen = mark_seen(seen, tokens=tokens) if seen is not None else None
        logits = backend.step(tokens)
        tokens = select_next_tokens(logits, config=config, seen=seen, generator=generator)


def _record(rows: list[RowState], *, steps: list[list[list[int]]], stops: StopStrings) -> list[int]:
    """Apply synced steps ([steps, 2, batch] host ints) in order; returns the rows that hit a stop string."""
    stopped: list[int] = []
    for host_tokens, host_eos in steps:
        stopped += record_step(rows, tokens=host_tokens, eos_hit=host_eos, stops=stops)
    return stopped


def _prepare(
    lm: LanguageModel,
    *,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: Tokenizer,
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
    lm: LanguageModel,
    *,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: Tokenizer,
    config: GenerationConfig,
    eos_token_ids: Sequence[int] | None = None,
    options: DecodeOptions | None = None,
    past: PromptKV | None = None,
    on_prefill: Callable[[PromptKV], None] | None = None,
    resources: DecodeResources | None = None,
) -> GenerationResult:
    """Generate continuations for a left-padded batch of prompt embeddings.

    inputs_embeds   # [batch, seq, dim] left padded, in the LM's dtype / device ([1, seq - past.length, dim] with past)
    attention_mask  # [batch, seq] 0 on pads
    ``eos_token_ids`` defaults to the LM's generation config eos ids plus the tokenizer's; pass ``[]`` to never
    stop on eos. Greedy when ``config.temperature == 0``, sampling otherwise, beam search when ``num_beams > 1``.
    ``options`` picks the cache / compiled step / sync interval (greedy output is the same for all); ``past`` is the
    KV of the prompt's first positions (batch 1), ``on_prefill`` receives the whole prompt's KV after prefill.
    Beam search always runs eagerly on a dynamic cache. ``resources`` keep static caches and weight twins between
    calls (``VLM`` passes its own; without, each call builds what it needs).
    """
    eos, pad, stops = _prepare(lm, inputs_embeds=inputs_embeds, attention_mask=attention_mask, tokenizer=tokenizer,
                               config=config, eos_token_ids=eos_token_ids, past=past)  # fmt: skip
    steps = _token_steps(lm, inputs_embeds=inputs_embeds, attention_mask=attention_mask, config=config,
                         eos_token_ids=eos, pad_token_id=pad, stops=stops, options=options or DecodeOptions(),
                         resources=resources, past=past, on_prefill=on_prefill)  # fmt: skip
    *_, rows = steps  # the last yield has every row done
    texts = [stops.cut(stops.decode(row.token_ids)) for row in rows]
    return GenerationResult(
        token_ids=[list(row.token_ids) for row in rows],
        texts=texts,
        finish_reasons=[row.finish_reason or "length" for row in rows],
    )


def stream(
    lm: LanguageModel,
    *,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: Tokenizer,
    config: GenerationConfig,
    eos_token_ids: Sequence[int] | None = None,
    options: DecodeOptions | None = None,
    past: PromptKV | None = None,
    on_prefill: Callable[[PromptKV], None] | None = None,
    resources: DecodeResources | None = None,
) -> Iterator[str]:
    """Yield text deltas for one prompt as tokens arrive; ``"".join`` equals ``generate(...).texts[0]``.

    inputs_embeds   # [1, seq, dim]  ([1, seq - past.length, dim] with past)
    attention_mask  # [1, seq]
    Never yields half a UTF-8 character nor text that may still become a stop string. Beams -> ValueError.
    ``options.sync_every`` is ignored: a stream reads every token back as soon as it exists.
    """
    if config.num_beams > 1 or (options is not None and options.backend == "beam"):
        raise ValueError(
            f"num_beams={config.num_beams}: stream supports greedy or sampling only (num_beams=1)"
        )
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
        raise ValueError(f"stream takes a batch of 1, got inputs_embeds shape {tuple(inputs_embeds.shape)}")
    eos, pad, stops = _prepare(lm, inputs_embeds=inputs_embeds, attention_mask=attention_mask, tokenizer=tokenizer,
                               config=config, eos_token_ids=eos_token_ids, past=past)  # fmt: skip
    options = dataclasses.replace(options or DecodeOptions(), sync_every=1)
    steps = _token_steps(lm, inputs_embeds=inputs_embeds, attention_mask=attention_mask, config=config,
                         eos_token_ids=eos, pad_token_id=pad, stops=stops, options=options, resources=resources,
                         past=past, on_prefill=on_prefill)  # fmt: skip
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
