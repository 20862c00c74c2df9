"""Weights on disk: safetensors only (single file or sharded with an index). Pickles are never loaded."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or in a format vlmkit refuses to read."""


def _shared_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names that share storage (tied embeddings): safetensors stores each tensor once."""
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    return [sorted(names) for names in groups.values() if len(names) > 1]


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied duplicates dropped and every tensor contiguous, ready for safetensors."""
    state = model.state_dict()
    for group in _shared_groups(state):
        for name in group[1:]:
            del state[name]
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def save_file_atomic(
    tensors: dict[str, torch.Tensor], path: Path, *, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file aside, then rename it into place: a reader (another process, a resumed run)
    never sees half a file, and a crash leaves no partial entry."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(model: nn.Module, directory: Path, *, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write ``model.safetensors``, or shards plus ``model.safetensors.index.json`` above ``max_shard_bytes``."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state = unique_state_dict(model)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_bytes
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(directory / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
        index["weight_map"] = split.tensor_to_filename
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))


def check_no_pickle_only(directory: Path) -> None:
    """Refuse a directory whose weights exist only as pickles (loading them could run arbitrary code)."""
    if (directory / WEIGHTS_NAME).exists() or (directory / INDEX_NAME).exists():
        return
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in directory.glob(pattern))
    if pickles:
        raise ModelDirError(
            f"{directory}: weights are only in pickle format ({', '.join(pickles)}); vlmkit loads safetensors only "
            "because unpickling can execute code. Convert them with a trusted tool to model.safetensors first."
        )
    raise ModelDirError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME} found")


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (single or sharded)."""
    check_no_pickle_only(directory)
    if (directory / WEIGHTS_NAME).exists():
        return load_file(str(directory / WEIGHTS_NAME))
    index = json.loads((directory / INDEX_NAME).read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(directory / shard)))
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, source: Path | str) -> None:
    """Load ``state`` strictly, allowing only the tied duplicates that were dropped at save time."""
    expected = model.state_dict()
    # of each tied group one name is stored (the others share its storage); a group with none is missing
    tied = {name for group in _shared_groups(expected) if set(group) & set(state) for name in group}
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors (first: {missing[0]})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} tensors (first: {unexpected[0]})")
        raise ModelDirError(f"{source}: weights do not match the config: {'; '.join(detail)}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModelDirError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, config expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False)


def replace_dir(staging: Path, final: Path) -> None:
    """Rename a finished ``staging`` dir to ``final``; an older ``final`` is removed only once the new one is in."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)
