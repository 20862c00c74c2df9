"""Beam search with the semantics of transformers' default (vectorised) beam search.

Scores are summed log-probabilities; a finished hypothesis is ranked by ``score / generated_len ** 1.0``
(``length_penalty=1.0``, eos counted). Each step keeps ``max(2, 1 + n_eos) * num_beams`` candidates so that
``num_beams`` unfinished ones remain; search ends when no running beam can beat the worst kept hypothesis
(``early_stopping=False`` heuristic), when every candidate finished, or at ``max_new_tokens``. The prompt is
prefilled once per row and the cache rows are then repeated to beams (``runner.BeamRunner``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmkit.generation.config import GenerationConfig
from vlmkit.generation.sampling import apply_repetition_penalty
from vlmkit.generation.stopping import RowState, StopStrings

LENGTH_PENALTY = 1.0
_NEG = -1.0e9  # "impossible" score, as transformers uses (finite, so sums stay ordered)


@dataclass
class _Beams:
    """Device state of a beam search.  B = batch, K = num_beams, N = max_new_tokens."""

    running_tokens: torch.Tensor  # [B, K, N] int64, pad-filled
    running_scores: torch.Tensor  # [B, K] summed log-probs, sorted descending
    running_parents: torch.Tensor  # [B, K] beam each running beam came from at the last step
    done_tokens: torch.Tensor  # [B, K, N] best finished hypotheses
    done_scores: torch.Tensor  # [B, K] length-normalised, sorted descending (_NEG = empty slot)
    done_lengths: torch.Tensor  # [B, K] generated tokens of each hypothesis (eos included)
    done_filled: torch.Tensor  # [B, K] bool, slot holds a real hypothesis
    improvable: torch.Tensor  # [B, 1] bool, a running beam may still beat the kept hypotheses


def _init_beams(*, batch: int, beams: int, max_new: int, pad: int, device: torch.device) -> _Beams:
    tokens = torch.full((batch, beams, max_new), pad, dtype=torch.long, device=device)
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = _NEG  # all beams start identical: only the first may expand at step 0
    return _Beams(
        running_tokens=tokens,
        running_scores=running_scores,
        running_parents=torch.zeros(batch, beams, dtype=torch.long, device=device),
        done_tokens=tokens.clone(),
        done_scores=torch.full((batch, beams), _NEG, device=device),
        done_lengths=torch.zeros(batch, beams, dtype=torch.long, device=device),
        done_filled=torch.zeros(batch, beams, dtype=torch.bool, device=device),
        improvable=torch.ones(batch, 1, dtype=torch.bool, device=device),
    )


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, index[b, j], ...]``.  tensor [B, K, ...], index [B, J] -> [B, J, ...]"""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _candidates(
    state: _Beams, *, log_probs: torch.Tensor, keep: int, step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``keep`` continuations over all beams of each row.

    log_probs # [B, K, V] (already penalised)
    returns   # scores [B, keep], tokens [B, keep, N] (step filled), parents [B, keep]
    """
    vocab = log_probs.shape[-1]
    total = (log_probs + state.running_scores[:, :, None]).flatten(1)  # [B, K * V]
    scores, flat_index = torch.topk(total, k=keep, dim=-1)
    parents = flat_index // vocab
    tokens = _gather(state.running_tokens, parents)
    tokens[:, :, step] = flat_index % vocab
    return scores, tokens, parents


def _advance_running(
    state: _Beams, *, scores: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, hits: torch.Tensor
) -> None:
    """Keep the best ``K`` candidates that did not finish as next step's running beams."""
    beams = state.running_scores.shape[1]
    alive_scores = scores + hits.float() * _NEG
    pick = torch.topk(alive_scores, k=beams, dim=-1).indices  # [B, K]
    state.running_tokens = _gather(tokens, pick)
    state.running_scores = _gather(alive_scores, pick)
    state.running_parents = _gather(parents, pick)


def _update_done(
    state: _Beams, *, scores: torch.Tensor, tokens: torch.Tensor, hits: torch.Tensor, step: int
) -> None:
    """Merge candidates that finished this step (only among the top ``K``) into the kept hypotheses."""
    beams = state.done_scores.shape[1]
    top_k_mask = torch.arange(scores.shape[1], device=scores.device) < beams
    just_done = hits & top_k_mask[None, :]  # [B, keep]
    normalised = scores / ((step + 1) ** LENGTH_PENALTY)
    normalised = normalised + (~state.improvable).float() * _NEG + (~just_done).float() * _NEG
    merged_scores = torch.cat((state.done_scores, normalised), dim=1)
    pick = torch.topk(merged_scores, k=beams, dim=-1).indices
    lengths = torch.full_like(scores, step + 1, dtype=torch.long)
    state.done_scores = _gather(merged_scores, pick)
    state.done_tokens = _gather(torch.cat((state.done_tokens, tokens), dim=1), pick)
    state.done_lengths = _gather(torch.cat((state.done_lengths, lengths), dim=1), pick)
    state.done_filled = _gather(torch.cat((state.done_filled, just_done), dim=1), pick)


def _update_improvable(state: _Beams, *, generated: int) -> None:
    """transformers' early_stopping=False heuristic: the best running beam, scored at its current length."""
    best_running = state.running_scores[:, :1] / (generated**LENGTH_PENALTY)  # [B, 1]
    worst_done = torch.where(state.done_filled, state.done_scores.min(dim=1, keepdim=True).values, _NEG)
    state.improvable = state.improvable & (best_running > worst_done).any(dim=-1, keepdim=True)


def _stop_string_hits(tokens: torch.Tensor, *, step: int, stops: StopStrings) -> torch.Tensor:
    """Candidates whose decoded text contains a stop string (host decode; only when stops are set).

    tokens  # [B, keep, N] -> [B, keep] bool
    """
    host = tokens[:, :, : step + 1].tolist()
    hits = [[stops.hit(candidate) for candidate in row] for row in host]
    return torch.tensor(hits, dtype=torch.bool, device=tokens.device)


def _beam_step(
    state: _Beams,
    *,
    logits: torch.Tensor,
    step: int,
    config: GenerationConfig,
    eos: torch.Tensor,
    stops: StopStrings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select, finish and advance beams for one step.

    logits  # [B * K, V]
    returns # cache row order for the next step [B * K] int64, and whether to go on (0-d bool)
    """
    batch, beams = state.running_scores.shape
    keep = max(2, 1 + eos.numel()) * beams
    log_probs = torch.log_softmax(logits, dim=-1)
    if config.repetition_penalty != 1.0:
        # like transformers, the penalty acts on beam log-probs, over the tokens each beam generated so far
        seen = torch.zeros_like(log_probs, dtype=torch.bool)
        seen.scatter_(1, state.running_tokens[:, :, :step].flatten(0, 1), True)
        log_probs = apply_repetition_penalty(log_probs, seen=seen, penalty=config.repetition_penalty)
    scores, tokens, parents = _candidates(
        state, log_probs=log_probs.view(batch, beams, -1), keep=keep, step=step
    )
    hits = torch.isin(tokens[:, :, step], eos) | (step == config.max_new_tokens - 1)
    if stops.stops:
        hits = hits | _stop_string_hits(tokens, step=step, stops=stops)
    _advance_running(state, scores=scores, tokens=tokens, parents=parents, hits=hits)
    _update_done(state, scores=scores, tokens=tokens, hits=hits, step=step)
    _update_improvable(state, generated=step + 1)
    offsets = torch.arange(batch, device=parents.device)[:, None] * beams
    # go on while some row can improve and some candidate in the batch is still open
    return (state.running_parents + offsets).flatten(), state.improvable.any() & ~hits.all()


def _best_rows(state: _Beams, *, eos_token_ids: Sequence[int], stops: StopStrings) -> list[RowState]:
    """The top hypothesis of each row, eos stripped, with its finish reason."""
    tokens = state.done_tokens[:, 0].tolist()
    lengths = state.done_lengths[:, 0].tolist()
    eos = set(eos_token_ids)
    rows = []
    for row_tokens, length in zip(tokens, lengths, strict=True):
        ids = row_tokens[:length]
        if ids and ids[-1] in eos:
            rows.append(RowState(token_ids=ids[:-1], finish_reason="stop"))
        else:
            rows.append(RowState(token_ids=ids, finish_reason="stop" if stops.hit(ids) else "length"))
    return rows


@torch.no_grad()
def beam_search(
    backend: Any,
    *,
    inputs_embeds: torch.Tensor,
    config: GenerationConfig,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    stops: StopStrings,
) -> list[RowState]:
    """Beam search for a left-padded batch; returns the best hypothesis per row.

    backend         # ``runner.BeamRunner`` over the request's attention_mask [B, seq]
    inputs_embeds   # [B, seq, dim]
    """
    batch, beams = inputs_embeds.shape[0], config.num_beams
    logits = backend.prefill(inputs_embeds)
    device = logits.device
    expand = torch.arange(batch, device=device).repeat_interleave(beams)  # [B * K]: row of each beam
    backend.expand(expand)
    logits = logits[expand]
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    state = _init_beams(
        batch=batch, beams=beams, max_new=config.max_new_tokens, pad=pad_token_id, device=device
    )
    for step in range(config.max_new_tokens):
        order, go_on = _beam_step(state, logits=logits, step=step, config=config, eos=eos, stops=stops)
        if step == config.max_new_tokens - 1 or not bool(go_on):  # the one sync per step
            break
        backend.reorder(order)
        logits = backend.step(state.running_tokens[:, :, step].reshape(-1))  # [B * K] tokens
    return _best_rows(state, eos_token_ids=eos_token_ids, stops=stops)
