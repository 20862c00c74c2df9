"""The CPU-Llama decode backends: the lean step (``F.linear`` or oneDNN), the float16-screened greedy head, and
speculation with a float16 draft. ``backend.select_backend`` builds them where ``plan_lean`` allows.

Each is a ``DynamicRunner`` (same cache, prefill and prompt KV) whose decode step is ``lean_step.py``'s op-for-op
copy of the model's forward (bitwise equal logits with ``F.linear``), run over the oneDNN twin of the model when
its matrices outgrow the CPU caches (``twins.py``: the same float32 maths, streamed faster).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from vlmkit.generation.cpu_llama.draft import Float16Draft
from vlmkit.generation.cpu_llama.greedy_head import ScreenedHead
from vlmkit.generation.cpu_llama.lean_step import lean_decode_step, lean_hidden
from vlmkit.generation.cpu_llama.speculative import speculative_steps
from vlmkit.generation.cpu_llama.twins import TwinCache
from vlmkit.generation.kv_cache import PromptKV
from vlmkit.generation.runner import DynamicRunner
from vlmkit.generation.stopping import RowState, StopStrings
from vlmkit.models.language.protocols import LanguageModel


class LeanRunner(DynamicRunner):
    """The lean decode step over ``step_model`` (the model, or its oneDNN twin); with ``head``, plain greedy steps
    take the argmax of the float16-screened output layer (``greedy_head.py``) instead of the whole layer.

    ``model`` is the plain model (``lean_step.lean_step_model``); a batch without padding (no mask is ever
    needed again after prefill).
    """

    def __init__(
        self,
        lm: LanguageModel,
        *,
        attention_mask: torch.Tensor,
        past: PromptKV | None,
        twins: TwinCache,
        model: Any,
        step_model: Any,
        head: ScreenedHead | None = None,
        cache: Any = None,
    ) -> None:
        super().__init__(lm, attention_mask=attention_mask, past=past, twins=twins, cache=cache)
        self.model, self.step_model, self.head = model, step_model, head
        kernel = "lean-linear" if step_model is model else "lean-onednn"
        self.name = "screened-head" if head is not None else kernel

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch] -> next logits [batch, vocab] float32."""
        logits = lean_decode_step(self.step_model, input_ids=tokens[:, None], position_ids=self.positions,
                                  cache=self.cache)  # fmt: skip
        self.positions = self.positions + 1
        return logits

    def greedy_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch] -> the next greedy tokens [batch], through the screened head where there is one."""
        if self.head is None:
            return self.step(tokens).argmax(dim=-1)
        hidden = lean_hidden(self.step_model, input_ids=tokens[:, None], position_ids=self.positions,
                             cache=self.cache)  # fmt: skip
        self.positions = self.positions + 1
        return self.head(hidden[:, -1])


class SpeculativeRunner(LeanRunner):
    """Greedy batch-1 decoding in rounds: ``draft`` proposes up to ``draft_tokens`` tokens, the lean step verifies
    them in one pass (``speculative.py``; through the screened head where there is one)."""

    name = "speculative"

    def __init__(self, lm: LanguageModel, *, draft: Float16Draft, draft_tokens: int, **lean: Any) -> None:
        super().__init__(lm, **lean)
        self.draft, self.draft_tokens = draft, draft_tokens
        self.name = "speculative"

    def rounds(
        self,
        logits: torch.Tensor,
        *,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        stops: StopStrings,
    ) -> Iterator[list[RowState]]:
        """The request's row after every round, the last time done.  logits [1, vocab]: the prefill's."""
        return speculative_steps(self.step_model, self.draft, logits=logits, position=self.prompt_length,
                                 cache=self.cache, max_new_tokens=max_new_tokens, draft_tokens=self.draft_tokens,
                                 eos_token_ids=eos_token_ids, stops=stops, head=self.head)  # fmt: skip
