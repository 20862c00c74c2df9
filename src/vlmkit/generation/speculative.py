"""Speculative greedy decoding for batch-1 requests on CPU: an int8 copy of the LM drafts, the LM verifies.

At batch 1 a float32 decode step streams every weight from memory once, and on CPU that is most of what it does
(docs/inference.md: 8.4 ms per step at 80M parameters, 6.2 ms of it the matrix products). A draft copy of the same
LM with int8 weights (``twins.int8_twin``: a quarter of the bytes, fbgemm/oneDNN kernels) proposes ``k``
tokens one at a time; the float32 LM then scores the last accepted token and all ``k`` proposals in one pass over
its weights. Greedy verification keeps the proposals up to the first one that is not the LM's own argmax and adds
the LM's token at that place, so every token is the float32 LM's greedy choice: the answer is the model's, only
the number of passes over its weights drops. (A one-token pass and a ``k + 1``-token pass may round differently in
the last bits, so a near-tie can break the other way, as with transformers' assisted generation.)

The draft shares the LM's KV cache: its proposals are appended after the verified positions and cut away before
the LM's pass, so the draft never prefills (a reused prompt prefix serves both) and costs no cache memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from vlmkit.generation.lean_step import lean_hidden
from vlmkit.generation.stopping import RowState, StopStrings


def _crop(cache: Any, length: int) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]


def _draft(draft: Any, *, token: int, position: int, count: int, cache: Any) -> list[int]:
    """``count`` greedy proposals after ``token`` (at ``position``); the cache keeps their KV until cropped."""
    proposals: list[int] = []
    ids = torch.tensor([[token]])
    for step in range(count):
        hidden = lean_hidden(
            draft, input_ids=ids, position_ids=torch.tensor([[position + step]]), cache=cache
        )
        ids = draft.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)  # [1, 1]
        proposals.append(int(ids))
    return proposals


def speculative_round(
    model: Any, draft: Any, *, token: int, position: int, cache: Any, count: int
) -> list[int]:
    """Tokens decided after ``token`` (not yet in ``cache``, at ``position``): the accepted proposals, then the
    LM's own next token. On return the cache holds ``token`` and the accepted proposals, nothing more."""
    length = cache.layers[0].keys.shape[-2]
    proposals = _draft(draft, token=token, position=position, count=count, cache=cache)
    _crop(cache, length)
    ids = torch.tensor([[token, *proposals]])  # [1, count + 1]
    positions = torch.arange(position, position + count + 1)[None]
    hidden = lean_hidden(model, input_ids=ids, position_ids=positions, cache=cache)  # [1, count + 1, dim]
    choices = model.lm_head(hidden[0]).argmax(-1).tolist()  # the LM's greedy token after each position
    accepted = 0
    while accepted < count and proposals[accepted] == choices[accepted]:
        accepted += 1
    _crop(cache, length + accepted + 1)
    return choices[: accepted + 1]


def _record(row: RowState, *, tokens: Sequence[int], eos: set[int], stops: StopStrings, limit: int) -> bool:
    """Append decided tokens in order until eos, a stop string or ``limit`` tokens; True once the row is done."""
    for token in tokens:
        if token in eos:
            row.finish_reason = "stop"
        else:
            row.token_ids.append(token)
            if stops.hit(row.token_ids):
                row.finish_reason = "stop"
            elif len(row.token_ids) >= limit:
                row.finish_reason = "length"
        if row.done:
            return True
    return False


def speculative_steps(
    model: Any,
    draft: Any,
    *,
    logits: torch.Tensor,
    position: int,
    cache: Any,
    max_new_tokens: int,
    draft_tokens: int,
    eos_token_ids: Sequence[int],
    stops: StopStrings,
) -> Iterator[list[RowState]]:
    """Greedy batch-1 decode after prefill; yields the row after every round, the last time done.

    logits  # [1, vocab] the prefill's; ``position`` is the first new token's position (= cached length)
    """
    row, eos = RowState(), {int(i) for i in eos_token_ids}
    decided = [int(logits[0].argmax())]
    while not _record(row, tokens=decided, eos=eos, stops=stops, limit=max_new_tokens):
        yield [row]
        count = min(draft_tokens, max_new_tokens - len(row.token_ids) - 1)
        decided = speculative_round(
            model, draft, token=decided[-1], position=position, cache=cache, count=count
        )
        position += len(decided)
    yield [row]
