"""Typed, JSON round-trippable configuration for a vlmkit model. No torch import here.

A model directory's ``config.json`` is ``VLMConfig.to_dict()``; ``VLMConfig.from_dict`` validates every
field and names the offending one on error, so a typo never silently becomes a default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

VISION_SELECT = ("patch", "full")
RESIZE_MODES = ("resize", "pad", "crop")
# the tower's input side in pixels: real towers use 224..1024; far more only serves to exhaust memory
MAX_IMAGE_SIZE = 4096
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QUANT_METHODS = ("int8", "int4", "nf4")


class ConfigError(ValueError):
    """A config file or dict is invalid; the message names the field.

    ``field``: the offending option's field name, when there is one (the CLI shows it as its flag)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def setting(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    default_factory: Any = dataclasses.MISSING,
    flag: str | None = None,
    negation: str | None = None,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field that also declares its command-line option: the CLI is derived from these fields
    (``vlmkit.cli.schema``), so an option's default, range, choices and help exist once.

    ``flag``: the option name when it is not ``--field-name``; ``negation``: the ``--no-…`` form of a bool;
    ``low`` / ``high``: inclusive bounds; ``choices``: allowed strings.
    """
    meta = {"doc": doc, "flag": flag, "negation": negation, "low": low, "high": high, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TilingConfig:
    """AnyRes (LLaVA-NeXT / OneVision): a base view plus a grid of tiles at the tower's image size.

    The grid canvases are ``grid_pinpoints`` ((height, width) pairs, multiples of ``vision.image_size``) or, with
    ``max_tiles``, every rows x cols grid of at most that many tiles.
    """

    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    max_tiles: int | None = None
    # cut the letterbox padding back off the tiles' feature map (LLaVA-NeXT's "spatial_unpad")
    unpad: bool = True
    # a learned embedding after every row of the feature map
    image_newline: bool = True
    # OneVision's anyres_max_N: a feature map above N tiles' tokens is downsampled bilinearly to about N
    max_tile_tokens: int | None = None
    # OneVision: the images of a multi-image prompt get the base view only
    multi_image_base_only: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TilingConfig:
        """Checked field names and types (values are checked against a tile size by ``validate``)."""
        return _from_dict(cls, data, prefix="vision.tiling.")

    def pinpoints(self, tile_size: int) -> list[tuple[int, int]]:
        """The canvases to choose from, as (height, width) pixels."""
        if self.grid_pinpoints:
            return [(int(h), int(w)) for h, w in self.grid_pinpoints]
        n = self.max_tiles or 1
        grids = [(r, c) for r in range(1, n + 1) for c in range(1, n + 1) if r * c <= n]
        return [(r * tile_size, c * tile_size) for r, c in grids]

    def validate(self, *, tile_size: int) -> None:
        _require(bool(self.grid_pinpoints) != (self.max_tiles is not None), "vision.tiling",
                 "needs exactly one of grid_pinpoints and max_tiles")  # fmt: skip
        _require(self.max_tiles is None or 1 <= self.max_tiles <= 64, "vision.tiling.max_tiles",
                 f"must be in 1..64, got {self.max_tiles}")  # fmt: skip
        for pair in self.grid_pinpoints:
            ok = len(pair) == 2 and all(v > 0 and v % tile_size == 0 for v in pair)
            _require(ok, "vision.tiling.grid_pinpoints",
                     f"must list [height, width] pairs of positive multiples of vision.image_size={tile_size}, "
                     f"got {list(pair)}")  # fmt: skip
        _require(self.max_tile_tokens is None or self.max_tile_tokens >= 1, "vision.tiling.max_tile_tokens",
                 f"must be >= 1, got {self.max_tile_tokens}")  # fmt: skip


@dataclass
class VisionConfig:
    """Vision tower: a transformers vision model plus how its features are read out."""

    # transformers config of the tower (``model_type`` clip_vision_model / siglip_vision_model / dinov2 ...)
    hf_config: dict[str, Any] = field(default_factory=dict)
    # which hidden state feeds the projector; -2 = penultimate layer, as LLaVA does
    feature_layer: int = -2
    # "patch" drops the CLS/register tokens, "full" keeps every token
    select: str = "patch"
    # runtime input resolution; position embeddings are interpolated when it differs from pre-training
    image_size: int = 224
    # "resize" squashes, "pad" letterboxes with the mean colour, "crop" resizes the short side + centre crop
    resize_mode: str = "crop"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # where the tower came from (informational; weights live in model.safetensors)
    source: str | None = None
    # fused tower: one config per member tower, features concatenated per patch (hf_config {"model_type": "fused"})
    towers: tuple[VisionConfig, ...] = ()
    # channel widths of a convolutional stem that replaces the tower's patch embedding (one stride-2 3x3 conv
    # each, so 2**len = patch size); empty = the tower's own single-convolution patch embedding
    conv_stem: tuple[int, ...] = ()
    # AnyRes tiling (LLaVA-NeXT / OneVision); None = one fixed-size view per image
    tiling: TilingConfig | None = None

    def validate(self) -> None:
        _require(
            self.select in VISION_SELECT,
            "vision.select",
            f"must be one of {VISION_SELECT}, got {self.select!r}",
        )
        _require(
            self.resize_mode in RESIZE_MODES,
            "vision.resize_mode",
            f"must be one of {RESIZE_MODES}, got {self.resize_mode!r}",
        )
        _require(0 < self.image_size <= MAX_IMAGE_SIZE, "vision.image_size",
                 f"must be in 1..{MAX_IMAGE_SIZE}, got {self.image_size}")  # fmt: skip
        _require(len(self.image_mean) == 3, "vision.image_mean", "must have 3 values")
        _require(len(self.image_std) == 3, "vision.image_std", "must have 3 values")
        _require(all(s > 0 for s in self.image_std), "vision.image_std", "must be positive")
        _require("model_type" in self.hf_config, "vision.hf_config", "must contain 'model_type'")
        _require(len(self.towers) != 1, "vision.towers", "a fused tower needs at least two members")
        for tower in self.towers:
            _require(not tower.towers, "vision.towers", "a member cannot be a fused tower itself")
            tower.validate()
        _require(
            all(isinstance(c, int) and c > 0 for c in self.conv_stem),
            "vision.conv_stem",
            f"must list positive channel counts, got {list(self.conv_stem)}",
        )
        if self.tiling is not None:
            self.tiling.validate(tile_size=self.image_size)


@dataclass
class ProjectorConfig:
    """Maps visual tokens into the language model's embedding space."""

    type: str = "mlp"  # registry name: linear | mlp | resampler | ...
    depth: int = 2  # mlp: number of Linear layers (2 = LLaVA-1.5 mlp2x_gelu)
    num_queries: int = 64  # resampler: output tokens per image, independent of the input count
    num_layers: int = 2  # resampler: cross-attention blocks
    num_heads: int = 8  # resampler: attention heads
    shuffle_factor: int = 2  # pixel-shuffle: r, so r x r neighbouring tokens become one (r**2 fewer tokens)

    def validate(self) -> None:
        _require(bool(self.type), "projector.type", "must be a non-empty registry name")
        _require(self.depth >= 1, "projector.depth", f"must be >= 1, got {self.depth}")
        _require(self.num_queries >= 1, "projector.num_queries", f"must be >= 1, got {self.num_queries}")
        _require(self.num_layers >= 1, "projector.num_layers", f"must be >= 1, got {self.num_layers}")
        _require(self.num_heads >= 1, "projector.num_heads", f"must be >= 1, got {self.num_heads}")
        _require(
            self.shuffle_factor >= 1, "projector.shuffle_factor", f"must be >= 1, got {self.shuffle_factor}"
        )


