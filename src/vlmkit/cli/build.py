"""``vlmkit build``: compose a new model from a local vision tower and a local causal LM, and save it.

Its options are ``BuildOptions``' fields (``models/options.py``), derived by ``cli/schema.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vlmkit.cli.common import CLIError, note, quiet_libraries
from vlmkit.cli.schema import (
    ConfigFileOption,
    derived_command,
    derived_fields,
    flag_message,
    merge_config_file,
    option,
    values_of,
)
from vlmkit.config import ConfigError
from vlmkit.models.options import BuildOptions

FIELDS = derived_fields(BuildOptions)

OutOption = Annotated[Path, typer.Option("--out", help="Directory to write the model to.")]


def _build(*, ctx: typer.Context, out: Path, config: Path | None, **values: object) -> None:
    """Compose vision tower + new projector + language model and save it as a vlmkit model dir."""
    try:
        values = merge_config_file(values, path=config, fields=FIELDS, ctx=ctx)
        options = BuildOptions(**values_of(FIELDS, values))
        kwargs = options.build_kwargs()
    except ConfigError as exc:
        raise CLIError(flag_message(exc, FIELDS)) from None
    _check_projector(options.projector)
    quiet_libraries()
    from vlmkit.api import VLM

    vlm = VLM.build(**kwargs)
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


build_command = derived_command(
    _build,
    fields=FIELDS,
    extra=[option("ctx", typer.Context), option("out", OutOption), option("config", ConfigFileOption, None)],
    doc=_build.__doc__ or "",
)
