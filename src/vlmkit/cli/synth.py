"""``vlmkit synth --out DIR --n N --seed S``: write a synthetic LLaVA-format train/test set (images + JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vlmkit.cli.common import JsonOption, note, write_json


def synth_command(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to write train.json, test.json, images/.")
    ],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of records (train + test).")],
    seed: Annotated[int, typer.Option("--seed", help="Same seed -> identical JSON and images.")] = 0,
    image_size: Annotated[
        int, typer.Option("--image-size", min=32, help="Side of every (square) image in pixels.")
    ] = 64,
    test_fraction: Annotated[
        float,
        typer.Option("--test-fraction", min=0.0, max=0.99, help="Share of records written to test.json."),
    ] = 0.1,
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="Comma-separated tasks (default: all but the opt-in multi_count; see docs/eval.md).",
        ),
    ] = None,
    questions_per_image: Annotated[
        int,
        typer.Option(
            "--questions-per-image",
            min=1,
            help="Up to K questions (records) about each train image, packed into one training sequence; "
            "--n still counts records. The test split always has one question per image.",
        ),
    ] = 1,
    conversations: Annotated[
        bool,
        typer.Option(
            "--conversations",
            help="Multi-turn conversations: 1-3 images arriving in different turns, follow-ups and questions "
            "about an earlier image; --n counts conversations, --tasks picks the single-image questions.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Generate shapes, documents and multi-image questions whose answers come from the scene descriptions."""
    from vlmkit.data.synth import generate_dataset

    names = [name.strip() for name in tasks.split(",") if name.strip()] if tasks else None
    counts = generate_dataset(out, n=n, seed=seed, image_size=image_size, test_fraction=test_fraction,
                              tasks=names, questions_per_image=questions_per_image,
                              conversations=conversations)  # fmt: skip
    if as_json:
        write_json({"out": str(out), "seed": seed, "image_size": image_size,
                    "questions_per_image": questions_per_image} | counts)  # fmt: skip
        return
    train, test = counts["train"], counts["test"]
    note(f"wrote {train['records']} train + {test['records']} test records "
         f"({train['images'] + test['images']} images, {len(train['tasks'])} tasks) to {out}")  # fmt: skip
