"""Next-token selection from logits: repetition penalty, temperature, top-k, top-p, greedy or sampled.

Everything here is batched tensor work on the logits' device (no host sync), so it can later be fused into a
compiled decode step. The processing order and the semantics follow transformers' logits processors.
"""

from __future__ import annotations

import torch

from vlmkit.generation.config import GenerationConfig


def make_generator(*, seed: int | None, device: torch.device) -> torch.Generator | None:
    """A private generator on ``device`` for seeded sampling; ``None`` (global RNG) when unseeded."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def new_seen_mask(*, batch: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Which tokens each row has generated so far, for the repetition penalty.  # [batch, vocab] bool"""
    return torch.zeros(batch, vocab, dtype=torch.bool, device=device)


def mark_seen(seen: torch.Tensor, *, tokens: torch.Tensor) -> torch.Tensor:
    """``seen`` [batch, vocab] with ``tokens`` [batch] set; returns a new tensor."""
    return seen.scatter(1, tokens[:, None], True)


def apply_repetition_penalty(logits: torch.Tensor, *, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: divide positive / multiply negative scores of already generated tokens.

    logits  # [batch, vocab]
    seen    # [batch, vocab] bool
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, *, top_k: int) -> torch.Tensor:
    """Mask all but the ``top_k`` highest scores per row with -inf (ties at the k-th score are kept)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_best = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [batch, 1]
    return logits.masked_fill(logits < kth_best, float("-inf"))


def top_p_filter(logits: torch.Tensor, *, top_p: float) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose total mass is <= 1 - top_p; keeps at least one."""
    if top_p >= 1.0:
        return logits
    # ascending sort as transformers does, so ties fall the same way
    sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [batch, vocab]
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False  # the most likely token always survives
    drop = drop_sorted.scatter(-1, sorted_index, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor, *, config: GenerationConfig, seen: torch.Tensor | None
) -> torch.Tensor:
    """Penalty, then (when sampling) temperature, top-k and top-p.  # [batch, vocab] -> [batch, vocab]"""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen=seen, penalty=config.repetition_penalty)
    if not config.do_sample:
        return logits
    logits = logits / config.temperature
    logits = top_k_filter(logits, top_k=config.top_k)
    return top_p_filter(logits, top_p=config.top_p)


def select_next_tokens(
    logits: torch.Tensor,
    *,
    config: GenerationConfig,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row: argmax when greedy, else a multinomial draw.

    logits  # [batch, vocab] (float32)
    returns # [batch] int64
    """
    scores = process_logits(logits, config=config, seen=seen)
    if not config.do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
