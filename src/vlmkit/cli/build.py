"""``vlmkit build``: compose a new model from a local vision tower and a local causal LM, and save it."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

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


def _check_projector(name: str) -> None:
    """Fail on an unknown projector before the (slow) part loading."""
    from vlmkit.models.projectors import PROJECTORS

    if name not in PROJECTORS:
        raise CLIError(f"unknown projector {name!r}; choose one of {', '.join(sorted(PROJECTORS))}")
