"""Memory planner: parameters, gradients, optimizer state and activations per training stage, from configs only.

Parameters are counted exactly by instantiating the parts on ``torch.device("meta")`` (no weights, no
memory). Activations are counted per token and layer from what autograd keeps for backward in a
transformers decoder layer, which depends on what is trainable (PyTorch saves a matmul's input only
when the weight needs a gradient). Bytes per token and layer, with ``a`` the activation element size,
``h`` hidden, ``kv`` key/value width, ``f`` MLP width, for a Llama-style (RMSNorm, gated MLP) layer:

* trainable LM:  norms 2 x (4h fp32 input + a*h output) + o_proj input a*h + SDPA q,k,v,out a*(2h + 2kv)
  + MLP gate, act, up, down-input 4*a*f
* frozen LM (gradients still flow to the image tokens): norms 2 x 4h + SDPA a*(2h + 2kv) + MLP 3*a*f
* LoRA adds per adapted linear with input width i: the dropout output and mask (p+1)*i and the rank-r
  activation p*r, where p = 4 because peft keeps adapters in fp32 under a bf16 base
* the loss peaks at ~12 * vocab bytes per token in any dtype (bf16: logits, their flattened copy, the
  fp32 copy, the log-softmax output; fp32: log-softmax output, its gradient and the input gradient)
* gradient checkpointing keeps each layer's input (a*h); one layer at a time is recomputed in backward,
  after the loss's buffers are freed

Peak = weights + optimizer state + max(activations + loss, gradients): activations are highest when
backward starts; all gradients coexist with the optimizer state at the step. Units: GB = 1e9 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmkit.config import ProjectorConfig, TilingConfig, VisionConfig
from vlmkit.models.budget import check_fits, estimate
from vlmkit.models.io import check_no_remote_code
from vlmkit.processing.tiling import AnyRes
from vlmkit.training.stages import GROUP_ORDER, StageConfig

DTYPES = ("bf16", "bf16-mixed", "fp32")
# transient bytes per weight of the one layer whose weights a QLoRA backward dequantizes (codes widened, scaled)
DEQUANT_BYTES = {"int8": 8, "int4": 12, "nf4": 4}
GB = 1e9


@dataclass(frozen=True)
class LayerShape:
    """One transformer layer as the activation count needs it."""

    hidden: int
    intermediate: int
    kv: int  # key/value projection width (< hidden with grouped-query attention)
    gated: bool  # SwiGLU-style MLP (gate * up) vs a plain fc1 -> act -> fc2 MLP
    rms: bool  # RMSNorm (upcasts to fp32 inside) vs LayerNorm
    linears: tuple[tuple[int, int], ...]  # (in, out) of every linear: what LoRA adapts


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts and layer shapes of vision tower, projector and LM (read from configs)."""

    vision_params: int
    projector_params: int
    lm_params: int
    vision_layers: int
    vision_layer: LayerShape
    vision_tokens: int  # tower tokens per image
    image_tokens: int  # LM tokens per image (after the projector)
    lm_layers: int
    lm_layer: LayerShape
    vocab: int


@dataclass
class MemoryPlan:
    """Bytes per component; ``params`` is group -> {"trainable", "frozen"} counts."""

    params: dict[str, dict[str, int]]
    weights: int
    gradients: int
    optimizer: int
    activations: int
    peak: int
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gb"] = {
            k: round(getattr(self, k) / GB, 3)
            for k in ("weights", "gradients", "optimizer", "activations", "peak")
        }
        return data


# ------------------------------------------------------------------------------------------------ shapes


def _layers(model: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The model's stack of transformer blocks: its longest ModuleList."""
    if isinstance(blocks := getattr(model, "blocks", None), nn.Sequential):  # timm's ViT
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len)


