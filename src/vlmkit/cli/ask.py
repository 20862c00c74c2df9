"""``vlmkit ask IMAGE... --prompt TEXT``: one question about zero or more images, answered on stdout."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from vlmkit.cli.common import (
    DeviceOption,
    DType,
    DTypeOption,
    JsonOption,
    MaxNewTokens,
    ModelOption,
    NumBeams,
    QuantizeOption,
    Seed,
    Stop,
    Temperature,
    TopK,
    TopP,
    VisionTowerOption,
    generation_kwargs,
    load_model,
    read_image,
    write_json,
)


def ask_command(
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="The question; '<image>' marks where each image goes.")
    ],
    images: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="IMAGE",
            help="Image files (PNG, JPEG, ...); '-' reads one from stdin.",
            show_default=False,
        ),
    ] = None,
    model: ModelOption = None,
    max_new_tokens: MaxNewTokens = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    num_beams: NumBeams = None,
    stop: Stop = None,
    seed: Seed = None,
    stream: Annotated[
        bool, typer.Option("--stream/--no-stream", help="Print the answer as it is generated.")
    ] = False,
    as_json: JsonOption = False,
    dtype: DTypeOption = DType.auto,
    device: DeviceOption = None,
    vision_tower: VisionTowerOption = None,
    quantize: QuantizeOption = None,
) -> None:
    """Ask a question about images. Images without '<image>' placeholders go before the prompt."""
    gen = generation_kwargs(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            num_beams=num_beams, stop=stop, seed=seed)  # fmt: skip
    sources = images or []
    loaded = [read_image(source) for source in sources]
    vlm = load_model(model, dtype=dtype, device=device, vision_tower=vision_tower, quantize=quantize)
    if stream and not as_json:  # JSON needs the whole answer, so --json wins over --stream
        _print_stream(vlm.stream(prompt, images=loaded, **gen))
        return
    answer = vlm.ask(prompt, images=loaded, **gen)
    if as_json:
        write_json({"answer": answer, "prompt": prompt, "images": sources,
                    "model": str(model) if model else None, "generation": gen})  # fmt: skip
    else:
        typer.echo(answer)


def _print_stream(pieces: Iterator[str]) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
