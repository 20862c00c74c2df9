"""Original LLaVA checkpoints (haotian-liu/LLaVA: ``llava_llama`` / ``llava_mistral`` / ``llava_qwen``) -> vlmkit.

Such a directory is a causal LM checkpoint (``model.*`` / ``lm_head.*``) plus the projector
(``model.mm_projector.*``) and ``mm_*`` config fields; the vision tower is named by hub id
(``mm_vision_tower``) and has to be given as a local directory. LLaVA inserted ``IMAGE_TOKEN_INDEX=-200`` at
tokenization; vlmkit adds ``<image>`` as a special token instead (its id may lie past the LM vocabulary: those
embeddings are always replaced by image features).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vlmkit.config import ConfigError, LanguageConfig, ProjectorConfig, PromptConfig, TilingConfig, VLMConfig
from vlmkit.models.io import (
    INDEX_NAME,
    WEIGHTS_NAME,
    ModelDirError,
    check_no_pickle_only,
    config_errors,
    read_json,
    weight_files,
)
from vlmkit.models.language.protocols import LanguageModel
from vlmkit.models.parts import (
    add_image_token,
    hf_config_dict,
    load_tokenizer,
    load_vision_tower,
    vision_config_for,
)
from vlmkit.models.vision import VisionEncoder
from vlmkit.models.vlm import VisionLanguageModel

# LLaVA's model_type -> the transformers causal LM its language half is
LM_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2",
            "llava_qwen2": "qwen2"}  # fmt: skip
SELECT = {"patch": "patch", "cls_patch": "full"}
PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower.vision_tower."  # present when the tower was fine-tuned and saved along
NEWLINE_KEY = "model.image_newline"  # LLaVA-NeXT (anyres + spatial_unpad)
# mm_patch_merge_type -> (unpad, image_newline); "flat" orders tiles differently and is not supported
MERGE_TYPES = {"spatial_unpad": (True, True), "spatial": (False, False)}
GRID_RANGE = re.compile(r"\((\d+)x(\d+)\),\.\.\.,\((\d+)x(\d+)\)")  # LLaVA-NeXT's "(1x1),...,(6x6)"
# LLaVA training / multimodal fields: not part of the language model's config
_LLAVA_FIELDS = {"architectures", "model_type", "_name_or_path", "transformers_version", "image_aspect_ratio",
                 "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side", "use_mm_proj",
                 "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "tune_mm_vision_resampler",
                 "freeze_mm_vision_resampler", "unfreeze_mm_vision_tower", "mm_vision_tower_lr"}  # fmt: skip


def is_original_llava(raw: dict[str, Any]) -> bool:
    return any(key.startswith("mm_") for key in raw) and "vision_config" not in raw


def load_llava_original(
    directory: Path, *, raw: dict[str, Any], dtype: torch.dtype | None, vision_tower: str | Path | None
) -> tuple[Any, Any]:
    """An original LLaVA directory + its local vision tower dir -> (VisionLanguageModel, tokenizer)."""
    projector_cfg, lm_type, select = _check_config(directory, raw=raw, vision_tower=vision_tower)
    tower = load_vision_tower(vision_tower, dtype=dtype)  # type: ignore[arg-type]
    overrides: dict[str, Any] = {"feature_layer": raw.get("mm_vision_select_layer", -2), "select": select}
    if raw.get("image_aspect_ratio") == "pad":
        overrides["resize_mode"] = "pad"  # expand2square with the mean colour, then the tower's processor
    vision_cfg = vision_config_for(tower=tower, source=vision_tower, overrides=overrides)  # type: ignore[arg-type]
    if str(raw.get("image_aspect_ratio", "")).startswith("anyres"):
        vision_cfg.tiling = original_tiling(raw, tile_size=vision_cfg.image_size, directory=directory)
    vision = VisionEncoder(config=vision_cfg, model=tower)
    if select == "patch" and vision.num_prefix != 1:
        raise ModelDirError(
            f"{directory}: mm_vision_select_feature 'patch' drops one leading token, but the {vision.model_type} "
            f"tower has {vision.num_prefix} non-patch tokens"
        )
    extra = read_prefixed(directory, prefixes=(PROJECTOR_PREFIX, TOWER_PREFIX, NEWLINE_KEY))
    _load_saved_tower(tower, extra, source=directory)
    language_model = _load_language_model(directory, raw=raw, lm_type=lm_type, dtype=dtype)
    tokenizer = load_tokenizer(directory)

    prompt = PromptConfig(template="auto")  # the tokenizer's chat template if it has one, else llava-v1
    prompt.image_token_id = add_image_token(tokenizer, prompt)
    config = VLMConfig(
        vision=vision_cfg,
        projector=projector_cfg,
        language=LanguageConfig(hf_config=hf_config_dict(language_model.config), source=str(directory)),
        prompt=prompt,
    )
    model = VisionLanguageModel(config=config, vision=vision, language_model=language_model)
    _load_projector(model.projector, extra, config=projector_cfg, source=directory)
    if model.tiling is not None and model.tiling.image_newline is not None:
        if NEWLINE_KEY not in extra:
            raise ModelDirError(f"{directory}: mm_patch_merge_type spatial_unpad but no {NEWLINE_KEY} weight")
        with torch.no_grad():
            model.tiling.image_newline.copy_(extra[NEWLINE_KEY])
    return model.to(dtype or language_model.dtype), tokenizer


def original_tiling(raw: dict[str, Any], *, tile_size: int, directory: Path) -> TilingConfig:
    """LLaVA-NeXT's ``image_aspect_ratio`` anyres[_max_N], ``image_grid_pinpoints`` ((width, height) pairs, or
    a "(1x1),...,(6x6)" grid range) and ``mm_patch_merge_type`` as vlmkit tiling (pinpoints as (height, width))."""
    aspect, merge = str(raw["image_aspect_ratio"]), raw.get("mm_patch_merge_type", "flat")
    problems = []
    cap = re.fullmatch(r"anyres(?:_max_(\d+))?", aspect)
    if cap is None:
        problems.append(f"image_aspect_ratio={aspect!r} (supported: anyres, anyres_max_N)")
    if merge not in MERGE_TYPES:
        problems.append(f"mm_patch_merge_type={merge!r} (supported: {', '.join(MERGE_TYPES)})")
    pinpoints = _original_pinpoints(raw.get("image_grid_pinpoints"), tile_size=tile_size)
    if pinpoints is None:
        problems.append(f"image_grid_pinpoints={raw.get('image_grid_pinpoints')!r}")
    if problems:
        raise ModelDirError(f"{directory}: LLaVA-NeXT checkpoint not supported: {'; '.join(problems)}")
    unpad, newline = MERGE_TYPES[merge]
    tiling = TilingConfig(grid_pinpoints=pinpoints, unpad=unpad, image_newline=newline,  # type: ignore[arg-type]
                          max_tile_tokens=int(cap.group(1)) if cap.group(1) else None)  # type: ignore[union-attr]  # fmt: skip
    try:
        tiling.validate(tile_size=tile_size)
    except ConfigError as exc:
        raise ModelDirError(f"{directory}: {exc}") from None
    return tiling


def _original_pinpoints(value: Any, *, tile_size: int) -> tuple[tuple[int, int], ...] | None:
    if isinstance(value, str) and (grid := GRID_RANGE.fullmatch(value.replace(" ", ""))):
        w0, h0, w1, h1 = (int(g) for g in grid.groups())  # (width x height) in tiles, LLaVA's order kept
        return tuple((h * tile_size, w * tile_size) for w in range(w0, w1 + 1) for h in range(h0, h1 + 1))
    if isinstance(value, list) and value and all(isinstance(p, list) and len(p) == 2 for p in value):
        return tuple((int(h), int(w)) for w, h in value)  # LLaVA lists (width, height)
    return None


def _check_config(
    directory: Path, *, raw: dict[str, Any], vision_tower: str | Path | None
) -> tuple[ProjectorConfig, str, str]:
    """(projector config, transformers LM model_type, vision select), or a ModelDirError naming every problem."""
    problems = []
    kind = raw.get("mm_projector_type", "linear")  # LLaVA's own default
    match = re.fullmatch(r"mlp(\d+)x_gelu", str(kind))
    projector = (
        ProjectorConfig(type="mlp", depth=int(match.group(1))) if match else ProjectorConfig(type="linear")
    )
    if kind != "linear" and not match:
        problems.append(f"mm_projector_type={kind!r} (supported: linear, mlpNx_gelu)")
    lm_type = LM_TYPES.get(raw.get("model_type", ""))
    if lm_type is None:
        problems.append(f"model_type={raw.get('model_type')!r} (supported: {', '.join(LM_TYPES)})")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in SELECT:
        problems.append(f"mm_vision_select_feature={feature!r} (supported: patch, cls_patch)")
    if raw.get("mm_use_im_start_end") or raw.get("mm_use_im_patch_token"):
        problems.append("mm_use_im_start_end / mm_use_im_patch_token (image start/end tokens)")
    if problems:
        raise ModelDirError(f"{directory}: this LLaVA checkpoint is not supported: {'; '.join(problems)}")
    if vision_tower is None:
        raise ModelDirError(
            f"{directory}: an original LLaVA checkpoint names its vision tower by hub id "
            f"({raw.get('mm_vision_tower') or raw.get('vision_tower')!r}); pass the local tower directory with "
            "--vision-tower DIR (Python: vision_tower=DIR)"
        )
    return projector, lm_type, SELECT[feature]  # type: ignore[return-value]


def _load_language_model(
    directory: Path, *, raw: dict[str, Any], lm_type: str, dtype: torch.dtype | None
) -> LanguageModel:
    """The ``model.*`` / ``lm_head.*`` weights through transformers' own safetensors loading."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in raw.items() if k not in _LLAVA_FIELDS and not k.startswith("mm_")}
    check_no_pickle_only(directory)
    with config_errors(directory / "config.json"):
        text_config = AutoConfig.for_model(lm_type, **fields)
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            directory,
            config=text_config,
            dtype=dtype if dtype is not None else "auto",
            use_safetensors=True,
            local_files_only=True,
            output_loading_info=True,
            trust_remote_code=False,
        )
    model, info = loaded  # (model, loading info): transformers' annotation names the model alone
    # unexpected keys are the projector / tower (read separately); missing ones would be random weights
    missing = sorted(info.get("missing_keys", ()))
    if missing or info.get("mismatched_keys"):
        first = missing[0] if missing else next(iter(info["mismatched_keys"]))
        raise ModelDirError(f"{directory}: language model weights missing or mis-shaped (first: {first})")
    return model.eval()


