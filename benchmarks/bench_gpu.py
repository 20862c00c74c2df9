"""GPU benchmark: vlmkit vs transformers' LlavaForConditionalGeneration.generate at LLaVA-1.5-7B shapes.

CLIP ViT-L/14-336 + mlp2x_gelu projector + a Llama-2-7B-shaped LM, random weights, bf16, one GPU; saved as a
llava-hf directory (in /dev/shm when it exists) and loaded by both libraries. vlmkit runs with ``compile=True``
(static KV cache, decode step under ``torch.compile(mode="reduce-overhead")``: CUDA graphs). Stages run in order
of importance and are skipped (and reported as such) once ``--budget-s`` is spent, so the whole run stays under
5 minutes on an H100. Prints one JSON document and writes ``benchmarks/results/gpu.json``.

    python benchmarks/bench_gpu.py [--budget-s 270] [--out PATH]
    python benchmarks/bench_gpu.py --dry-run      # tiny shapes on CPU, eager: checks the script end to end
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llava_bench as lb  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gpu.json"
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14, "projection_dim": 768}  # fmt: skip
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}  # fmt: skip


def gpu_spec(*, dry_run: bool) -> lb.Spec:
    if dry_run:  # same code paths, tiny shapes, CPU; eager (the compiled step is covered by the test suite)
        return lb.Spec(
            name="dry-run",
            device="cpu",
            dtype="float32",
            vision={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
                "projection_dim": 32,
            },  # fmt: skip
            text={
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "max_position_embeddings": 512,
            },  # fmt: skip
            max_new_tokens=4,
            batches=(1, 2),
            encode_batch=2,
            repeats=1,
            compile=False,
            image_size_px=(64, 48),
        )
    return lb.Spec(
        name="llava-1.5-7b-shapes",
        device="cuda",
        dtype="bfloat16",
        vision=CLIP_L_336,
        text=LLAMA2_7B,
        max_new_tokens=64,
        batches=(1, 32, 8),  # most important first: 8 is the first to go when time runs short
        encode_batch=64,
        repeats=3,
        compile=True,
    )


class Budget:
    """Wall-clock guard: a stage runs only while time is left, else it is recorded as skipped."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any], *, needs_s: float = 0.0) -> Any:
        left = self.seconds - (time.perf_counter() - self.start)
        if left < needs_s:
            return {"skipped": f"time budget: {left:.0f} s left, stage needs ~{needs_s:.0f} s"}
        began = time.perf_counter()
        result = fn()
        self.stages[name] = time.perf_counter() - began
        return result


def scratch_dir() -> str | None:
    """RAM-backed when possible: a 14 GB checkpoint is written and read twice."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny model on CPU; writes nothing unless --out"
    )
    parser.add_argument("--budget-s", type=float, default=270.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device; use --dry-run to check the script on CPU")
    spec = gpu_spec(dry_run=args.dry_run)
    out = args.out if args.out is not None or args.dry_run else RESULTS
    budget = Budget(args.budget_s)
    with tempfile.TemporaryDirectory(
        prefix="vlmkit-bench-", dir=None if args.dry_run else scratch_dir()
    ) as tmp:
        directory = budget.run("build_checkpoint", lambda: lb.build_checkpoint(Path(tmp) / "llava", spec))
        vlm, hf = budget.run("load_both", lambda: lb.load_both(directory, spec))
    images = lb.make_images(max(max(spec.batches), spec.encode_batch), size=spec.image_size_px, seed=0)
    needs = 0.0 if args.dry_run else 40.0  # rough seconds per stage incl. one compile
    single = budget.run("single", lambda: lb.measure_single(vlm, hf, spec, images), needs_s=needs)
    batches: dict[str, Any] = {}
    for b in spec.batches[:2]:
        batches[str(b)] = budget.run(f"batch{b}", lambda b=b: lb.measure_batch(vlm, hf, spec, images, batch=b),
                                     needs_s=needs)  # fmt: skip
    encode = budget.run("encode", lambda: lb.measure_encode(vlm, hf, spec, images), needs_s=needs / 4)
    for b in spec.batches[2:]:
        batches[str(b)] = budget.run(f"batch{b}", lambda b=b: lb.measure_batch(vlm, hf, spec, images, batch=b),
                                     needs_s=needs)  # fmt: skip
    result = {
        "benchmark": "bench_gpu",
        "dry_run": args.dry_run,
        "environment": lb.environment(spec),
        "model": lb.model_summary(vlm, hf, spec),
        "single": single,
        "decode_by_batch": batches,
        "encode": encode,
        "ratios": ratios(single, batches, encode),
        "targets": targets(single, batches, encode),
        "stage_s": budget.stages,
        "wall_s": time.perf_counter() - budget.start,
    }
    lb.emit(result, out=out)
    return result


def _ok(part: Any) -> bool:
    return isinstance(part, dict) and "skipped" not in part


def ratios(single: Any, batches: dict[str, Any], encode: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    if _ok(single):
        ttft, answer = single["ttft_s"], single["answer_s"]
        out |= {"ttft_cold_over_transformers": ttft["vlmkit_cold"] / ttft["transformers"],
                "ttft_repeated_over_transformers": ttft["vlmkit_repeated_image"] / ttft["transformers"],
                "ttft_repeated_over_cold": ttft["vlmkit_repeated_image"] / ttft["vlmkit_cold"],
                "ask_cold_over_transformers": answer["vlmkit_cold"] / answer["transformers"],
                "ask_repeated_image_over_transformers": answer["vlmkit_repeated_image"] / answer["transformers"],
                "short_ask_repeated_image_over_transformers":
                    single["short_answer_s"]["vlmkit_repeated_image"] / single["short_answer_s"]["transformers"]}  # fmt: skip
    out |= {f"decode_batch{b}_over_transformers": r["ratio"] for b, r in batches.items() if _ok(r)}
    if _ok(encode):
        out |= {
            "encode_over_transformers": encode["ratio"],
            "cache_hit_over_encode": encode["hit_over_encode"],
        }
    return out


def targets(single: Any, batches: dict[str, Any], encode: Any) -> dict[str, Any]:
    """The issue's H100 targets (meaningful on an H100 only)."""
    out: dict[str, Any] = {}
    if _ok(batches.get("1")):
        out["batch1_decode_tok_s"] = lb.target(batches["1"]["vlmkit_tok_s"], at_least=170)
    if _ok(batches.get("32")):
        out["batch32_decode_tok_s"] = lb.target(batches["32"]["vlmkit_tok_s"], at_least=2500)
    if _ok(single):
        out["repeated_image_ttft_ms"] = lb.target(single["ttft_s"]["vlmkit_repeated_image"] * 1e3, at_most=15)
    if _ok(encode):
        out["encode_img_s_batch64"] = lb.target(encode["vlmkit_img_s"], at_least=1400)
    return out


if __name__ == "__main__":
    main()
