"""Stage 1 of a from-scratch recipe: teach a new vision tower to see, with a short, direct loss.

A tower learns almost nothing when its only signal comes back through a randomly initialised LM, but it
learns shapes in about a minute from a direct loss (shared/notes/from-scratch-findings.md). Users' data has
only image-question-answer triples, so the direct loss here is generic: a small probe reads the tower's
tokens with the question as the query and predicts which tokens the answer contains (a softmax bag of tokens over
the tokenizer's vocabulary). Captions, short answers and rendered text all give dense targets this way.
Optionally (``segments``) every patch token also regresses pixel-derived region statistics (``segment_targets``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlmkit.data.dataset import Record, image_in_folder
from vlmkit.models.vision.towers import VisionTower
from vlmkit.processing.image import ImageLoadError, ImageProcessor, load_image
from vlmkit.processing.tokenizer_protocol import Tokenizer
from vlmkit.training.recipes import segment_targets


@dataclass
class Triples:
    """Pre-tokenised (image, question, answer) triples. images are uint8 to keep memory small."""

    images: torch.Tensor  # [images, 3, S, S] uint8 (resized, not yet normalised)
    image_index: torch.Tensor  # [triples] which image each triple is about
    questions: torch.Tensor  # [triples, Lq] token ids, 0-padded
    question_mask: torch.Tensor  # [triples, Lq] bool
    answers: torch.Tensor  # [triples, vocab] multi-hot bool
    skipped: int


class AnswerProbe(nn.Module):
    """Question-conditioned attention over visual tokens -> logits over answer tokens."""

    def __init__(
        self, *, vision_dim: int, vocab: int, dim: int = 128, heads: int = 4, max_len: int = 64
    ) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(max_len, dim))
        self.question = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True)
        self.visual = nn.Linear(vision_dim, dim)
        self.attend = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, vocab))

    def forward(self, features: torch.Tensor, questions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features [n, tokens, vision_dim], questions/mask [n, Lq] -> answer-token logits [n, vocab]."""
        q = self.token(questions) + self.position[: questions.shape[1]]
        q = self.question(q, src_key_padding_mask=~mask)
        query = (q * mask[..., None]).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(
            min=1
        )  # [n, 1, dim]
        visual = self.visual(features)
        for attention in self.attend:
            query = query + attention(query, visual, visual, need_weights=False)[0]
        return self.head(self.norm(query[:, 0]))


def build_triples(
    records: Sequence[Record],
    *,
    image_folder: Path,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    vocab: int,
) -> Triples:
    """Single-image records -> triples; multi-image and text-only records do not teach one image."""
    images: list[torch.Tensor] = []
    rows: list[tuple[int, list[int], list[int]]] = []
    seen: dict[str, int] = {}
    skipped = 0
    for record in records:
        if len(record.images) != 1:
            continue
        name = record.images[0]
        if name not in seen:
            try:
                picture = load_image(image_in_folder(image_folder, name))  # never outside the folder
            except ImageLoadError:
                skipped += 1
                continue
            seen[name] = len(images)
            images.append(uint8_pixels(picture, processor=processor))
        for question, answer in _turn_pairs(record.messages):
            rows.append((seen[name], _ids(tokenizer, question), _ids(tokenizer, answer)))
    return _pack(images=images, rows=rows, vocab=vocab, size=processor.image_size, skipped=skipped)