def read_prefixed(directory: Path, *, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Only the tensors whose names start with ``prefixes`` (the LM's billions are not read twice)."""
    files = weight_files(directory)  # shard names checked: plain files inside the directory
    if files != [directory / WEIGHTS_NAME]:
        weight_map = read_json(directory / INDEX_NAME)["weight_map"]
        files = sorted({directory / f for n, f in weight_map.items() if n.startswith(prefixes)})
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({n: handle.get_tensor(n) for n in handle.keys() if n.startswith(prefixes)})
    return tensors


def _load_saved_tower(tower: torch.nn.Module, state: dict[str, torch.Tensor], *, source: Path) -> None:
    """A tower fine-tuned with the LM is saved inside the checkpoint: those weights win over the tower dir's."""
    saved = {n[len(TOWER_PREFIX) :]: t for n, t in state.items() if n.startswith(TOWER_PREFIX)}
    if not saved:
        return
    result = tower.load_state_dict(saved, strict=False)
    unexpected = [n for n in result.unexpected_keys if not n.endswith("position_ids")]  # old buffer name
    if result.missing_keys or unexpected:
        first = (result.missing_keys or unexpected)[0]
        raise ModelDirError(f"{source}: the saved vision tower weights do not fit the tower (first: {first})")


def _load_projector(
    projector: torch.nn.Module, state: dict[str, torch.Tensor], *, config: ProjectorConfig, source: Path
) -> None:
    """LLaVA's ``nn.Linear`` (linear) or ``nn.Sequential(Linear, GELU, Linear, ...)`` -> vlmkit's names."""
    if config.type == "linear":
        names = {"weight": "linear.weight", "bias": "linear.bias"}
    else:  # Sequential indices 0, 2, 4, ... are the Linear layers
        names = {
            f"{2 * i}.{p}": f"linear_{i + 1}.{p}" for i in range(config.depth) for p in ("weight", "bias")
        }
    found = {k[len(PROJECTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
    if set(found) != set(names):
        raise ModelDirError(
            f"{source}: projector weights {sorted(found) or 'absent'} do not match mm_projector_type "
            f"(expected model.mm_projector.{{{', '.join(sorted(names))}}})"
        )
    try:
        projector.load_state_dict({names[k]: v for k, v in found.items()})
    except RuntimeError as exc:  # shape mismatch: mm_hidden_size / hidden_size differ from the parts
        raise ModelDirError(f"{source}: projector weights do not fit the tower and LM: {exc}") from None
