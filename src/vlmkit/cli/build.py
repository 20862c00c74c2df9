"""``vlmkit build``: compose a new model from a local vision tower and a local causal LM, and save it."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from vlmkit.cli.common import CLIError, DType, note, quiet_libraries
from vlmkit.config import ProjectorConfig


class Select(str, Enum):
    patch = "patch"
    full = "full"


class ResizeMode(str, Enum):
    resize = "resize"
    pad = "pad"
    crop = "crop"


def build_command(
    vision: Annotated[
        str,
        typer.Option("--vision", help="Vision tower dir: transformers, open_clip or timm (detected; open_clip:DIR / "
                     "timm:DIR force it); DIR_A,DIR_B fuses towers (features concatenated per patch)."),
    ],
    language: Annotated[
        str, typer.Option("--language", help="Local transformers causal-LM dir with tokenizer.")
    ],
    projector: Annotated[
        str,
        typer.Option("--projector", help="Projector type: linear, mlp, resampler, cross-attn (reads the prompt) "
                     "or pixel-shuffle (any registered name)."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the model to.")],
    shuffle_factor: Annotated[
        int, typer.Option("--shuffle-factor", min=1, help="pixel-shuffle: r (r*r times fewer image tokens).")
    ] = 2,
    feature_layer: Annotated[
        int,
        typer.Option("--feature-layer", help="Vision hidden state fed to the projector (-2 = penultimate)."),
    ] = -2,
    select: Annotated[
        Select, typer.Option("--select", help="patch drops the CLS token, full keeps it.")
    ] = Select.patch,
    image_size: Annotated[
        int | None, typer.Option("--image-size", min=1, help="Input resolution (default: the tower's own).")
    ] = None,
    resize_mode: Annotated[
        ResizeMode | None, typer.Option("--resize-mode", help="Preprocessing (default: the tower's own).")
    ] = None,
    anyres: Annotated[
        bool, typer.Option("--anyres", help="Tile each image (LLaVA-NeXT AnyRes) at --image-size per tile.")
    ] = False,
    max_tiles: Annotated[
        int | None, typer.Option("--max-tiles", min=1, help="AnyRes: every grid of at most N tiles (default 4).")
    ] = None,
    grid_pinpoints: Annotated[
        str | None,
        typer.Option("--grid-pinpoints", help="AnyRes canvases instead: HxW,HxW,... pixels (tile multiples)."),
    ] = None,
    max_tile_tokens: Annotated[
        int | None,
        typer.Option("--max-tile-tokens", min=1, help="AnyRes: downsample above N tiles' tokens (OneVision)."),
    ] = None,
    no_unpad: Annotated[bool, typer.Option("--no-unpad", help="AnyRes: keep the padding's tokens.")] = False,
    no_image_newline: Annotated[
        bool, typer.Option("--no-image-newline", help="AnyRes: no learned token after each row.")
    ] = False,
    multi_image_base_only: Annotated[
        bool,
        typer.Option("--multi-image-base-only", help="AnyRes: images of multi-image prompts are not tiled."),
    ] = False,
    template: Annotated[
        str,
        typer.Option("--template", help="Chat template: auto (the tokenizer's, else llava-v1) or a name."),
    ] = "auto",
    system: Annotated[
        str | None, typer.Option("--system", help="Override the template's system prompt.")
    ] = None,
    dtype: Annotated[
        DType, typer.Option("--dtype", help="Weights dtype; auto keeps the parts' own.")
    ] = DType.auto,
) -> None:
    """Compose vision tower + new projector + language model and save it as a vlmkit model dir."""
    _check_projector(projector)
    tiling = _tiling(anyres=anyres, max_tiles=max_tiles, grid_pinpoints=grid_pinpoints,
                     max_tile_tokens=max_tile_tokens, unpad=not no_unpad, image_newline=not no_image_newline,
                     multi_image_base_only=multi_image_base_only)  # fmt: skip
    quiet_libraries()
    from vlmkit.api import VLM

    vlm = VLM.build(
        vision=vision,
        language=language,
        projector=ProjectorConfig(type=projector, shuffle_factor=shuffle_factor),
        feature_layer=feature_layer,
        select=select.value,
        image_size=image_size,
        resize_mode=resize_mode.value if resize_mode else None,
        resolution="anyres" if anyres else "fixed",
        tiling=tiling,
        template=template,
        system=system,
        dtype=dtype.value,
    )
    saved = vlm.save_pretrained(out)
    info = vlm.info()
    note(
        f"saved {info['vision']} + {info['projector']} projector + {info['language']} to {saved} "
        f"({info['image_tokens']} image tokens, {info['parameters']['total']:,} parameters)"
    )


def _tiling(*, anyres: bool, grid_pinpoints: str | None, **fields: Any) -> dict[str, Any] | None:
    """The AnyRes options as tiling fields (None without --anyres; the options alone are an error)."""
    changed = grid_pinpoints is not None or any(
        value != default for value, default in zip(fields.values(), (None, None, True, True, False), strict=True)
    )
    if not anyres:
        if changed:
            raise CLIError("tiling options (--max-tiles, --grid-pinpoints, ...) need --anyres")
        return None
    if grid_pinpoints is not None and fields["max_tiles"] is not None:
        raise CLIError("give --max-tiles or --grid-pinpoints, not both")
    if grid_pinpoints is not None:
        return fields | {"grid_pinpoints": _pinpoints(grid_pinpoints)}
    return fields | {"max_tiles": fields["max_tiles"] or 4}


def _pinpoints(text: str) -> list[list[int]]:
    pairs = []
    for item in text.split(","):
        height, sep, width = item.strip().lower().partition("x")
        if not (sep and height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
            raise CLIError(f"--grid-pinpoints: {item.strip()!r} is not HEIGHTxWIDTH in pixels (e.g. 336x672)")
        pairs.append([int(height), int(width)])
    return pairs


def _check_projector(name: str) -> None:
    """Fail on an unknown projector before the (slow) part loading."""
    from vlmkit.models.projectors import PROJECTORS

    if name not in PROJECTORS:
        raise CLIError(f"unknown projector {name!r}; choose one of {', '.join(sorted(PROJECTORS))}")
