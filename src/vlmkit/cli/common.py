"""Shared pieces of the command line: option types, model/image loading, output and error reporting.

Every user error (bad path, bad option value, unreadable image or model dir, placeholder mismatch) ends
as exactly one ``error: <message>`` line on stderr and exit code 2; anything else is an internal error
(exit 1, traceback only with ``--debug`` or ``VLMKIT_DEBUG=1``). Nothing here imports torch at module
level, so ``vlmkit --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL.Image import Image

    from vlmkit.api import VLM

EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
DEBUG_ENV = "VLMKIT_DEBUG"


class CLIError(ValueError):
    """A user error detected by the command line itself (reported like any other user error)."""


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# ------------------------------------------------------------------------------------------ option types

ModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        envvar="VLMKIT_MODEL",
        help="A model directory (default: the small model bundled with vlmkit, see README).",
        show_default=False,
    ),
]
VisionTowerOption = Annotated[
    Path | None,
    typer.Option(
        "--vision-tower", help="Local vision tower dir that an original LLaVA checkpoint names by hub id."
    ),
]
ImageFolderOption = Annotated[
    Path | None,
    typer.Option(
        "--image-folder", help="Image paths are relative to this (default: the data file's folder)."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Write machine-readable JSON to stdout.")]
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="Torch device to run on, e.g. cpu or cuda (default: cpu).")
]
DTypeOption = Annotated[DType, typer.Option("--dtype", help="Weights dtype; auto keeps the stored one.")]


class Quantize(str, Enum):
    int8 = "int8"
    int4 = "int4"
    nf4 = "nf4"


QuantizeOption = Annotated[
    Quantize | None,
    typer.Option(
        "--quantize",
        help="Quantize the language model's linear layers: int8 (CPU: dynamic int8, fastest), int4 (smallest), "
        "nf4 (CUDA + bitsandbytes). See docs/quantization.md.",
        show_default=False,
    ),
]
MaxNewTokens = Annotated[
    int | None, typer.Option("--max-new-tokens", min=1, help="Most tokens to generate (default 128).")
]
Temperature = Annotated[
    float | None, typer.Option("--temperature", min=0.0, help="0 = greedy (default); > 0 samples.")
]
TopP = Annotated[
    float | None, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass, (0, 1].")
]
TopK = Annotated[
    int | None, typer.Option("--top-k", min=0, help="Sample from the k likeliest tokens; 0 = off.")
]
NumBeams = Annotated[
    int | None, typer.Option("--num-beams", min=1, help="Beam search width (with temperature 0).")
]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this string (repeatable).")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for reproducible sampling.")]


def generation_kwargs(
    *,
    max_new_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    num_beams: int | None,
    stop: list[str] | None,
    seed: int | None,
) -> dict[str, Any]:
    """The generation keyword arguments the user set, validated now so a bad value fails before model loading."""
    from vlmkit.generation.config import GenerationConfig

    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
             "num_beams": num_beams, "stop": tuple(stop) if stop else None, "seed": seed}  # fmt: skip
    kwargs = {name: value for name, value in given.items() if value is not None}
    GenerationConfig.from_kwargs(**kwargs)  # raises ValueError naming the bad argument
    return kwargs


# ------------------------------------------------------------------------------------------------ loading


def quiet_libraries() -> None:
    """Silence transformers/hub logging and progress bars: the CLI's stdout and stderr are for the user."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # avoids the fork warning of tokenizers
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def load_model(
    path: Path | None,
    *,
    dtype: DType = DType.auto,
    device: str | None = None,
    vision_tower: Path | None = None,
    quantize: Quantize | None = None,
) -> VLM:
    """``VLM.from_pretrained`` with the libraries quietened; errors surface as ModelDirError/ConfigError."""
    quiet_libraries()
    from vlmkit.api import VLM

    if device is not None:
        check_device(device)
    method = quantize.value if quantize is not None else None
    return VLM.from_pretrained(
        path, dtype=dtype.value, device=device, vision_tower=vision_tower, quantize=method
    )


def check_device(device: str) -> None:
    """A clear user error for a malformed or unavailable device (torch itself asserts deep inside ``.to``)."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise CLIError(f"invalid --device {device!r}; use e.g. cpu, cuda or cuda:1") from None
    available: dict[str, Callable[[], bool]] = {
        "cuda": torch.cuda.is_available,
        "mps": torch.backends.mps.is_available,
    }
    if kind in available and not available[kind]():
        raise CLIError(f"--device {device!r} requested but {kind} is not available in this torch install")


def read_image(source: str) -> Image:
    """Load one image argument now (``-`` = stdin), so a bad file fails before the slow model load."""
    from vlmkit.processing.image import load_image

    if source == "-":
        return load_image(sys.stdin.buffer.read())
    return load_image(Path(source).expanduser())


# ------------------------------------------------------------------------------------------------- output


def write_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def note(message: str) -> None:
    """Progress/info for humans: stderr, so stdout stays clean for answers and JSON."""
    typer.echo(message, err=True)


def one_line(message: str) -> str:
    """Collapse a multi-line message so every error is exactly one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip()) or "unknown error"


def print_error(message: str) -> None:
    typer.echo(f"error: {one_line(message)}", err=True)


# ------------------------------------------------------------------------------------------------- errors


_debug_flag: list[bool] = [False]  # set by the global --debug option for the current invocation


def set_debug(value: bool) -> None:
    _debug_flag[0] = value


def debug_enabled() -> bool:
    return _debug_flag[0] or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def is_user_error(exc: BaseException) -> bool:
    # ModelDirError, ConfigError, DataError, ImageLoadError and generation-argument errors are all ValueErrors;
    # OSError covers unreadable/unwritable paths that the libraries report themselves. Bad files that a library
    # reports in its own terms are the user's too: a corrupt safetensors file (SafetensorError), JSON nested
    # past the recursion limit (the loaders refuse it first; this covers any other reader).
    if isinstance(exc, ValueError | OSError):
        return True
    if type(exc).__name__ == "SafetensorError":  # safetensors' Rust error; importing it here would be slow
        return True
    return isinstance(exc, RecursionError) and "JSON" in str(exc)


def report_exception(exc: BaseException, *, debug: bool) -> int:
    """Print one ``error:`` line (plus a traceback for internal errors in debug mode); return the exit code."""
    if is_user_error(exc):
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        print_error(str(exc) or type(exc).__name__)
        return EXIT_USER_ERROR
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
        print_error(f"internal error: {type(exc).__name__}: {exc}")
    else:
        print_error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
    return EXIT_INTERNAL_ERROR
