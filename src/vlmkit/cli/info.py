"""``vlmkit info``: what a model is made of (parts, image tokens, template, parameter counts)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vlmkit.cli.common import (
    CLIError,
    JsonOption,
    ModelOption,
    QuantizeOption,
    VisionTowerOption,
    load_model,
    write_json,
)

_ROWS = (
    ("vision", "vision tower"),
    ("projector", "projector"),
    ("language", "language model"),
    ("image_size", "image size"),
    ("resolution", "resolution"),
    ("image_tokens", "image tokens"),
    ("template", "template"),
    ("dtype", "dtype"),
)


def info_command(
    model: ModelOption = None,
    as_json: JsonOption = False,
    vision_tower: VisionTowerOption = None,
    quantize: QuantizeOption = None,
    image_size: Annotated[
        str | None,
        typer.Option("--image-size", help="WIDTHxHEIGHT: that image's tokens (AnyRes default: the most)."),
    ] = None,
) -> None:
    """Show a model's parts, image tokens per image, chat template, parameter counts and bytes per part."""
    size = _size(image_size) if image_size is not None else None
    vlm = load_model(model, vision_tower=vision_tower, quantize=quantize)
    data = {"model": str(model) if model else None} | vlm.info(image_size=size)
    if as_json:
        write_json(data)
    else:
        _print_table(data)


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise CLIError(f"--image-size {text!r} is not WIDTHxHEIGHT in pixels (e.g. 1024x768)")
    return int(width), int(height)


def _print_table(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"vlmkit model {data['model'] or '(default)'}", show_header=False, title_justify="left"
    )
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, label in _ROWS:
        table.add_row(label, str(data.get(key)))
    for part, count in data["parameters"].items():
        table.add_row(f"parameters: {part}", f"{count:,}")
    for part, size in data["bytes"].items():  # quantized codes and scales included
        table.add_row(f"bytes: {part}", f"{size:,}")
    if data.get("quantization"):
        table.add_row("quantization", data["quantization"]["scheme"])
    table.add_row("decode", "{backend} ({reason})".format(**data["decode"]))  # batch 1, greedy
    Console(highlight=False).print(table)
