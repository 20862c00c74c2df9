"""CPU training throughput: vlmkit's trainer, three stages, a tiny and a small LLaVA-style model, fp32.

Random weights (nothing is downloaded). For each model, thread count and stage (projector; LoRA on every LM
linear, r=4 tiny / r=64 small; full with the tower frozen) it times ``Trainer.train_step`` on a real
LLaVA-format dataset (PNG files, tokenizer, the frozen-tower feature cache, filled by the warm-up steps as a
first epoch would), one process, and prints one JSON object: versions, CPU, threads, samples/s and tokens/s
per stage. Tokens are the non-padding positions the LM processes (image tokens included), as in metrics.jsonl.

* tiny: the test-sized parts (CLIP 2 x 32, Llama 2 x 48), batch 8 of 54 tokens
* small: benchmarks/bench_cpu.py's small-llava-cpu shapes: a CLIP-style 224/16 tower (12 x 384, 22M) and a
  Llama with 8 x 512 layers and a 32064 vocabulary (58M), batch 4 of 262 tokens (about 200 of them image tokens)

    python benchmarks/train_cpu.py                       # ~2 minutes on 2 cores
    python benchmarks/train_cpu.py --out benchmarks/results/train_cpu.json --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llava_bench as lb  # noqa: E402
import train_gpu as tg  # noqa: E402 - the GPU benchmark's builders and timer, reused at CPU sizes

STAGES = ("projector", "lora", "full")


def tiny_setup() -> tg.Setup:
    return replace(tg.dry_setup(), batch=8, warmup=3, steps=40, grad_ckpt=dict.fromkeys(STAGES, False))


def small_setup() -> tg.Setup:
    vision = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                  image_size=224, patch_size=16, projection_dim=384)  # fmt: skip
    language = dict(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)  # fmt: skip
    return tg.Setup(vision=vision, language=language, batch=4, text_words=40, warmup=1, steps=6, device="cpu",
                    precision="fp32", grad_ckpt=dict.fromkeys(STAGES, False), lora_rank=64)  # fmt: skip


def parameters(setup: tg.Setup) -> dict[str, int]:
    model = tg.build_vlm(setup).model
    return {part: sum(p.numel() for p in getattr(model, part).parameters())
            for part in ("vision", "projector", "language_model")}  # fmt: skip


def run_setup(name: str, setup: tg.Setup, *, threads: list[int], work: Path) -> dict[str, Any]:
    """Every stage at every thread count; -> samples/s and tokens/s per thread count and stage."""
    data_dir = work / name
    data_dir.mkdir()
    data = tg.write_dataset(data_dir, setup=setup, records=setup.batch * setup.warmup)
    out: dict[str, Any] = {"batch": setup.batch, "warmup_steps": setup.warmup, "timed_steps": setup.steps,
                           "lora_rank": setup.lora_rank, "parameters": parameters(setup), "by_threads": {}}  # fmt: skip
    for count in threads:
        torch.set_num_threads(count)
        stages: dict[str, Any] = {}
        for stage in STAGES:
            result = tg.vlmkit_stage(stage, setup=setup, data=data, work=work / f"{name}-{count}")
            stages[stage] = {
                "samples_per_s": result["samples_per_s"],
                "tokens_per_s": round(result["samples_per_s"] * result["tokens_per_sample"], 1),
                "step_s": result["step_s"],
                "tokens_per_sample": result["tokens_per_sample"],
            }
        out["by_threads"][str(count)] = stages
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=("tiny", "small"), default=["tiny", "small"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    report: dict[str, Any] = {"versions": tg.versions(), "device": "cpu", "cpu": lb.cpu_name(),
                              "logical_cpus": os.cpu_count(), "threads": args.threads,
                              "precision": "fp32", "processes": 1, "models": {}}  # fmt: skip
    setups = {"tiny": tiny_setup, "small": small_setup}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            report["models"][name] = run_setup(name, setups[name](), threads=args.threads, work=Path(tmp))
    report["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