def _layer_shape(layer: nn.Module, *, hidden: int) -> LayerShape:
    linears = []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            linears.append((name.rsplit(".", 1)[-1], module.in_features, module.out_features))
        elif type(module).__name__ == "Conv1D":  # GPT-2 style: weight is [in, out]
            linears.append((name.rsplit(".", 1)[-1], *module.weight.shape))
    names = {n for n, _, _ in linears}
    widest = max(out for _, _, out in linears)  # the MLP's up-projection
    return LayerShape(
        hidden=hidden,
        intermediate=widest // 2 if "gate_up_proj" in names else widest,  # fused gate+up (Phi-3)
        kv=next((out for n, _, out in linears if n in ("k_proj", "key")), hidden),
        gated=bool(names & {"gate_proj", "w1", "gate_up_proj"}),
        rms=any("RMSNorm" in type(m).__name__ for m in layer.modules()),
        linears=tuple((i, o) for _, i, o in linears),
    )


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shape_from_configs(
    *, vision: Any, language: Any, projector: str | ProjectorConfig = "mlp", image_size: int | None = None,
    select: str = "patch",
) -> ModelShape:  # fmt: skip
    """transformers config objects (vision tower, causal LM) -> ``ModelShape``, counting on the meta device.

    ``vision`` may also be a vlmkit ``VisionConfig`` (open_clip / timm / fused towers); a fused tower counts the
    layers of its deepest member."""
    from transformers import AutoModelForCausalLM

    from vlmkit.models.projectors import build_projector
    from vlmkit.models.vision import build_vision_encoder

    if isinstance(vision, VisionConfig):
        vision_cfg = vision
    else:
        hf_vision = vision.to_dict() | {"model_type": vision.model_type}
        vision_cfg = VisionConfig(
            hf_config=hf_vision, image_size=image_size or vision.image_size, select=select
        )
    projector_cfg = projector if isinstance(projector, ProjectorConfig) else ProjectorConfig(type=projector)
    with torch.device("meta"):
        encoder = build_vision_encoder(config=vision_cfg)
        lm = AutoModelForCausalLM.from_config(language, trust_remote_code=False)
        lm_dim = lm.get_input_embeddings().weight.shape[1]
        proj = build_projector(config=projector_cfg, in_dim=encoder.hidden_size, out_dim=lm_dim)
    deepest = max(
        getattr(encoder, "towers", [encoder]), key=lambda m: len(_layers(m.model))
    )  # fused: a member
    vision_layers, lm_layers = _layers(deepest.model), _layers(lm)
    return ModelShape(
        vision_params=_count(encoder), projector_params=_count(proj), lm_params=_count(lm),
        vision_layers=len(vision_layers), vision_layer=_layer_shape(vision_layers[0], hidden=deepest.hidden_size),
        vision_tokens=encoder.num_tokens, image_tokens=proj.num_output_tokens(encoder.num_tokens),
        lm_layers=len(lm_layers), lm_layer=_layer_shape(lm_layers[0], hidden=lm_dim),
        vocab=lm.get_output_embeddings().weight.shape[0],
    )  # fmt: skip


def anyres_shape(shape: ModelShape, *, max_tiles: int, max_tile_tokens: int | None = None) -> ModelShape:
    """``shape`` with AnyRes images at their largest (every grid of at most ``max_tiles`` tiles): the tower sees
    the base view and every tile, the LM the packed tokens with their row newlines."""
    side = math.isqrt(shape.vision_tokens)
    if side * side != shape.vision_tokens or shape.image_tokens != shape.vision_tokens:
        raise ValueError(
            f"AnyRes needs a square patch grid kept token for token by the projector; this composition has "
            f"{shape.vision_tokens} tower tokens and {shape.image_tokens} LM tokens per image"
        )
    tiling = TilingConfig(max_tiles=max_tiles, max_tile_tokens=max_tile_tokens)
    tiling.validate(tile_size=side)
    views, tokens = AnyRes(tiling=tiling, tile_size=side, patch_size=1).largest()  # geometry in patch units
    return replace(shape, vision_tokens=views * shape.vision_tokens, image_tokens=tokens)


def shape_from_dirs(*, vision: str | Path, language: str | Path, **kwargs: Any) -> ModelShape:
    """Like ``shape_from_configs`` from model directories or hub ids (only their configs are read); ``vision``
    may name open_clip / timm towers or several towers (fused), as ``VLM.build`` takes it."""
    from vlmkit.models.vision import vision_config_from_dirs
    from vlmkit.models.vision.encoder import vision_hf_config

    language_config = _hf_config(language)
    _check_plannable(language_config.to_dict(), source=language)
    tower = vision_config_from_dirs(vision, overrides={"image_size": kwargs.get("image_size")})
    if tower is not None:
        for member in (tower, *tower.towers):
            _check_plannable(member.hf_config, source=vision)
        return shape_from_configs(vision=tower, language=language_config, **kwargs)
    vision_config = _hf_config(vision).to_dict()  # CLIP/SigLIP: keeps the vision half
    _check_plannable(vision_config.get("vision_config") or vision_config, source=vision)
    return shape_from_configs(vision=vision_hf_config(vision_config), language=language_config, **kwargs)


def _check_plannable(config: dict[str, Any], *, source: str | Path) -> None:
    """Counting builds the layers on the meta device (no weights, but Python objects per layer): a config of
    10**9 layers is refused from its closed-form estimate instead of hanging the planner."""
    check_fits({"model": estimate(config)}, source=source, bytes_per_param=0,
               purpose="to build its layers even on the meta device")  # fmt: skip


