"""Memory before validation: what a model's weights need, from its config alone, before anything is built.

A ``config.json`` is data from a stranger; building what it describes (a hidden size or layer count of 10**9)
would allocate until the OOM killer ends the process. Loaders call ``check_fits`` first: it estimates the
parameter count in closed form (a few multiplications, bounded time whatever the numbers) and refuses a model
whose weights alone exceed the memory this machine has (available RAM, and free device memory for a GPU).

The estimate is a lower bound of what building needs (tied embeddings, ungated MLPs, no biases or norms), so it
never refuses a model that would fit; ``vlmkit plan`` (training/plan.py) counts exactly on the meta device,
which is not bounded in time for absurd layer counts, and tests hold the two within a few percent on real
architectures. ``VLMKIT_MEMORY_LIMIT`` (bytes, or e.g. ``64GB``) replaces the measured limit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmkit.models.io import ModelDirError

GB = 1e9
MEMORY_LIMIT_ENV = "VLMKIT_MEMORY_LIMIT"
# Python objects of one built layer (modules, parameters, hooks): 10**9 one-unit layers still cost terabytes
LAYER_OVERHEAD_BYTES = 16 * 1024
# architectures whose positions are a learned table of max_positions x hidden (rotary ones have no table)
LEARNED_POSITIONS = ("gpt2", "gpt_bigcode", "opt", "gpt_neo", "biogpt", "xglm")
# architectures whose MLP is gated (gate, up, down: three matrices instead of two)
GATED_MLP = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
             "gemma3_text", "phi3", "olmo", "olmo2", "granite", "cohere", "stablelm", "smollm3")  # fmt: skip
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}  # fmt: skip


@dataclass(frozen=True)
class Estimate:
    """A lower bound of one part's parameters, with the config sizes it came from (for the error message)."""

    parameters: int
    layers: int
    sizes: dict[str, int]


def _int(config: Mapping[str, Any], *names: str) -> int:
    """The first of ``names`` that is a non-negative int (JSON numbers of any size; bools and strings ignored)."""
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, float) and value >= 0 and value == value and value != float("inf"):
            return int(value)
    return 0


