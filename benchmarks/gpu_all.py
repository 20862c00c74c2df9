"""Every GPU figure in one run of at most 8 minutes: the device's copy bandwidth (the decode roofline), inference
(`bench_gpu.py`) and training (`train_gpu.py`) at LLaVA-1.5-7B shapes, each against transformers in the same run.

Writes ``benchmarks/results/gpu.json`` and ``benchmarks/results/train_gpu.json`` (versions, device, figures,
baselines, ratios, each target with ``met``), prints a summary of the targets, and exits non-zero if any stage was
skipped or failed (a partial run never passes for a complete one).

    python benchmarks/gpu_all.py                    # on the GPU: ~7 minutes on an H100-class device
    python benchmarks/gpu_all.py --dry-run          # tiny shapes on CPU, seconds: checks this script end to end
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_gpu  # noqa: E402
import llava_bench as lb  # noqa: E402
import train_gpu  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOTAL_BUDGET_S = 480.0  # the device is lent for short sessions: everything fits one call
INFERENCE_BUDGET_S = 250.0
ROOFLINE_SHARE = 0.85  # batch-1 decode target, as a share of the bandwidth roofline


def copy_bandwidth_gb_s(*, device: str, gigabytes: float, repeats: int = 5) -> float:
    """Device-memory copy bandwidth (read + write counted), the best of ``repeats`` copies."""
    elements = int(gigabytes * 1e9 / 2)
    source = torch.empty(elements, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        target.copy_(source)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return 2 * elements * 2 / best / 1e9


def decode_roofline(*, bandwidth_gb_s: float, weight_bytes: int) -> float:
    """Batch-1 tokens/s if every step read the LM's weights once at the measured bandwidth and did nothing else."""
    return bandwidth_gb_s * 1e9 / weight_bytes


def inference_targets(result: dict[str, Any], *, roofline_tok_s: float) -> dict[str, Any]:
    """The issue's targets, the batch-1 one scaled to this device's measured bandwidth."""
    single, batches, encode = result["single"], result["decode_by_batch"], result["encode"]
    out: dict[str, Any] = {}
    if bench_gpu._ok(batches.get("1")):
        out["batch1_decode_share_of_roofline"] = lb.target(
            batches["1"]["vlmkit_tok_s"] / roofline_tok_s, at_least=ROOFLINE_SHARE
        )
    if bench_gpu._ok(batches.get("32")):
        out["batch32_decode_tok_s"] = lb.target(batches["32"]["vlmkit_tok_s"], at_least=3000)
    if bench_gpu._ok(single):
        out["repeated_image_ttft_ms"] = lb.target(single["ttft_s"]["vlmkit_repeated_image"] * 1e3, at_most=10)
    if bench_gpu._ok(encode):
        out["encode_img_s_batch64"] = lb.target(encode["vlmkit_img_s"], at_least=1400)
    return out


def training_targets(report: dict[str, Any]) -> dict[str, Any]:
    """Per stage: >= 1.2x transformers' samples/s at equal or lower peak memory; plan within 10% of the peak."""
    out: dict[str, Any] = {}
    for stage, figures in report["stages"].items():
        ours, theirs = figures.get("vlmkit", {}), figures.get("transformers", {})
        if "samples_per_s" in ours and "samples_per_s" in theirs:
            out[f"{stage}_speed_over_transformers"] = lb.target(
                ours["samples_per_s"] / theirs["samples_per_s"], at_least=1.2
            )
        if ours.get("peak_gb") and theirs.get("peak_gb"):
            out[f"{stage}_peak_over_transformers"] = lb.target(
                ours["peak_gb"] / theirs["peak_gb"], at_most=1.0
            )
        if ours.get("peak_gb") and ours.get("plan_gb"):
            out[f"{stage}_plan_error"] = lb.target(abs(ours["plan_gb"] / ours["peak_gb"] - 1), at_most=0.10)
    return out


def incomplete(result: Any, *, path: str = "") -> list[str]:
    """Every stage reported as skipped, anywhere in a result."""
    if isinstance(result, dict):
        if "skipped" in result:
            return [f"{path or 'result'}: {result['skipped']}"]
        return [
            item
            for key, value in result.items()
            for item in incomplete(value, path=f"{path}.{key}".strip("."))
        ]
    return []


def run_inference(*, dry_run: bool, budget_s: float, out: Path) -> dict[str, Any]:
    device = "cpu" if dry_run else "cuda"
    bandwidth = copy_bandwidth_gb_s(device=device, gigabytes=0.05 if dry_run else 4.0)
    result = bench_gpu.main(
        [*(["--dry-run"] if dry_run else []), "--budget-s", str(budget_s), "--out", str(out)]
    )
    weight_bytes = int(result["model"].get("lm_bytes") or 0)
    if not weight_bytes:
        raise RuntimeError("bench_gpu reported no language-model size: cannot place the decode roofline")
    roofline = decode_roofline(bandwidth_gb_s=bandwidth, weight_bytes=weight_bytes)
    result["bandwidth"] = {"copy_gb_s": round(bandwidth, 1), "lm_weight_bytes": weight_bytes,
                           "batch1_roofline_tok_s": round(roofline, 1)}  # fmt: skip
    result["targets"] = inference_targets(result, roofline_tok_s=roofline)
    lb.emit(result, out=out)
    return result


def run_training(*, dry_run: bool, out: Path) -> dict[str, Any]:
    report = train_gpu.main(["--dry-run"] if dry_run else [])
    report["targets"] = training_targets(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (seconds)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or use --dry-run to check the script on CPU")
    began, problems = time.perf_counter(), []
    results: dict[str, Any] = {}
    for name, run in (
        ("gpu.json", lambda out: run_inference(dry_run=args.dry_run, budget_s=INFERENCE_BUDGET_S, out=out)),
        ("train_gpu.json", lambda out: run_training(dry_run=args.dry_run, out=out)),
    ):
        try:
            results[name] = run(args.out_dir / name)
            problems += [f"{name}: {item}" for item in incomplete(results[name])]
        except Exception:  # one part failing must not hide the other's figures; it still fails the run
            problems.append(f"{name}: failed\n{traceback.format_exc()}")
    wall = time.perf_counter() - began
    if wall > TOTAL_BUDGET_S and not args.dry_run:
        problems.append(f"took {wall:.0f} s, more than the {TOTAL_BUDGET_S:.0f} s budget")
    summary = {name: result.get("targets", {}) for name, result in results.items()}
    print(
        json.dumps({"wall_s": round(wall, 1), "targets": summary, "problems": problems}, indent=2),
        file=sys.stderr,
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
