"""FSDP for ``vlmkit train``: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) around the training model.

Why FSDP2 called directly rather than through ``accelerator.prepare``: accelerate (1.15) turns FSDP on only for
GPU-like process groups and silently falls back to DDP for multi-process CPU (gloo), so the CPU tests could never
exercise it. ``fully_shard`` itself runs on gloo and NCCL alike; accelerate still launches the processes, sets up
the process group and supplies autocast, so the same code path runs everywhere.

What is sharded (each unit gathers its weights for its forward/backward and frees them afterwards):

* every transformer layer (the ``_no_split_modules`` classes of the LM and the vision tower), and
* the rest (embeddings, final norm, LM head, projector, tower stem) as the root unit, ``TokenLoss``, so the
  projector and the zero-weight links of ``TokenLoss`` always see gathered weights.

A frozen vision tower is left out (``ignored_params``): every process holds it whole, as under DDP. It needs no
gradient reduction, and the feature cache runs it outside the root's forward a different number of times on each
process, which a sharded module (one collective per forward) could not allow.

Checkpoints and the final model hold full tensors gathered on the main process (``get_model_state_dict`` /
``get_optimizer_state_dict`` with ``full_state_dict``), in the same files as a DDP run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

ROOT_PREFIX = "model."  # the root unit is TokenLoss; the VLM's parameters are under its ``model`` attribute


def fsdp_requested(*, flag: bool) -> bool:
    """``--fsdp``, or an accelerate FSDP config (``accelerate launch --use_fsdp`` / ``distributed_type: FSDP``)."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def accelerate_note() -> str | None:
    """Which settings of an accelerate FSDP config apply (printed at the start of a run)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    return (
        "FSDP from the accelerate config: vlmkit shards with FSDP2, one unit per transformer layer; the "
        "config's other FSDP settings (version, wrap policy, offload, state-dict type) are not used"
    )


def layer_classes(model: nn.Module) -> set[str]:
    """Class names of the transformer layers: the ``_no_split_modules`` of every HF model inside ``model``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard(
    root: nn.Module, *, vision: nn.Module, vision_frozen: bool, reshard_after_forward: bool = True
) -> None:
    """Apply ``fully_shard`` in place: each transformer layer, then ``root`` (which must hold the whole model)."""
    from torch.distributed.fsdp import fully_shard

    ignored = set(vision.parameters()) if vision_frozen else set()
    frozen_tower = set(vision.modules()) if vision_frozen else set()
    classes = layer_classes(root)
    # reversed pre-order: a layer's descendants are sharded before the layer, as fully_shard requires
    for module in reversed(list(root.modules())):
        if type(module).__name__ in classes and module is not root and module not in frozen_tower:
            fully_shard(module, reshard_after_forward=reshard_after_forward)
    fully_shard(root, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None)


@contextmanager
def no_sync(root: Any) -> Iterator[None]:
    """Accumulate unsharded gradients locally; the next synchronised backward reduce-scatters the sum."""
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(root: nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The VLM's full (unsharded) state dict on the main process, ``{}`` elsewhere. Collective: call on every process."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    # torch types the values as a union of state kinds; a full model state dict holds plain tensors
    state: dict[str, Any] = get_model_state_dict(
        root, options=_options(cpu_offload=True, ignore_frozen_params=trainable_only)
    )
    return {name.removeprefix(ROOT_PREFIX): tensor for name, tensor in state.items()}


def load_trainable(root: nn.Module, *, weights: dict[str, torch.Tensor]) -> None:
    """Shard full trainable weights (read by every process) into the model. Collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    prefixed: dict[str, Any] = {ROOT_PREFIX + name: tensor for name, tensor in weights.items()}
    set_model_state_dict(root, prefixed, options=_options(strict=False))


def _optimizer_names(root: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The fully qualified name of each optimizer parameter, in ``optimizer.state_dict()`` index order."""
    names = {id(p): name for name, p in root.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(root: nn.Module, *, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state with full tensors, keyed by parameter index like ``optimizer.state_dict()`` (main
    process; ``{}`` elsewhere), so FSDP and DDP checkpoints are the same files. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state: dict[str, Any] = get_optimizer_state_dict(root, optimizer, options=_options(cpu_offload=True))
    if not state:
        return {}
    index = {name: i for i, name in enumerate(_optimizer_names(root, optimizer))}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def load_optimizer_state(root: nn.Module, *, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an index-keyed full optimizer state (read by every process) into the sharded optimizer. Collective."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _optimizer_names(root, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    keyed: dict[str, Any] = {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": groups,
    }
    set_optimizer_state_dict(root, optimizer, keyed, options=_options())


def as_float(value: Any) -> float:
    """A grad norm from ``clip_grad_norm_``: a replicated DTensor under FSDP, a tensor otherwise."""
    from torch.distributed.tensor import DTensor

    return float(value.full_tensor() if isinstance(value, DTensor) else value)