def _library_sizes(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """An open_clip (``vision_cfg``) or timm (``model_args``) tower's sizes under transformers' names."""
    cfg = config.get("vision_cfg")
    if isinstance(cfg, Mapping):
        return {"hidden_size": cfg.get("width"), "num_hidden_layers": cfg.get("layers"), "num_channels": 3,
                "mlp_ratio": cfg.get("mlp_ratio", 4), "image_size": cfg.get("image_size"),
                "patch_size": cfg.get("patch_size")}  # fmt: skip
    args = config.get("model_args")
    if isinstance(args, Mapping):
        return {"hidden_size": args.get("embed_dim"), "num_hidden_layers": args.get("depth"),
                "num_channels": args.get("in_chans", 3), "mlp_ratio": args.get("mlp_ratio", 4),
                "image_size": args.get("img_size"), "patch_size": args.get("patch_size")}  # fmt: skip
    return config


def estimate(config: Mapping[str, Any]) -> Estimate:
    """Parameters of one model (causal LM, or a transformers / open_clip / timm vision tower) from its config."""
    config = _library_sizes(config)
    hidden = _int(config, "hidden_size", "n_embd", "d_model", "dim", "embed_dim")
    layers = _int(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = _int(config, "num_attention_heads", "n_head") or 1
    head_dim = _int(config, "head_dim") or hidden // heads
    kv_heads = _int(config, "num_key_value_heads") or heads
    ratio = _int(config, "mlp_ratio")  # DINOv2 gives the MLP width as a ratio
    ffn = _int(config, "intermediate_size", "n_inner", "ffn_dim") or (ratio or 4) * hidden
    experts = max(_int(config, "num_local_experts", "num_experts", "n_routed_experts"), 1)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o + k, v
    mlp = experts * (3 if config.get("model_type") in GATED_MLP else 2) * hidden * ffn
    sizes = {"hidden_size": hidden, "layers": layers, "intermediate_size": ffn}
    patch = _int(config, "patch_size")
    if patch:  # vision towers: the patch embedding and a learned position per patch
        grid = _int(config, "image_size") // patch
        embedding, positions = _int(config, "num_channels") * patch * patch, grid * grid + 1
        sizes |= {"image_size": _int(config, "image_size"), "patch_size": patch}
    else:
        embedding = sizes["vocab_size"] = _int(config, "vocab_size")
        learned = config.get("model_type") in LEARNED_POSITIONS
        positions = _int(config, "n_positions", "max_position_embeddings") if learned else 0
        sizes["positions"] = positions
        if (
            config.get("tie_word_embeddings") is False
        ):  # a separate output matrix (absent = tied: a lower bound)
            embedding *= 2
    total = layers * (attention + mlp) + (embedding + positions) * hidden
    return Estimate(parameters=total, layers=layers, sizes={k: v for k, v in sizes.items() if v})


def projector_estimate(projector: Mapping[str, Any], *, in_dim: int, out_dim: int) -> Estimate:
    """vlmkit's projector section: an MLP of ``depth`` layers, or a resampler's queries and blocks."""
    depth = max(_int(projector, "depth"), 1)
    if projector.get("type") == "resampler":
        queries, blocks = _int(projector, "num_queries"), _int(projector, "num_layers")
        total = in_dim * out_dim + queries * out_dim + blocks * 12 * out_dim * out_dim
        return Estimate(parameters=total, layers=blocks, sizes={"num_queries": queries, "num_layers": blocks})
    total = in_dim * out_dim + (depth - 1) * out_dim * out_dim
    return Estimate(parameters=total, layers=depth, sizes={"depth": depth})


def config_parts(raw: Mapping[str, Any]) -> dict[str, Estimate]:
    """Estimates of every part a model directory's config.json describes: a vlmkit config (vision, projector,
    language sections), a llava-hf config (vision_config, text_config) or a single transformers model."""
    if isinstance(raw.get("language"), Mapping) or isinstance(raw.get("vision"), Mapping):
        vision, language = (_section(raw, name) for name in ("vision", "language"))
        members = raw["vision"].get("towers") if isinstance(raw.get("vision"), Mapping) else None
        fused = [_section({"t": m}, "t") for m in members] if isinstance(members, list) and members else []
        runtime = raw["vision"].get("image_size") if isinstance(raw.get("vision"), Mapping) else None
        # the runtime resolution: position embeddings are interpolated up to it
        if isinstance(runtime, int) and runtime > _int(vision, "image_size"):
            vision = {**vision, "image_size": runtime}
        parts = {"vision": estimate(vision), "language": estimate(language)}
        parts |= {f"vision tower {i + 1}": estimate(member) for i, member in enumerate(fused)}
        dims = (parts["vision"].sizes.get("hidden_size", 0), parts["language"].sizes.get("hidden_size", 0))
        projector = raw.get("projector")
        if isinstance(projector, Mapping):
            parts["projector"] = projector_estimate(projector, in_dim=dims[0], out_dim=dims[1])
        return parts
    if isinstance(raw.get("text_config"), Mapping) or isinstance(raw.get("vision_config"), Mapping):
        return {name: estimate(raw[key]) for name, key in (("vision", "vision_config"), ("language", "text_config"))
                if isinstance(raw.get(key), Mapping)}  # fmt: skip
    return {"model": estimate(raw)}


def _section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    hf_config = raw.get(name, {}).get("hf_config") if isinstance(raw.get(name), Mapping) else None
    return hf_config if isinstance(hf_config, Mapping) else {}


def memory_limits(device: str | None = None) -> list[tuple[int, str]]:
    """(bytes, what) the weights must fit in: available RAM (every loader builds on the CPU first), and the
    free memory of a CUDA device when one is asked for; ``VLMKIT_MEMORY_LIMIT`` replaces both."""
    override = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if override:
        return [(parse_bytes(override), f"allowed by {MEMORY_LIMIT_ENV}={override}")]
    limits = [(available_ram(), "available RAM")]
    if device is not None and str(device).startswith("cuda"):
        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            limits.append((int(free), f"free on {device}"))
    return limits


def available_ram() -> int:
    """MemAvailable on Linux (what can be allocated without swapping out others), else physical memory."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), flags=re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ModelDirError(f"{MEMORY_LIMIT_ENV}={text!r}: expected bytes, e.g. 64GB, 512MiB or 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def element_bytes(dtype: torch.dtype | None) -> int:
    """Bytes per parameter in ``dtype``; None (the stored dtype, unknown before reading) counts 2, a lower bound."""
    return dtype.itemsize if dtype is not None else 2


def check_fits(
    parts: Mapping[str, Estimate],
    *,
    source: str | Path,
    bytes_per_param: int,
    device: str | None = None,
    purpose: str = "for its weights",
) -> int:
    """Refuse (``ModelDirError`` naming the sizes) a model whose weights cannot fit; -> the bytes needed.

    ``bytes_per_param=0`` counts only the layers' Python objects: what even a meta-device build needs."""
    needed = sum(p.parameters * bytes_per_param + p.layers * LAYER_OVERHEAD_BYTES for p in parts.values())
    for limit, what in memory_limits(device):
        if needed > limit:
            detail = "; ".join(
                f"{name}: {', '.join(f'{k}={v:,}' for k, v in part.sizes.items())}"
                for name, part in parts.items()
            )
            params = sum(p.parameters for p in parts.values())
            raise ModelDirError(
                f"{source}: its config describes a model needing at least {needed / GB:,.1f} GB {purpose} "
                f"({params:.3g} parameters at {bytes_per_param} bytes; {detail}), but only {limit / GB:,.1f} GB is "
                f"{what}; refusing to build it"
            )
    return needed
