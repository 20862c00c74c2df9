"""The resolution trade-off, measured: fixed 224 / 336 / 672 and AnyRes on a portrait, a landscape and a square image.

For each setting and image: visual tokens, encode time (tower + projector + AnyRes packing on preprocessed pixels),
prefill time (the LM over the whole prompt's embeddings) and whole-answer time (``vlm.generate``, 32 greedy tokens,
caches off), each as a ratio to fixed 336 on the same image, all in one run: every (setting, image) cell is timed
once per round and the rounds repeat, so a shared machine's load spikes fall on all cells alike; medians.

Shapes (random weights, fp32, CPU): a CLIP-style tower with CLIP-L/336's geometry (patch 14, native 336, so
576 patch tokens per 336 view) scaled down in width and depth (6 x 256 instead of 24 x 1024), an mlp2x_gelu
projector and a 6 x 512 Llama (vocab 32000). Position embeddings are interpolated for 224 and 672 as vlmkit does.
AnyRes uses LLaVA-NeXT's grid (336x672, 672x336, 672x672, 1008x336, 336x1008) with unpad and image_newline.
Absolute times depend on the machine; the ratios are what the table in docs/resolution.md reports.

    python benchmarks/resolution.py [--reps 5] [--threads 1] [--out benchmarks/results/resolution.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny.py: the offline tokenizer

import tiny  # noqa: E402
from vlmkit.api import VLM  # noqa: E402
from vlmkit.processing.processor import Sample  # noqa: E402

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
IMAGES = {"portrait": (600, 900), "landscape": (900, 600), "square": (800, 800)}  # (width, height)
SETTINGS = {"fixed-224": 224, "fixed-336": 336, "fixed-672": 672, "anyres-336": "anyres"}
PROMPT = "Describe the image in detail."
NEW_TOKENS = 32


def build_parts(root: Path) -> dict[str, Path]:
    from transformers import AutoModel, AutoModelForCausalLM, CLIPVisionConfig, LlamaConfig

    torch.manual_seed(0)
    tower = AutoModel.from_config(CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                                   num_attention_heads=4, image_size=336, patch_size=14))  # fmt: skip
    tower.save_pretrained(root / "tower")
    tiny._save_image_processor(root / "tower", kind="clip", image_size=336)
    lm = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                                                      num_hidden_layers=6, num_attention_heads=8,
                                                      num_key_value_heads=8, max_position_embeddings=4096))  # fmt: skip
    lm.save_pretrained(root / "lm")
    tiny.save_tokenizer(root / "lm")
    return {"vision": root / "tower", "language": root / "lm"}


def build(parts: dict[str, Path], setting: int | str) -> VLM:
    kwargs = ({"resolution": "anyres", "tiling": {"grid_pinpoints": NEXT_PINPOINTS}, "image_size": 336}
              if setting == "anyres" else {"image_size": setting})  # fmt: skip
    vlm = VLM.build(vision=parts["vision"], language=parts["language"], projector="mlp", seed=0,
                    feature_cache_bytes=0, prefix_cache_bytes=0, **kwargs)  # fmt: skip
    return vlm


def picture(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(sum(size))
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@torch.inference_mode()
def prepare(vlm: VLM, image: Image.Image) -> dict[str, Any]:
    """The three timed calls of one (setting, image) cell, plus its token counts."""
    sample = Sample(messages=vlm.processor.user_prompt(PROMPT, num_images=1), images=[image])
    batch = vlm.processor([sample])
    layouts = batch.get("image_layouts")
    embeds, mask = vlm._prefill_inputs([sample])
    lm = vlm.model.language_model
    answers: list[int] = []

    def answer() -> None:
        answers.append(len(vlm.generate([sample], max_new_tokens=NEW_TOKENS).token_ids[0]))

    calls = {
        "encode_s": lambda: vlm.model.encode_images(batch["pixel_values"], layouts=layouts),
        "prefill_s": lambda: lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False, logits_to_keep=1),
        "answer_s": answer,
    }
    counts = {"visual_tokens": int((batch["input_ids"] == vlm.model.image_token_id).sum()),
              "views": int(batch["pixel_values"].shape[0]), "prompt_tokens": int(batch["input_ids"].shape[1])}  # fmt: skip
    return {"calls": calls, "counts": counts, "answers": answers}


@torch.inference_mode()
def run(cells: dict[tuple[str, str], dict[str, Any]], *, reps: int) -> dict[str, dict[str, dict[str, float]]]:
    """Every cell once per round, rounds repeated: load spikes of a shared machine fall on all cells alike."""
    times: dict[tuple[str, str, str], list[float]] = {}
    for round_ in range(reps + 1):  # round 0 warms up (allocations, oneDNN kernels)
        for key, cell in cells.items():
            for name, call in cell["calls"].items():
                start = time.perf_counter()
                call()
                if round_:
                    times.setdefault((*key, name), []).append(time.perf_counter() - start)
        print(f"round {round_} done", file=sys.stderr, flush=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for (setting, image), cell in cells.items():
        row = dict(cell["counts"]) | {"answer_tokens": min(cell["answers"])}
        row |= {name: round(statistics.median(times[(setting, image, name)]), 4) for name in cell["calls"]}
        results.setdefault(setting, {})[image] = row
    return results


def ratios(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for setting, per_image in results.items():
        out[setting] = {}
        for name, row in per_image.items():
            base = results["fixed-336"][name]
            out[setting][name] = {key: round(row[key] / base[key], 2)
                                  for key in ("visual_tokens", "encode_s", "prefill_s", "answer_s")}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "resolution.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_parts(Path(tmp))
        models = {setting: build(parts, value) for setting, value in SETTINGS.items()}
        cells = {(setting, name): prepare(vlm, picture(size))
                 for setting, vlm in models.items() for name, size in IMAGES.items()}  # fmt: skip
        results = run(cells, reps=args.reps)
    report = {
        "shapes": "CLIP-L/336 geometry (patch 14, 576 tokens per 336 view) at 6 x 256; mlp2x_gelu; Llama 6 x 512, "
        "vocab 32000; random weights, fp32",
        "images": {name: f"{w}x{h}" for name, (w, h) in IMAGES.items()},
        "anyres_grid_pinpoints": NEXT_PINPOINTS,
        "new_tokens": NEW_TOKENS,
        "reps": args.reps,
        "threads": args.threads,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s), shared with other jobs",
        "torch": torch.__version__,
        "seconds": round(time.time() - started, 1),
        "results": results,
        "ratios_to_fixed_336": ratios(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios_to_fixed_336"], indent=2))


if __name__ == "__main__":
    main()
