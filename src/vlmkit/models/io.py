"""Weights on disk: safetensors only (single file or sharded with an index). Pickles are never loaded."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vlmkit.config import read_json as read_json_file

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or in a format vlmkit refuses to read."""


# what transformers raises on a config whose values make no sense (a string size, zero heads, ...), besides
# ValueError: building from an untrusted config turns these into a ModelDirError naming the file
CONFIG_FAILURES = (TypeError, ZeroDivisionError, AttributeError, KeyError, IndexError, OverflowError)


@contextmanager
def config_errors(source: Path | str) -> Iterator[None]:
    """Around building a model from a config file: its nonsense values become one ``ModelDirError``."""
    try:
        yield
    except ModelDirError:
        raise
    except Exception as exc:
        strict = any(c.__name__ == "StrictDataclassError" for c in type(exc).__mro__)  # huggingface_hub's
        if not (isinstance(exc, CONFIG_FAILURES) or strict):
            raise
        raise ModelDirError(
            f"{source}: transformers cannot build the model it describes ({type(exc).__name__}: {exc})"
        ) from exc


# keys by which a transformers config asks to import Python shipped with the model
CODE_KEYS = ("auto_map", "custom_pipelines")


def read_json(path: Path) -> dict[str, Any]:
    """A model directory's JSON object (config, tokenizer or processor settings), read with the package's bounds:
    a regular file, at most 64 MB, nested at most 64 levels; anything else is a ``ModelDirError``."""
    data = read_json_file(path, error=ModelDirError)
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return data


def check_no_remote_code(directory: Path) -> None:
    """Refuse a directory whose ``*config.json`` files ask transformers to run code shipped with the model.

    transformers would import the ``.py`` files an ``auto_map`` names (after asking on stdin, which piped input
    can answer); vlmkit never runs code from a model directory, so such a directory is refused before any loader
    sees it (every loader also passes ``trust_remote_code=False``).
    """
    for path in sorted(directory.glob("*config.json")):
        found = _code_references(read_json(path))
        if found:
            key, modules = found
            files = ", ".join(sorted({f"{m}.py" for m in modules})) or "custom code"
            raise ModelDirError(
                f"{path}: its '{key}' entry asks to run Python code shipped with the model ({files}); vlmkit "
                "never runs code from a model directory (if transformers supports the model natively, delete the "
                f"'{key}' entry)."
            )


def _code_references(data: Any) -> tuple[str, list[str]] | None:
    """(key, module names) of the first ``auto_map`` / ``custom_pipelines`` anywhere in ``data``, else None."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key in CODE_KEYS:
                if item.get(key):
                    return key, _modules(item[key])
            stack.extend(item.values())
    return None


def _modules(entry: Any) -> list[str]:
    """``"repo--module.Class"`` strings anywhere in an auto_map -> the module names (``module``)."""
    values = entry.values() if isinstance(entry, dict) else entry if isinstance(entry, list) else [entry]
    found = []
    for value in values:
        if isinstance(value, dict | list):
            found += _modules(value)
        elif isinstance(value, str) and "." in value:
            found.append(value.split("--")[-1].rsplit(".", 1)[0])
    return found


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
        index: dict[str, object] = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}
        }
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
    files = weight_files(directory)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_safetensors(path))
    return state


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: ``model.safetensors``, or the shards its index names, each checked
    to be a plain file name inside ``directory`` (an index cannot point at ``../`` or absolute paths)."""
    check_no_pickle_only(directory)
    if (directory / WEIGHTS_NAME).exists():
        if not (directory / WEIGHTS_NAME).is_file():  # a FIFO would block the reader forever
            raise ModelDirError(f"{directory / WEIGHTS_NAME}: not a regular file")
        return [directory / WEIGHTS_NAME]
    index_path = directory / INDEX_NAME
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelDirError(
            f"{index_path}: 'weight_map' must be a non-empty object of tensor name -> shard file"
        )
    shards = sorted(set(weight_map.values()), key=str)
    for shard in shards:
        if not isinstance(shard, str) or PurePosixPath(shard).name != shard or shard in ("", ".", ".."):
            raise ModelDirError(
                f"{index_path}: shard {shard!r} is not a file name inside the model directory"
            )
        if not (directory / shard).is_file():
            raise ModelDirError(f"{index_path}: shard {shard} is missing")
    return [directory / shard for shard in shards]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a corrupt or truncated one is a ``ModelDirError`` naming it."""
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ModelDirError(f"{path}: not a valid safetensors file ({exc})") from None


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