def _hf_config(source: str | Path) -> Any:
    """A transformers config from a local dir (refused if it ships code) or a hub id; never runs model code."""
    from transformers import AutoConfig

    if Path(source).expanduser().is_dir():
        check_no_remote_code(Path(source).expanduser())
    return AutoConfig.from_pretrained(str(source), trust_remote_code=False)


# ------------------------------------------------------------------------------------------ activations


def _layer_bytes(layer: LayerShape, *, trainable: bool, act: int) -> int:
    """Bytes autograd keeps per token for one layer whose input needs a gradient."""
    h, f, kv = layer.hidden, layer.intermediate, layer.kv
    norm_in = 4 * h if layer.rms else act * h  # RMSNorm keeps its fp32 upcast input
    attention = act * (2 * h + 2 * kv)  # SDPA keeps q, k, v and its output
    if trainable:
        mlp = act * (4 * f if layer.gated else 2 * f)  # act input, act output (x up), down/fc2 input
        return 2 * (norm_in + act * h) + act * h + attention + mlp
    return 2 * norm_in + attention + act * (3 * f if layer.gated else f)


def _lora_bytes(layer: LayerShape, *, rank: int, dropout: float, adapter: int, act: int) -> int:
    """Extra bytes per token for LoRA on every linear of a layer (dropout copy + mask, rank activation)."""
    if dropout == 0 and adapter == act:  # no copies: q, k, v (and gate, up) share their saved input
        distinct = {i for i, _ in layer.linears}
        return act * sum(distinct) + adapter * rank * len(layer.linears)
    return sum((adapter + (1 if dropout else 0)) * i + adapter * rank for i, _ in layer.linears)


def _stack_bytes(
    layer: LayerShape,
    *,
    layers: int,
    tokens: int,
    trainable: bool,
    act: int,
    residual: int,
    ckpt: bool,
    lora: int,
) -> tuple[int, int]:
    """-> (kept through backward, recomputed one layer at a time): all layers are kept without
    checkpointing; with it only each layer's input, while one layer at a time is recomputed."""
    per_layer = (_layer_bytes(layer, trainable=trainable, act=act) + lora) * tokens
    if ckpt:
        return layers * residual * layer.hidden * tokens, per_layer
    return layers * per_layer, 0


# ----------------------------------------------------------------------------------------------- planner


def plan_memory(
    shape: ModelShape, *, stage: StageConfig, batch: int, seq: int, grad_ckpt: bool = False, dtype: str = "bf16",
    images_per_sample: int = 1,
) -> MemoryPlan:  # fmt: skip
    """Estimated peak training memory for ``batch`` sequences of ``seq`` tokens (each with its images)."""
    stage.validate()
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    params = _param_counts(shape, stage)
    weight = 2 if dtype == "bf16" else 4
    act = 4 if dtype == "fp32" else 2
    adapter = 4  # peft keeps adapters in fp32 under a bf16 base
    trainable = stage.trainable_groups()
    bytes_of = {g: (adapter if "lora" in g else weight) for g in GROUP_ORDER}
    weights = sum((c["trainable"] + c["frozen"]) * bytes_of[g] for g, c in params.items())
    if stage.quantize is not None:  # QLoRA: the LM's linear layers stored quantized
        weights -= _quantized_saving(shape, method=stage.quantize, weight=weight)
    gradients = sum(params[g]["trainable"] * bytes_of[g] for g in trainable)
    optimizer = 2 * gradients  # AdamW: exp_avg and exp_avg_sq in the parameter's dtype
    activations = _activation_bytes(shape, stage=stage, tokens=batch * seq, images=batch * images_per_sample,
                                    act=act, residual=weight, ckpt=grad_ckpt)  # fmt: skip
    if stage.quantize is not None:  # backward dequantizes one layer's weights at a time
        activations += max(i * o for i, o in shape.lm_layer.linears) * DEQUANT_BYTES[stage.quantize]
    peak = weights + optimizer + max(activations, gradients)
    settings = {"stage": stage.stage, "batch": batch, "seq": seq, "grad_ckpt": grad_ckpt, "dtype": dtype,
                "lora_rank": stage.lora_rank if stage.stage == "lora" else None, "freeze_vision": stage.freeze_vision,
                "lora_vision": stage.lora_vision, "quantize": stage.quantize}  # fmt: skip
    return MemoryPlan(params=params, weights=weights, gradients=gradients, optimizer=optimizer,
                      activations=activations, peak=peak, settings=settings)  # fmt: skip