@dataclass
class LanguageConfig:
    """A transformers causal LM, fed through ``inputs_embeds``."""

    hf_config: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def validate(self) -> None:
        _require("model_type" in self.hf_config, "language.hf_config", "must contain 'model_type'")


@dataclass
class PromptConfig:
    """How conversations become tokens."""

    # "auto": the tokenizer's own chat template if it has one, else "llava-v1"; or a built-in name
    template: str = "auto"
    image_token: str = "<image>"
    image_token_id: int | None = None  # filled in when the token is added to the tokenizer
    system: str | None = None  # overrides the template's default system prompt

    def validate(self) -> None:
        _require(bool(self.image_token), "prompt.image_token", "must be a non-empty string")


@dataclass
class QuantizationConfig:
    """How the language model's linear layers are stored (see vlmkit/quantization/schemes.py)."""

    method: str = "int8"  # int8 | int4 | nf4
    scheme: str = "int8-dynamic-per-token"  # the exact format, e.g. int4-weight-only-grouped
    group_size: int | None = None  # int4: input columns per scale
    skip: tuple[str, ...] = ("lm_head",)  # LM linear layers kept in the compute dtype

    def validate(self) -> None:
        _require(self.method in QUANT_METHODS, "quantization.method",
                 f"must be one of {QUANT_METHODS}, got {self.method!r}")  # fmt: skip
        _require(
            self.group_size is None or self.group_size > 0, "quantization.group_size", "must be positive"
        )


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    vlmkit_version: int = SCHEMA_VERSION
    quantization: QuantizationConfig | None = None  # absent from config.json when the model is not quantized

    def validate(self) -> None:
        _require(
            self.vlmkit_version <= SCHEMA_VERSION,
            "vlmkit_version",
            f"schema {self.vlmkit_version} is newer than this vlmkit understands ({SCHEMA_VERSION}); upgrade vlmkit",
        )
        for part in (self.vision, self.projector, self.language, self.prompt):
            part.validate()
        if self.quantization is not None:
            self.quantization.validate()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["quantization"] is None:
            del data["quantization"]  # unquantized configs stay as they were
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLMConfig:
        config = _from_dict(cls, data, prefix="")
        config.validate()
        return config

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> VLMConfig:
        data = read_json(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return cls.from_dict(data)


def require(ok: bool, *, field: str, message: str | Callable[[], str]) -> None:
    """The package's one validation helper: a failed check is a ``ConfigError`` naming ``field`` (the CLI shows its
    flag, the server a 400 naming it). ``message`` may be a callable, so a passing check builds no text."""
    if not ok:
        raise ConfigError(message() if callable(message) else message, field=field)


def _require(ok: bool, name: str, message: str) -> None:
    require(ok, field=name, message=lambda: f"config field '{name}' {message}")


def _from_dict(cls: type, data: Any, *, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``, checking names and types recursively."""
    where = prefix.rstrip(".") or "<root>"
    if not isinstance(data, dict):
        raise ConfigError(f"config field '{where}' must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config field '{prefix}{unknown[0]}' (known: {', '.join(sorted(known))})")
    kwargs = {name: _coerce(hints[name], value, name=f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, *, name: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, prefix=f"{name}.")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name=name)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config field '{name}' must be a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], v, name=name) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}' must be an object, got {type(value).__name__}")
        return dict(value)
    return _check_scalar(hint, value, name=name)


def _check_scalar(hint: Any, value: Any, *, name: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config field '{name}' must be {hint.__name__}, got bool")
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(
            f"config field '{name}' must be {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


# ------------------------------------------------------------------------------------------ JSON files

# config / tokenizer JSON: the largest real tokenizer.json files are ~35 MB; a bigger "config" is hostile
MAX_JSON_BYTES = 64 * 2**20
# real configs nest a handful of levels; deep nesting only serves to exhaust recursion in later code
MAX_JSON_DEPTH = 64


def read_json(
    path: str | Path,
    *,
    error: type[Exception] = ConfigError,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int | None = MAX_JSON_DEPTH,
) -> Any:
    """The one JSON file reader of the package: a regular file only (never a FIFO or device, which could block
    or never end), at most ``max_bytes``, nested at most ``max_depth`` levels; every failure is ``error``."""
    return parse_json(read_text(path, error=error, max_bytes=max_bytes), where=str(path), error=error,
                      max_depth=max_depth)  # fmt: skip


def read_text(
    path: str | Path, *, error: type[Exception] = ConfigError, max_bytes: int = MAX_JSON_BYTES
) -> str:
    """A regular file's UTF-8 text, refusing anything over ``max_bytes`` before reading it."""
    data = read_bytes(path, error=error, max_bytes=max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc})") from None


def read_bytes(
    path: str | Path, *, error: type[Exception] = ConfigError, max_bytes: int = MAX_JSON_BYTES
) -> bytes:
    """A regular file's bytes (never a FIFO or device), refusing anything over ``max_bytes`` before reading it."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{path.parent}: no {path.name} found") from None
    except OSError as exc:
        raise error(f"{path}: cannot open ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: not a regular file (a directory, FIFO or device); refusing to read it")
        if info.st_size > max_bytes:
            raise error(f"{path}: {info.st_size:,} bytes, more than the {max_bytes:,} allowed for this file")
        data = handle.read(max_bytes + 1)  # the size can change after fstat (a file still being written)
    if len(data) > max_bytes:
        raise error(f"{path}: more than the {max_bytes:,} bytes allowed for this file")
    return data


def check_regular_file(path: str | Path, *, error: type[Exception] = ConfigError, max_bytes: int) -> None:
    """For files another library reads: refuse a FIFO, device or directory, and anything over ``max_bytes``."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: not a regular file (a directory, FIFO or device); refusing to read it")
    if info.st_size > max_bytes:
        raise error(f"{path}: {info.st_size:,} bytes, more than the {max_bytes:,} allowed for this file")


def parse_json(
    text: str, *, where: str, error: type[Exception] = ConfigError, max_depth: int | None = MAX_JSON_DEPTH
) -> Any:
    """``json.loads`` with every failure (syntax, 5,000-digit numbers, nesting) as one ``error`` naming ``where``."""
    try:
        data = json.loads(text)
    except RecursionError:
        limit = max_depth or "about 1,000"
        raise error(f"{where}: JSON nested too deeply (at most {limit} levels)") from None
    except ValueError as exc:  # JSONDecodeError, and int() refusing thousands of digits
        raise error(f"{where} is not valid JSON ({exc})") from None
    if max_depth is not None and json_depth(data, limit=max_depth) > max_depth:
        raise error(f"{where}: JSON nested more than {max_depth} levels deep")
    return data


def json_depth(data: Any, *, limit: int) -> int:
    """Nesting depth of parsed JSON, walked without recursion, stopping once past ``limit``."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest
