"""``vlmkit export --model DIR --format hf-llava --out DIR``: write a model in another library's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vlmkit.cli.common import CLIError, DType, DTypeOption, note, quiet_libraries

# mirrors vlmkit.models.convert.export.FORMATS without importing torch here
FORMATS = ("hf-llava", "hf-llava-next", "hf-llava-onevision")


def export(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Model to export: a vlmkit, llava-hf or original LLaVA dir.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory to write (must not exist or be empty).")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="Target layout: hf-llava (transformers LlavaForConditionalGeneration), hf-llava-next or "
            "hf-llava-onevision (AnyRes models: LlavaNext / LlavaOnevision).",
        ),
    ] = "hf-llava",
    vision_tower: Annotated[
        Path | None,
        typer.Option(
            "--vision-tower", help="Local vision tower dir an original LLaVA checkpoint names by hub id."
        ),
    ] = None,
    dtype: DTypeOption = DType.auto,
) -> None:
    """Export a model so another library loads it unchanged (hf-llava: transformers / vLLM)."""
    if format not in FORMATS:
        raise CLIError(f"unknown --format {format!r}; supported: {', '.join(FORMATS)}")
    quiet_libraries()
    from vlmkit.api import VLM
    from vlmkit.models.convert.export import check_export_target, export_hf_llava
    from vlmkit.models.convert.export_anyres import export_hf_anyres

    check_export_target(out)  # before the slow load
    vlm = VLM.from_pretrained(model, dtype=dtype.value, vision_tower=vision_tower)
    if format == "hf-llava":
        written = export_hf_llava(vlm, out=out)
    else:
        written = export_hf_anyres(vlm, out=out, format=format)
    note(f"exported {model} as {format} to {written}")