def _quantized_saving(shape: ModelShape, *, method: str, weight: int) -> int:
    """Bytes saved by storing the LM's linear layers (its output layer excepted) quantized: int8 is a byte a
    weight plus a float32 scale a row; int4 half a byte plus two bfloat16 numbers a group of up to 128;
    bitsandbytes NF4 half a byte plus a double-quantized absmax (8 bits a block of 64, float32 a 256 blocks)."""
    linears = shape.lm_layer.linears
    count = shape.lm_layers * sum(i * o for i, o in linears)
    rows = shape.lm_layers * sum(o for _, o in linears)
    group = next((g for g in (128, 64, 32) if all(i % g == 0 for i, _ in linears)), 32)
    stored = {"int8": count + 4 * rows, "int4": count / 2 + 4 * count / group,
              "nf4": count / 2 + count / 64 + 4 * count / (64 * 256)}[method]  # fmt: skip
    return int(count * weight - stored)


def _param_counts(shape: ModelShape, stage: StageConfig) -> dict[str, dict[str, int]]:
    lora = vision_lora = 0
    if stage.stage == "lora":
        lora = shape.lm_layers * sum(stage.lora_rank * (i + o) for i, o in shape.lm_layer.linears)
        if stage.lora_vision:
            vision_lora = shape.vision_layers * sum(
                stage.lora_rank * (i + o) for i, o in shape.vision_layer.linears
            )
    sizes = {"vision": shape.vision_params, "vision_lora": vision_lora, "projector": shape.projector_params,
             "language": shape.lm_params, "lora": lora}  # fmt: skip
    trainable = stage.trainable_groups()
    return {g: {"trainable": n if g in trainable else 0, "frozen": 0 if g in trainable else n}
            for g, n in sizes.items() if n}  # fmt: skip


def _activation_bytes(
    shape: ModelShape, *, stage: StageConfig, tokens: int, images: int, act: int, residual: int, ckpt: bool
) -> int:
    trainable = stage.trainable_groups()
    lora = stage.stage == "lora"
    lm_lora = (
        _lora_bytes(shape.lm_layer, rank=stage.lora_rank, dropout=stage.lora_dropout, adapter=4, act=act)
        if lora
        else 0
    )
    kept, recomputed = _stack_bytes(shape.lm_layer, layers=shape.lm_layers, tokens=tokens, act=act,
                                    trainable="language" in trainable, residual=residual, ckpt=ckpt, lora=lm_lora)  # fmt: skip
    h = shape.lm_layer.hidden
    kept += tokens * (act * 3 * h + 4 * h)  # embeddings, merged embeddings, final norm
    vision_tokens = images * shape.vision_tokens
    kept += (
        images * shape.image_tokens * act * (2 * h) + vision_tokens * act * shape.vision_layer.hidden
    )  # projector
    if not stage.vision_frozen:
        vision_lora = 0
        if "vision_lora" in trainable:
            vision_lora = _lora_bytes(
                shape.vision_layer, rank=stage.lora_rank, dropout=stage.lora_dropout, adapter=4, act=act
            )
        vision_kept, vision_recomputed = _stack_bytes(
            shape.vision_layer, layers=shape.vision_layers, tokens=vision_tokens, trainable="vision" in trainable,
            act=act, residual=residual, ckpt=ckpt, lora=vision_lora,
        )  # fmt: skip
        kept, recomputed = kept + vision_kept, max(recomputed, vision_recomputed)
    # the loss's buffers are gone before the first layer is recomputed
    loss = tokens * shape.vocab * 12
    return kept + max(loss, recomputed)


# ------------------------------------------------------------------------------------------ measurement


def measure_peak_bytes(run: Callable[[], Any], *, resident: int) -> int:
    """Peak tensor memory of ``run()`` on CPU: ``resident`` bytes (tensors that already exist, e.g. weights)
    plus the highest total of tensors allocated during the run and still alive, from the allocation events
    of torch's profiler (``profile_memory=True``; the CPU allocator reports every allocation and free)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, node.typed[1].alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return resident + peak


def table(plan: MemoryPlan, *, title: str) -> Any:
    """A rich table of the plan: parameter counts per group, then memory per component."""
    from rich.table import Table

    out = Table(title=title, title_justify="left")
    for column in ("", "trainable", "frozen", "memory"):
        out.add_column(column, justify="left" if not column else "right")
    for group, counts in plan.params.items():
        out.add_row(f"params: {group}", f"{counts['trainable']:,}", f"{counts['frozen']:,}", "")
    for name in ("weights", "gradients", "optimizer", "activations"):
        out.add_row(name, "", "", human_bytes(getattr(plan, name)))
    out.add_row("peak", "", "", human_bytes(plan.peak), style="bold")
    return out


def human_bytes(count: int) -> str:
    """GB (1e9) for real models, MB (1e6) for tiny ones."""
    return f"{count / GB:.2f} GB" if count >= GB / 10 else f"{count / 1e6:.2f} MB"
