"""Does resolution buy accuracy? Small print that a low-resolution model cannot read (issue 23, item 5).

Synthetic documents: a 128 x 128 white page with a large header bar and three lines of 4-digit codes in a
3 x 5 pixel font (1 px strokes). The question names a line ("What is the code on line 2?"), the answer is
that line's code. Three tiny models are trained from scratch with the same recipe and the same budget in
optimizer steps (not wall time: the machine is shared), differing only in how the page reaches the tower:

- ``low``: fixed 64 px input, the page downsampled 2x (a 3 px wide digit becomes 1.5 px of grey);
- ``anyres``: the same 64 px tower, AnyRes with at most 4 tiles: a 2x2 grid of tiles at the page's full
  resolution plus the 64 px base view;
- ``high``: fixed 128 px input (the tower at the page's own size).

Each model is vlmkit's own parts: a byte-level BPE tokenizer (one token per digit) trained on the questions,
a CLIP-style tower with a convolutional stem and a Llama LM made with transformers' config classes, composed
with ``VLM.build`` and trained (everything, tower included) with ``vlmkit.training.session.train``. Exact
match and per-digit accuracy are read from greedy answers on a held-out split drawn from a different seed.

    python benchmarks/resolution_accuracy.py            # the measurement (600 steps per setting)
    python benchmarks/resolution_accuracy.py --dry-run  # seconds: tiny data and steps, same code path
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image, ImageDraw

import vlmkit
from vlmkit.api import VLM
from vlmkit.training.config import StageConfig, TrainConfig
from vlmkit.training.recipes.tiny_scratch import Recipe, save_parts, train_tokenizer
from vlmkit.training.session import train

RESULTS = Path(__file__).parent / "results" / "resolution_accuracy.json"
PAGE = 128  # page side in pixels
TILE = 64  # the tower's input side for "low" and "anyres"
PATCH = 8
LINES = 3
CODE_DIGITS = 4
LINE_Y = (44, 70, 96)  # top of each code line
CODE_X = 24
# a 3 x 5 pixel font: one string of 15 bits per digit, row by row
FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111",
}  # fmt: skip
SETTINGS = {
    "low": {"image_size": TILE, "resolution": "fixed"},
    "anyres": {"image_size": TILE, "resolution": "anyres", "tiling": {"max_tiles": 4}},
    "high": {"image_size": PAGE, "resolution": "fixed"},
}
FULL = {"train": 4000, "test": 300, "steps": 600, "batch": 16, "lr": 2e-3}
DRY = {"train": 24, "test": 6, "steps": 2, "batch": 4, "lr": 2e-3}


# ------------------------------------------------------------------------------------------------- data


def draw_code(draw: ImageDraw.ImageDraw, *, code: str, x: int, y: int) -> None:
    """``code`` in the 3 x 5 font, 1 px strokes, one blank column between digits."""
    for i, digit in enumerate(code):
        bits = FONT[digit]
        for k, bit in enumerate(bits):
            if bit == "1":
                draw.point((x + 4 * i + k % 3, y + k // 3), fill=0)


def read_code(page: Image.Image, *, x: int, y: int, digits: int = CODE_DIGITS) -> str:
    """The inverse of ``draw_code`` on a rendered page (the test's oracle that the answers are what is drawn)."""
    glyphs = {bits: digit for digit, bits in FONT.items()}
    grey = page.convert("L")
    out = ""
    for i in range(digits):
        bits = "".join(
            "1" if grey.getpixel((x + 4 * i + k % 3, y + k // 3)) < 128 else "0" for k in range(15)
        )
        out += glyphs.get(bits, "?")
    return out


def render_page(*, codes: list[str], rng: random.Random) -> Image.Image:
    """A page: a header bar and a logo block (large, legible at any resolution, carrying no answer), a label
    tick before each line and the lines' codes in small print."""
    page = Image.new("RGB", (PAGE, PAGE), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    draw.rectangle((8, 8, PAGE - 9, 22), fill=(40, 40, 120))
    side = rng.randrange(8, 14)
    draw.rectangle((PAGE - 12 - side, 28, PAGE - 12, 28 + side), fill=(150, 40, 40))
    for code, y in zip(codes, LINE_Y, strict=True):
        draw.rectangle((12, y + 1, 16, y + 3), fill=(90, 90, 90))
        draw_code(draw, code=code, x=CODE_X, y=y)
    return page


def make_split(folder: Path, *, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` pages (PNG in ``folder``) and one question each, LLaVA format; writes ``folder/data.json``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        codes = ["".join(rng.choice("0123456789") for _ in range(CODE_DIGITS)) for _ in range(LINES)]
        line = rng.randrange(LINES)
        render_page(codes=codes, rng=rng).save(folder / f"{i}.png")
        records.append({"id": f"{seed}-{i}", "image": f"{i}.png", "line": line + 1, "conversations": [
            {"from": "human", "value": f"<image>\nWhat is the code on line {line + 1}?"},
            {"from": "gpt", "value": codes[line]}]})  # fmt: skip
    (folder / "data.json").write_text(json.dumps(records))
    return records


# ------------------------------------------------------------------------------------------------ model


def build_vlm(*, setting: str, records: list[dict[str, Any]], root: Path, seed: int) -> VLM:
    """A new tokenizer, tower (conv stem, 2 layers x 64) and LM (2 layers x 96) composed by ``VLM.build``;
    the same sizes and seed in every setting, only the tower's input size and the tiling differ."""
    spec = SETTINGS[setting]
    recipe = Recipe(name="resolution-accuracy", image_size=spec["image_size"], patch_size=PATCH, vocab_size=300,
                    conv_stem=[16, 32, 64],
                    vision={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4},
                    language={"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 4,
                              "max_position_embeddings": 512})  # fmt: skip
    texts = [turn["value"].replace("<image>", " ") for r in records for turn in r["conversations"]]
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(texts, vocab_size=recipe.vocab_size)
    vision_dir, language_dir = save_parts(recipe=recipe, tokenizer=tokenizer, root=root / setting)
    return VLM.build(vision=vision_dir, language=language_dir, projector="mlp", feature_layer=-1,
                     conv_stem=tuple(recipe.conv_stem), template="chatml", seed=seed,
                     resolution=spec["resolution"], tiling=spec.get("tiling"))  # fmt: skip


def train_setting(*, vlm: VLM, data: Path, out: Path, budget: dict[str, Any], seed: int) -> dict[str, Any]:
    """The one recipe: everything trains (tower included), AdamW, cosine, a fixed number of steps."""
    stage = StageConfig(stage="full", freeze_vision=False, lr=budget["lr"], lr_scales={"vision": 1.0})
    config = TrainConfig(data=data / "data.json", out=out, stage=stage, batch_size=budget["batch"],
                         max_steps=budget["steps"], warmup_ratio=0.05, weight_decay=0.0, seed=seed, save_every=0,
                         keep_last=1, log_every=10, progress=False, plot=False, cpu=True)  # fmt: skip
    start = time.perf_counter()
    result = train(vlm, config)
    return {
        "steps": result.steps,
        "final_loss": result.loss,
        "train_seconds": round(time.perf_counter() - start),
    }


def evaluate(*, vlm: VLM, records: list[dict[str, Any]], folder: Path, batch: int = 16) -> dict[str, float]:
    """Greedy answers on held-out pages: exact match and the share of digits right in their place."""
    vlm.model.eval()
    exact = digits = 0
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        prompts = [r["conversations"][0]["value"] for r in chunk]
        images = [[Image.open(folder / r["image"]).convert("RGB")] for r in chunk]
        answers = vlm.ask_batch(prompts, images=images, max_new_tokens=8)
        for record, answer in zip(chunk, answers, strict=True):
            truth, got = record["conversations"][1]["value"], answer.strip()
            exact += got == truth
            digits += sum(a == b for a, b in zip(got.ljust(CODE_DIGITS), truth, strict=False))
    n = len(records)
    return {"exact_match": round(exact / n, 4), "digit_accuracy": round(digits / (n * CODE_DIGITS), 4)}


def visual_tokens(vlm: VLM) -> int:
    return int(vlm.image_token_count(width=PAGE, height=PAGE))


# ------------------------------------------------------------------------------------------------- main


def run(*, settings: list[str], budget: dict[str, Any], work: Path, seed: int) -> dict[str, Any]:
    train_records = make_split(work / "train", n=budget["train"], seed=seed)
    test_records = make_split(work / "test", n=budget["test"], seed=seed + 1)
    rows = {}
    for setting in settings:
        vlm = build_vlm(setting=setting, records=train_records, root=work / "parts", seed=seed)
        stats = train_setting(
            vlm=vlm, data=work / "train", out=work / "runs" / setting, budget=budget, seed=seed
        )
        trained = VLM.from_pretrained(work / "runs" / setting)
        rows[setting] = {"visual_tokens": visual_tokens(trained), "tower_input": SETTINGS[setting]["image_size"],
                         **stats, **evaluate(vlm=trained, records=test_records, folder=work / "test")}  # fmt: skip
        print(f"{setting}: {rows[setting]}", file=sys.stderr, flush=True)
    return rows


def report(*, rows: dict[str, Any], budget: dict[str, Any], seed: int, dry_run: bool) -> dict[str, Any]:
    return {
        "benchmark": "resolution_accuracy",
        "dry_run": dry_run,
        "versions": {
            "vlmkit": vlmkit.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "device": f"cpu ({platform.processor() or platform.machine()}), 1 thread, machine shared with other jobs",
        "task": {
            "page": [PAGE, PAGE],
            "lines": LINES,
            "code_digits": CODE_DIGITS,
            "font": "3x5 px, 1 px strokes",
            "train_pages": budget["train"],
            "test_pages": budget["test"],
            "train_seed": seed,
            "test_seed": seed + 1,
        },
        "recipe": {
            "stage": "full (tower, projector, LM)",
            "steps": budget["steps"],
            "batch_size": budget["batch"],
            "lr": budget["lr"],
            "schedule": "cosine, 5% warmup",
            "tower": "CLIP 2x64, conv stem 16-32-64",
            "patch": PATCH,
            "lm": "Llama 2x96",
        },
        "chance": {"exact_match": 10.0**-CODE_DIGITS, "digit_accuracy": 0.1},
        "settings": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny data and 2 steps: checks the code path")
    parser.add_argument("--settings", default="low,anyres,high", help="comma-separated: low, anyres, high")
    parser.add_argument("--steps", type=int, help="optimizer steps per setting (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="combine the results of runs of single settings"
    )
    args = parser.parse_args(argv)
    if args.merge:
        return write(merge(args.merge), out=args.out)
    settings = args.settings.split(",")
    if unknown := set(settings) - set(SETTINGS):
        parser.error(f"unknown setting {sorted(unknown)[0]!r}; known: {', '.join(SETTINGS)}")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    budget = dict(DRY if args.dry_run else FULL) | ({"steps": args.steps} if args.steps else {})
    with tempfile.TemporaryDirectory(prefix="vlmkit-resacc-") as tmp:
        rows = run(settings=settings, budget=budget, work=Path(tmp), seed=args.seed)
    return write(report(rows=rows, budget=budget, seed=args.seed, dry_run=args.dry_run), out=args.out)


def merge(paths: list[Path]) -> dict[str, Any]:
    """One result from runs of one setting each (run side by side); their task and recipe must agree."""
    parts = [json.loads(path.read_text()) for path in paths]
    for path, part in zip(paths, parts, strict=True):
        if (part["task"], part["recipe"]) != (parts[0]["task"], parts[0]["recipe"]):
            raise SystemExit(f"error: {path} was run with another task or recipe than {paths[0]}")
    return parts[0] | {"settings": {k: v for part in parts for k, v in part["settings"].items()}}


def write(result: dict[str, Any], *, out: Path) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