def _turn_pairs(messages: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    pairs = []
    for user, reply in zip(messages, messages[1:], strict=False):
        if user["role"] == "user" and reply["role"] == "assistant":
            pairs.append((user["content"].replace("<image>", " ").strip(), reply["content"]))
    return pairs


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"][:64]


def normalise(images: torch.Tensor, *, processor: ImageProcessor) -> torch.Tensor:
    """uint8 [n, 3, S, S] (as ``uint8_pixels`` stores them) -> the tower's float input, normalised."""
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def uint8_pixels(picture: Image.Image, *, processor: ImageProcessor) -> torch.Tensor:
    """The processor's geometry (resize/pad/crop) without normalisation, as uint8 [3, S, S]."""
    normalised = processor.preprocess_one(picture)  # [3, S, S]
    mean = torch.tensor(processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_std)[:, None, None]
    return (normalised * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


def _pack(
    *,
    images: list[torch.Tensor],
    rows: list[tuple[int, list[int], list[int]]],
    vocab: int,
    size: int,
    skipped: int,
) -> Triples:
    width = max((len(q) for _, q, _ in rows), default=1) or 1
    questions = torch.zeros(len(rows), width, dtype=torch.long)
    answers = torch.zeros(len(rows), vocab, dtype=torch.bool)
    for i, (_, q, a) in enumerate(rows):
        questions[i, : len(q)] = torch.tensor(q, dtype=torch.long)
        answers[i, a] = True
    return Triples(
        images=torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8),
        image_index=torch.tensor([r[0] for r in rows], dtype=torch.long),
        questions=questions,
        question_mask=questions != 0,
        answers=answers,
        skipped=skipped,
    )


def answer_token_loss(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Softmax bag-of-tokens loss: mean -log p(token) over each answer's tokens.  logits/answers [n, vocab].

    A softmax (not per-token sigmoids) makes the tokens compete, so predicting the answer prior scores badly
    and the tower must tell images apart; per-sigmoid BCE over a 1k vocabulary is near zero from the start.
    """
    targets = answers.float()
    per_sample = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1) / targets.sum(-1).clamp(min=1)
    return per_sample.mean()


def pretrain_vision(
    *,
    vision: VisionTower,
    triples: Triples,
    processor: ImageProcessor,
    minutes: float,
    max_steps: int | None = None,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    segments: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, float]:
    """Train ``vision`` (a VisionEncoder) with the answer-token probe for ``minutes`` (or exactly ``max_steps``).

    With ``segments`` a linear head on every patch token also predicts the statistics and class of the flat-colour
    region under it (``segment_targets``): a dense signal computed from the pixels alone. The cosine schedule
    runs over the step count when it is given, else over the wall-clock budget.
    """
    if len(triples.image_index) == 0:
        raise ValueError("stage 1 needs single-image question/answer records; the data has none")
    torch.manual_seed(seed)
    probe = AnswerProbe(vision_dim=vision.hidden_size, vocab=triples.answers.shape[1])
    heads, targets = nn.ModuleList([probe]), None
    if segments:
        start = time.perf_counter()
        targets = segment_targets.segment_targets(triples.images, patch_size=vision.patch_size)
        heads.append(nn.Linear(vision.hidden_size, segment_targets.OUTPUTS))
        log(f"stage 1: segment targets for {len(targets)} images in {time.perf_counter() - start:.1f}s")
    generator = torch.Generator().manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(len(triples.image_index), (batch_size,), generator=generator)
        image = triples.image_index[idx]
        features = vision(normalise(triples.images[image], processor=processor))  # [batch, patches, dim]
        logits = probe(features, triples.questions[idx], triples.question_mask[idx])
        loss = answer_token_loss(logits, triples.answers[idx])
        if targets is not None:
            loss = loss + segment_targets.segment_loss(heads[1](features), targets, image)
        return loss

    return train_tower(vision=vision, heads=heads, batch_loss=batch_loss, minutes=minutes,
                       max_steps=max_steps, lr=lr, weight_decay=weight_decay, log=log, label="stage 1")  # fmt: skip


def train_tower(
    *, vision: nn.Module, heads: nn.Module, batch_loss: Callable[[], torch.Tensor], minutes: float,
    max_steps: int | None, lr: float, weight_decay: float, log: Callable[[str], None], label: str,
    warmup_steps: int = 0,
) -> dict[str, float]:  # fmt: skip
    """AdamW on tower + heads, clipped, cosine over ``max_steps`` when given, else over the wall-clock budget."""
    params = list(vision.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    vision.train()
    start, step, first, budget = time.perf_counter(), 0, math.nan, minutes * 60
    while True:
        elapsed = time.perf_counter() - start  # timed in both modes: the log line reports it
        progress = elapsed / budget if max_steps is None else step / max_steps
        if progress >= 1.0:
            break
        loss = batch_loss()
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        first = loss.item() if step == 0 else first
        step += 1
        if step % 100 == 0:
            log(f"{label}: step {step}, loss {loss.item():.4f}, {elapsed:.0f}s")
    vision.eval()
    return {
        "steps": step,
        "first_loss": first,
        "last_loss": loss.item(),
        "seconds": time.perf_counter() - start,
    }
