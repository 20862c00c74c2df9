"""Projectors side by side: linear / mlp / resampler / cross-attn / pixel-shuffle on the same tower, LM, data and
CPU budget (the same number of optimizer steps on the same samples; wall time reported).

Every projector starts fresh between the shipped default model's tower (CLIP-style 64/8 with a conv stem,
4 x 128, last layer: 64 patch tokens) and its language model (Llama 8 x 128, vocab 1024), both taken as
trained. Each run trains the projector (lr 1e-3) and the LM (1e-4) with the tower frozen, on the same
``vlmkit synth`` records in the same order, for the same number of steps, on one thread; then it is scored
greedily (exact match per task) on the test split of another synth seed. Measured per projector: visual tokens
per image, projector parameters, the per-task exact match, and two timings taken interleaved after training (every
projector once per round, the minimum of 5 rounds: the machine is shared, and the minimum is the least disturbed
figure): one training step's forward + backward on 8 samples (frozen tower included) and one answer (``ask``,
batch 1, caches off, up to 32 tokens). The training runs' own wall times are kept too, but other jobs shared the
cores while they ran.

    nice -n 10 python benchmarks/projectors.py --steps 300 --out benchmarks/results/projectors.json
    python benchmarks/projectors.py --dry-run      # seconds: checks the script (tests run this)
    python benchmarks/projectors.py --work W --steps 150 --reuse OLD.json --out NEW.json   # redo only the timing
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vlmkit.api import VLM
from vlmkit.config import ProjectorConfig
from vlmkit.data.dataset import ConversationDataset, collate, read_records
from vlmkit.evaluation.runner import evaluate
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.training.config import TrainConfig
from vlmkit.training.objectives import TokenLoss
from vlmkit.training.session import train
from vlmkit.training.stages import StageConfig

PROJECTORS = {
    "linear": ProjectorConfig(type="linear"),
    "mlp": ProjectorConfig(type="mlp"),
    "resampler": ProjectorConfig(type="resampler", num_queries=16, num_layers=2, num_heads=8),
    "cross-attn": ProjectorConfig(type="cross-attn", num_layers=2, num_heads=8),
    "pixel-shuffle": ProjectorConfig(type="pixel-shuffle", shuffle_factor=2),
}
TRAIN_SEED, HELD_OUT_SEED = 11, 97


def synth(out: Path, *, n: int, seed: int, test_fraction: float) -> Path:
    """``vlmkit synth`` through its command line, exactly as a user would make the data."""
    cmd = [sys.executable, "-m", "vlmkit", "synth", "--out", str(out), "--n", str(n), "--seed", str(seed),
           "--test-fraction", str(test_fraction)]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def compose(base: VLM, projector: ProjectorConfig, *, seed: int = 0) -> VLM:
    """The base model's tower and LM (copies) with a freshly initialised ``projector``."""
    config = copy.deepcopy(base.config)
    config.projector = copy.deepcopy(projector)
    torch.manual_seed(seed)
    model = VisionLanguageModel(config=config, vision=copy.deepcopy(base.model.vision),
                                language_model=copy.deepcopy(base.model.language_model))  # fmt: skip
    return VLM(model=model, tokenizer=copy.deepcopy(base.tokenizer))


def latency(vlm: VLM, records: list[dict[str, Any]], *, folder: Path, n: int) -> dict[str, float]:
    """Seconds per ``ask`` (batch 1, greedy, caches off) over ``n`` single-image held-out questions."""
    vlm.enable_caches(feature_cache_bytes=0, prefix_cache_bytes=0)
    singles = [r for r in records if isinstance(r.get("image"), str)][:n]
    times = []
    for record in singles:
        question = record["conversations"][0]["value"]
        start = time.perf_counter()
        vlm.ask(question, images=[folder / record["image"]], max_new_tokens=32)
        times.append(time.perf_counter() - start)
    p90 = statistics.quantiles(times, n=10)[-1] if len(times) > 1 else times[0]
    return {"median_s": statistics.median(times), "p90_s": p90, "n": len(times)}


def run_one(
    name: str, base: VLM, *, data: Path, held_out: Path, work: Path, args: argparse.Namespace
) -> dict:
    vlm = compose(base, PROJECTORS[name])
    stage = StageConfig(stage="full", lr=1e-3, lr_scales={"language": 0.1})
    config = TrainConfig(data=data / "train.json", out=work / name, stage=stage, batch_size=args.batch_size,
                         max_steps=args.steps, max_minutes=args.minutes, warmup_ratio=0.05,
                         feature_cache=False, progress=False, plot=False, seed=0)  # fmt: skip
    result = train(vlm, config)
    trained = VLM.from_pretrained(work / name)
    records = json.loads((held_out / "test.json").read_text())[: args.eval_n]
    report = evaluate(trained, records, image_folder=held_out, metric="exact_match", batch_size=8,
                      max_new_tokens=32)  # fmt: skip
    return {
        "visual_tokens_per_image": trained.model.num_image_tokens,
        "projector_parameters": sum(p.numel() for p in trained.model.projector.parameters()),
        "train": {
            "steps": result.steps,
            "seconds": round(result.elapsed_s, 1),
            "s_per_step": round(result.elapsed_s / max(1, result.steps), 4),
            "final_loss": result.loss,
            "stopped": result.stopped,
        },  # fmt: skip
        "answer_latency": latency(trained, records, folder=held_out, n=args.latency_n),
        "exact_match": report.score,
        "tasks": {task: score.score for task, score in report.tasks.items()},
        "eval_n": sum(score.n for score in report.tasks.values()),
    }


