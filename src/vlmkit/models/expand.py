"""Grow a trained language model deeper without changing what it computes (block expansion, LLaMA Pro).

Each chosen decoder layer is followed by a copy of itself whose two output projections (attention ``o_proj``
and MLP ``down_proj``) are zero. A pre-norm residual block with zero output projections adds nothing to the
residual stream, so the grown model gives the same logits as the original, bit for bit; training then has
extra layers to put new computation in (multi-step lookups: find an object, then read where it is) while
everything learned so far keeps working from the first step.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from vlmkit.models.vlm import VisionLanguageModel

LAYERS = "language_model.model.layers."
ZEROED = ("self_attn.o_proj.", "mlp.down_proj.")  # a layer's only writes to the residual stream


def expand_language_layers(
    model: VisionLanguageModel, *, after: Sequence[int] | None = None
) -> VisionLanguageModel:
    """A new model whose LM has a zero-output copy after each layer in ``after`` (default: every layer).

    Vision tower, projector, embeddings and head are copied unchanged; the config's ``num_hidden_layers``
    (and ``layer_types`` where the LM has them) follow. Supports Llama-style decoders (Llama, Qwen2,
    Mistral: ``model.layers[i].self_attn.o_proj`` and ``.mlp.down_proj``).
    """
    hf = model.config.language.hf_config
    state = model.state_dict()
    count = _layer_count(state)
    chosen = sorted(set(range(count) if after is None else after))
    if not chosen or chosen[0] < 0 or chosen[-1] >= count:
        raise ValueError(f"after must name layers in 0..{count - 1}, got {list(after or [])}")
    config = copy.deepcopy(model.config)
    config.language.hf_config = _grown_hf_config(hf, count=count, chosen=chosen)
    grown = VisionLanguageModel(config=config)
    grown.load_state_dict(_grown_state(state, count=count, chosen=set(chosen)), strict=True)
    return grown.to(model.dtype)


def _layer_count(state: dict[str, torch.Tensor]) -> int:
    """The LM's decoder layers, each checked to have both output projections."""
    indices = {int(key[len(LAYERS) :].split(".", 1)[0]) for key in state if key.startswith(LAYERS)}
    for i in range(max(indices) + 1) if indices else [0]:  # no layers at all: name layer 0 as missing
        for name in ZEROED:
            if not any(key.startswith(f"{LAYERS}{i}.{name}") for key in state):
                raise ValueError(
                    f"expand_language_layers needs Llama-style decoder layers ({LAYERS}N.{name}weight); "
                    f"layer {i} of this language model has none"
                )
    return len(indices)


def _grown_hf_config(hf: dict, *, count: int, chosen: list[int]) -> dict:
    grown = copy.deepcopy(hf)
    grown["num_hidden_layers"] = count + len(chosen)
    if hf.get("layer_types"):  # per-layer attention kinds (sliding / full): the copy keeps its original's
        grown["layer_types"] = [
            t for i, t in enumerate(hf["layer_types"]) for _ in range(2 if i in chosen else 1)
        ]
    return grown


def _grown_state(state: dict[str, torch.Tensor], *, count: int, chosen: set[int]) -> dict[str, torch.Tensor]:
    """Old layer i moves to its new index; a chosen layer's copy follows it with zero output projections."""
    new_index, position = {}, 0
    for i in range(count):
        new_index[i] = position
        position += 2 if i in chosen else 1
    grown = {}
    for key, value in state.items():
        if not key.startswith(LAYERS):
            grown[key] = value
            continue
        index, rest = key[len(LAYERS) :].split(".", 1)
        target = new_index[int(index)]
        grown[f"{LAYERS}{target}.{rest}"] = value
        if int(index) in chosen:
            zero = rest.startswith(ZEROED)
            grown[f"{LAYERS}{target + 1}.{rest}"] = torch.zeros_like(value) if zero else value.clone()
    return grown
