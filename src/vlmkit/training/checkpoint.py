"""Training checkpoints: atomic, keep-last-K, exact resume. Safetensors + JSON only, never pickle.

A checkpoint directory ``OUT/checkpoints/step-00000120/`` (and, at the end of a run, ``OUT/training_state/``)::

    trainable.safetensors           trainable parameters by name (frozen ones come from --model)
    optimizer.safetensors           optimizer state tensors, flattened as "state.<param index>.<key>"
    optimizer.json                  param_groups and non-tensor state
    scheduler.json                  the LR schedule and its step
    rng-rank<r>.safetensors / .json torch (CPU + CUDA) / Python / NumPy RNG state of every process
    trainer.json                    step, data position, counters, the run's fingerprint (written last)

Checkpoints are written into ``.step-N.tmp`` next to their final name and renamed into place only
when complete, so a crash mid-save never leaves a checkpoint that looks valid.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlmkit.config import read_json as read_json_file
from vlmkit.models.io import replace_dir
from vlmkit.training.stages import iter_trainable

CHECKPOINTS = "checkpoints"
FINAL_STATE = "training_state"
TRAINER_FILE = "trainer.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match the current run."""


def checkpoint_dir(out: Path, *, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:08d}"


def staging_dir(final: Path) -> Path:
    """Deterministic, so every process of a distributed run writes into the same place."""
    return final.with_name(f".{final.name}.tmp")


def write_json(path: Path, *, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file, with the package's bounds (regular file, size, nesting) as ``CheckpointError``."""
    return read_json_file(path, error=CheckpointError)


# -------------------------------------------------------------------------------------------------- write


def write_main_state(
    directory: Path,
    *,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
) -> None:
    """Trainable weights (full tensors by name), optimizer state (``optimizer.state_dict()`` form) and the
    scheduler: written by the main process only (DDP replicas are identical; FSDP gathers them first)."""
    save_file(
        {name: t.detach().contiguous() for name, t in weights.items()},
        str(directory / "trainable.safetensors"),
    )
    tensors, meta = flatten_optimizer(optimizer)
    save_file(tensors, str(directory / "optimizer.safetensors"))
    write_json(directory / "optimizer.json", data=meta)
    write_json(directory / "scheduler.json", data=scheduler)


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """optimizer.state_dict() -> (tensors for safetensors, everything else for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], *, meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def write_rng(directory: Path, *, rank: int) -> None:
    """This process's RNG streams: dropout masks after resume are those of an uninterrupted run."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{device}"] = state
    save_file(tensors, str(directory / f"rng-rank{rank}.safetensors"))
    version, mt, gauss = random.getstate()
    numpy_state = np.random.get_state()
    assert isinstance(numpy_state, tuple)  # legacy=True, the default: (kind, keys, pos, has_gauss, cached)
    kind, keys, pos, has_gauss, cached = numpy_state
    write_json(directory / f"rng-rank{rank}.json", data={
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    })  # fmt: skip


def commit(staging: Path, *, final: Path) -> None:
    """Rename the finished staging directory into place (replacing an older one of the same name)."""
    replace_dir(staging, final)


def prune(out: Path, *, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints, and any half-written leftovers."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return
    steps = sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / TRAINER_FILE).exists())
    for path in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- read


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step among ``checkpoints/step-*`` and ``training_state``."""
    candidates = [out / FINAL_STATE]
    if (out / CHECKPOINTS).is_dir():
        candidates += [p for p in (out / CHECKPOINTS).iterdir() if p.name.startswith("step-")]
    complete = [p for p in candidates if (p / TRAINER_FILE).is_file()]
    if not complete:
        return None
    return max(complete, key=lambda p: read_json(p / TRAINER_FILE)["step"])


def read_trainable(directory: Path, *, names: set[str]) -> dict[str, torch.Tensor]:
    """The saved trainable weights; their names must be exactly this run's trainable ``names``."""
    saved = load_file(str(directory / "trainable.safetensors"))
    if set(saved) != names:
        missing, extra = sorted(names - set(saved)), sorted(set(saved) - names)
        raise CheckpointError(
            f"{directory}: trainable parameters differ from this run's stage (missing {missing[:2]}, "
            f"unexpected {extra[:2]}); resume with the same --stage and LoRA options"
        )
    return saved


def load_model_state(directory: Path, *, model: nn.Module) -> None:
    """Copy the saved trainable weights into the (already stage-prepared, unsharded) model."""
    params = dict(iter_trainable(model))
    saved = read_trainable(directory, names=set(params))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


def read_optimizer_state(directory: Path) -> dict[str, Any]:
    """The saved optimizer state in ``optimizer.state_dict()`` form (parameters by index)."""
    tensors = load_file(str(directory / "optimizer.safetensors"))
    return unflatten_optimizer(tensors, meta=read_json(directory / "optimizer.json"))


def load_rng(directory: Path, *, rank: int) -> None:
    path = directory / f"rng-rank{rank}.safetensors"
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: no RNG state for process {rank}; resume with the same number of processes"
        )
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    data = read_json(directory / f"rng-rank{rank}.json")
    version, mt, gauss = data["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else os.remove(path)