def interleaved_timing(models: dict[str, VLM], *, data: Path, held_out: Path, rounds: int) -> dict[str, dict]:
    """Seconds per training step (forward + backward of 8 samples, frozen tower included) and per answer (``ask``,
    batch 1, caches off, the same 5 questions), every projector once per round; the minimum over rounds is the
    least disturbed figure on a shared machine."""
    records = read_records(data / "train.json")[:8]
    questions = [
        r for r in json.loads((held_out / "test.json").read_text()) if isinstance(r.get("image"), str)
    ][:5]
    batches = {}
    for name, vlm in models.items():
        dataset = ConversationDataset(records, processor=vlm.processor, image_folder=data)
        batches[name] = collate([dataset[i] for i in range(len(dataset))], pad_token_id=vlm.processor.pad_token_id,
                                image_size=vlm.config.vision.image_size)  # fmt: skip
        vlm.model.vision.requires_grad_(False)
        vlm.enable_caches(feature_cache_bytes=0, prefix_cache_bytes=0)
    times: dict[str, dict[str, list[float]]] = {name: {"train_step_s": [], "answer_s": []} for name in models}
    for _ in range(rounds):
        for name, vlm in models.items():
            batch, loss = batches[name], TokenLoss(vlm.model.train())
            start = time.perf_counter()
            loss(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                 pixel_values=batch.pixel_values).backward()  # fmt: skip
            times[name]["train_step_s"].append(time.perf_counter() - start)
            vlm.model.zero_grad(set_to_none=True)
            vlm.model.eval()
            start = time.perf_counter()
            for record in questions:
                vlm.ask(
                    record["conversations"][0]["value"],
                    images=[held_out / record["image"]],
                    max_new_tokens=32,
                )
            times[name]["answer_s"].append((time.perf_counter() - start) / len(questions))
    return {
        name: {k: round(min(v), 4) for k, v in t.items()} | {"rounds": rounds} for name, t in times.items()
    }


def table(results: dict[str, dict]) -> str:
    """A markdown table: one row per projector, then per-task exact match columns."""
    tasks = sorted({t for r in results.values() for t in r["tasks"]})
    head = ["projector", "tokens/img", "params", "step ms", "answer ms", "exact match", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in results.items():
        cells = [name, r["visual_tokens_per_image"], f"{r['projector_parameters']:,}",
                 f"{1000 * r['timing']['train_step_s']:.0f}", f"{1000 * r['timing']['answer_s']:.0f}",
                 f"{r['exact_match']:.3f}", *(f"{r['tasks'].get(t) or 0:.2f}" for t in tasks)]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps", type=int, default=300, help="optimizer steps per projector (the same for all)"
    )
    parser.add_argument("--minutes", type=float, default=None, help="optional wall-clock cap per projector")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-n", type=int, default=4_000)
    parser.add_argument("--eval-n", type=int, default=300)
    parser.add_argument("--latency-n", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--projectors", default=",".join(PROJECTORS))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes: checks the script in seconds")
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="a results JSON of an earlier run with the same --work: only redo the timing",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    args = parser.parse_args()
    if args.dry_run:
        args.minutes, args.steps, args.train_n, args.eval_n, args.latency_n = None, 2, 40, 8, 2
        args.batch_size, args.rounds = 2, 1
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="vlmkit-projectors-"))
    data, held_out = work / "train-data", work / "held-out"
    if not args.reuse:
        synth(data, n=args.train_n, seed=TRAIN_SEED, test_fraction=0.01)
        synth(held_out, n=max(20, args.eval_n * 10), seed=HELD_OUT_SEED, test_fraction=0.1)
    base = VLM.from_pretrained()
    results = json.loads(args.reuse.read_text())["results"] if args.reuse else {}
    for name in args.projectors.split(","):
        if name not in results:
            results[name] = run_one(name, base, data=data, held_out=held_out, work=work, args=args)
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    trained = {name: VLM.from_pretrained(work / name) for name in results}
    for name, figures in interleaved_timing(
        trained, data=data, held_out=held_out, rounds=args.rounds
    ).items():
        results[name]["timing"] = figures
    document = {
        "benchmark": "projectors",
        "setup": {
            "base": "the shipped default model's tower and LM (both trained), a fresh projector each",
            "train": f"vlmkit synth --n {args.train_n} --seed {TRAIN_SEED}; full stage, tower frozen, "
            f"lr 1e-3 projector / 1e-4 LM (5% warmup, cosine), batch {args.batch_size}, "
            f"{args.steps} steps each (the same data in the same order), fp32",
            "held_out": f"vlmkit synth --n {max(20, args.eval_n * 10)} --seed {HELD_OUT_SEED}, first "
            f"{args.eval_n} of its test split, exact match, greedy",
            "projectors": {k: v.__dict__ for k, v in PROJECTORS.items()},
        },  # fmt: skip
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "shared": "yes: other jobs kept the cores busy (load average 8-15 here); the timing section is the "
            "minimum of interleaved rounds, train.s_per_step and answer_latency (taken during the runs) are not",
        },  # fmt: skip
        "results": results,
        "table": table(results),
    }
    text = json.dumps(document, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(document["table"])


if __name__ == "__main__":
    main()
