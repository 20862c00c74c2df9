"""Speculative greedy decoding for batch-1 requests on CPU: a float16 copy of the LM drafts, the LM verifies.

At batch 1 a float32 decode step streams every weight from memory once, and on CPU that is most of what it does.
A draft copy of the same LM with float16 weights (``draft.Float16Draft``: half the bytes, fbgemm's float16 GEMM)
proposes up to ``k`` tokens one at a time; the float32 LM then scores the last decided token and all proposals in
one pass over its weights. Greedy verification keeps the proposals up to the first one that is not the LM's own
argmax and adds the LM's token at that place, so every token is the float32 LM's greedy choice: the answer is the
model's, only the number of passes over its weights drops. (A one-token pass and a ``k + 1``-token pass may round
differently in the last bits, so a near-tie can break the other way, as with transformers' assisted generation.)

The draft shares the LM's KV cache: its proposals are appended after the verified positions and cut away before
the LM's pass, so the draft never prefills (a reused prompt prefix serves both) and costs no cache memory. It stops
proposing after an end-of-sequence token. ``k`` adapts as in transformers' assisted generation: two more after a
round that accepted everything, one fewer otherwise; should fewer than half of the proposals so far be accepted
(a draft that disagrees with its model), the rest of the request decodes one verified token per pass, as plain
decoding does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from vlmkit.generation.cpu_llama.lean_step import lean_hidden
from vlmkit.generation.stopping import RowState, StopStrings


def _crop(cache: Any, length: int) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]


def speculative_round(
    model: Any,
    draft: Any,
    *,
    token: int,
    position: int,
    cache: Any,
    count: int,
    head: Any | None = None,
    stop: frozenset[int] = frozenset(),
) -> list[int]:
    """Tokens decided after ``token`` (not yet in ``cache``, at ``position``): the accepted proposals (at most
    ``count``, ending at one in ``stop``), then the LM's own next token. On return the cache holds ``token`` and
    the accepted proposals, nothing more. ``head`` (``greedy_head.ScreenedHead``) picks the LM's argmax without
    streaming its whole output layer."""
    length = cache.layers[0].keys.shape[-2]
    proposals = (
        draft.propose(token=token, position=position, count=count, cache=cache, stop=stop) if count else []
    )
    _crop(cache, length)
    ids = torch.tensor([[token, *proposals]])  # [1, proposals + 1]
    positions = torch.arange(position, position + len(proposals) + 1)[None]
    hidden = lean_hidden(model, input_ids=ids, position_ids=positions, cache=cache)  # [1, proposals + 1, dim]
    # the LM's greedy token after each position
    choices = (head(hidden[0]) if head is not None else model.lm_head(hidden[0]).argmax(-1)).tolist()
    accepted = 0
    while accepted < len(proposals) and proposals[accepted] == choices[accepted]:
        accepted += 1
    _crop(cache, length + accepted + 1)
    return choices[: accepted + 1]


class DraftLength:
    """How many tokens the next round drafts (see the module docstring)."""

    def __init__(self, most: int) -> None:
        self.most, self.next = most, most
        self.proposed = self.accepted = 0

    def update(self, *, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        if self.proposed >= 8 and 2 * self.accepted < self.proposed:
            self.next = 0  # a poor draft: plain one-token passes for the rest of the request
        elif self.next:
            self.next = min(self.most, self.next + 2) if accepted == proposed else max(1, self.next - 1)


def _record(
    row: RowState, *, tokens: Sequence[int], eos: frozenset[int], stops: StopStrings, limit: int
) -> bool:
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
    head: Any | None = None,
) -> Iterator[list[RowState]]:
    """Greedy batch-1 decode after prefill; yields the row after every round, the last time done.

    logits  # [1, vocab] the prefill's; ``position`` is the first new token's position (= cached length)
    """
    row, eos = RowState(), frozenset(int(i) for i in eos_token_ids)
    length = DraftLength(draft_tokens)
    decided = [int(logits[0].argmax())]
    while not _record(row, tokens=decided, eos=eos, stops=stops, limit=max_new_tokens):
        yield [row]
        count = min(length.next, max_new_tokens - len(row.token_ids) - 1)
        decided = speculative_round(model, draft, token=decided[-1], position=position, cache=cache, count=count,
                                    head=head, stop=eos)  # fmt: skip
        # a draft that stopped early at eos and was accepted ends the request: ``count`` is what it was asked for
        length.update(proposed=count, accepted=len(decided) - 1)
        position += len(decided)
    yield [row]
