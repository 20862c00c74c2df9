"""What composing a model takes besides its parts: ``BuildOptions``, the one declaration of ``vlmkit build``'s
options (the CLI is derived from these fields) and their mapping onto ``VLM.build``'s keyword arguments.
No torch import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmkit.config import RESIZE_MODES, VISION_SELECT, ConfigError, ProjectorConfig, setting

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class BuildOptions:
    """``vlmkit build``: a vision tower + a new projector + a causal LM (Python: ``VLM.build(**opts.build_kwargs())``)."""

    vision: str = setting(
        doc="Vision tower dir: transformers, open_clip or timm (detected; open_clip:DIR / timm:DIR force it); "
        "DIR_A,DIR_B fuses towers (features concatenated per patch)."
    )
    language: str = setting(doc="Local transformers causal-LM dir with tokenizer.")
    projector: str = setting(
        "mlp",
        doc="Projector type: linear, mlp, resampler, cross-attn (reads the prompt) or pixel-shuffle "
        "(any registered name).",
    )
    shuffle_factor: int = setting(2, doc="pixel-shuffle: r (r*r times fewer image tokens).", low=1)
    feature_layer: int = setting(-2, doc="Vision hidden state fed to the projector (-2 = penultimate).")
    select: str = setting("patch", doc="patch drops the CLS token, full keeps it.", choices=VISION_SELECT)
    image_size: int | None = setting(None, doc="Input resolution (default: the tower's own).", low=1)
    resize_mode: str | None = setting(
        None, doc="Preprocessing (default: the tower's own).", choices=RESIZE_MODES
    )
    anyres: bool = setting(False, doc="Tile each image (LLaVA-NeXT AnyRes) at --image-size per tile.")
    max_tiles: int | None = setting(None, doc="AnyRes: every grid of at most N tiles (default 4).", low=1)
    grid_pinpoints: str | None = setting(
        None, doc="AnyRes canvases instead: HxW,HxW,... pixels (tile multiples)."
    )
    max_tile_tokens: int | None = setting(
        None, doc="AnyRes: downsample above N tiles' tokens (OneVision).", low=1
    )
    unpad: bool = setting(True, doc="AnyRes: cut the padding's tokens off.", negation="--no-unpad")
    image_newline: bool = setting(
        True, doc="AnyRes: a learned token after each row.", negation="--no-image-newline"
    )
    multi_image_base_only: bool = setting(False, doc="AnyRes: images of multi-image prompts are not tiled.")
    template: str = setting("auto", doc="Chat template: auto (the tokenizer's, else llava-v1) or a name.")
    system: str | None = setting(None, doc="Override the template's system prompt.")
    dtype: str = setting("auto", doc="Weights dtype; auto keeps the parts' own.", choices=DTYPES)
    seed: int = setting(0, doc="Seed of the new projector's initialisation.")

    def tiling(self) -> dict[str, Any] | None:
        """The AnyRes fields as a tiling section (None without ``anyres``; the options alone are an error)."""
        fields = {"max_tiles": self.max_tiles, "max_tile_tokens": self.max_tile_tokens, "unpad": self.unpad,
                  "image_newline": self.image_newline, "multi_image_base_only": self.multi_image_base_only}  # fmt: skip
        changed = [name for name, default in (("max_tiles", None), ("max_tile_tokens", None), ("unpad", True),
                                              ("image_newline", True), ("multi_image_base_only", False))
                   if fields[name] != default]  # fmt: skip
        if not self.anyres:
            if changed or self.grid_pinpoints is not None:
                first = changed[0] if changed else "grid_pinpoints"
                raise ConfigError("tiling options need anyres", field=first)
            return None
        if self.grid_pinpoints is not None and self.max_tiles is not None:
            raise ConfigError("give max_tiles or grid_pinpoints, not both", field="grid_pinpoints")
        if self.grid_pinpoints is not None:
            return fields | {"grid_pinpoints": pinpoints(self.grid_pinpoints)}
        return fields | {"max_tiles": self.max_tiles or 4}

    def build_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``VLM.build`` these options stand for."""
        return {
            "vision": self.vision,
            "language": self.language,
            "projector": ProjectorConfig(type=self.projector, shuffle_factor=self.shuffle_factor),
            "feature_layer": self.feature_layer,
            "select": self.select,
            "image_size": self.image_size,
            "resize_mode": self.resize_mode,
            "resolution": "anyres" if self.anyres else "fixed",
            "tiling": self.tiling(),
            "template": self.template,
            "system": self.system,
            "dtype": self.dtype,
            "seed": self.seed,
        }


def pinpoints(text: str) -> list[list[int]]:
    """``"336x672,672x336"`` -> [[336, 672], [672, 336]] (height x width in pixels)."""
    pairs = []
    for item in text.split(","):
        height, sep, width = item.strip().lower().partition("x")
        if not (sep and height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
            raise ConfigError(
                f"{item.strip()!r} is not HEIGHTxWIDTH in pixels (e.g. 336x672)", field="grid_pinpoints"
            )
        pairs.append([int(height), int(width)])
    return pairs
