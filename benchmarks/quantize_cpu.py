"""CPU quantization benchmark: speed and answers of ``quantize="int8"`` / ``"int4"`` against vlmkit's float32 default.

Three sections, every ratio taken within one run (the variants take turns inside each repeat):

- ``speed``: ``bench_cpu.py``'s small spec (random-weight llava-hf directory: CLIP 12 x 384 + MLP + Llama 8 x 512,
  vocab 32064), batch 1: the decode step (``(t(N tokens) - t(1 token)) / (N - 1)``, plain decoding, the prompt's
  KV cached) and the whole 32-token answer (cold: image encode + prefill + decode), for float32 (plain, and
  vlmkit's default, which drafts with a float16 copy on this spec), int8 and int4.
- ``agreement``: the same random-weight spec, 50 prompts (questions x images), 32 greedy tokens each: the share of
  quantized tokens equal to float32's at the same position, and the share of answers identical to float32's.
- ``libraries``: one 8192 x 2048 layer at batch 1 through vlmkit's layers, float32, and the libraries' CPU paths
  (torch.ao, bitsandbytes, torchao; run with them importable, e.g. ``PYTHONPATH`` to a ``pip install --target``).
- ``answers``: the shipped default model (float32, int8, int4) scored by exact match on held-out synthetic
  records (``vlmkit synth --n 15000 --seed 99``, test split; ``--records`` takes a slice).

    python benchmarks/quantize_cpu.py [--data DIR] [--records 1500] [--repeats 5] [--prompts 50] [--out PATH]

Writes ``benchmarks/results/quantize_cpu.json``. One thread (as bench_cpu.py: a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_cpu  # noqa: E402
import llava_bench as lb  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "quantize_cpu.json"
METHODS = ("int8", "int4")
STEP_TARGET = 1.6  # int8 decode step at least this much faster than float32


def load_variants(directory: Path) -> dict[str, Any]:
    from vlmkit import VLM

    variants = {"float32": VLM.from_pretrained(directory, dtype="float32")}
    for method in METHODS:
        variants[method] = VLM.from_pretrained(directory, dtype="float32", quantize=method)
    return variants


def measure_speed(variants: dict[str, Any], spec: lb.Spec, images: list[bytes]) -> dict[str, Any]:
    """Per variant, alternating inside each repeat: the decode step (plain decoding; ``(t(N) - t(1)) / (N - 1)``
    with the prompt's KV already cached, so neither run encodes or prefills) and the cold N-token answer."""
    question, image, n = lb.QUESTIONS[0], images[0], spec.max_new_tokens
    prompts, imgs = [question], [[image]]
    runs: dict[str, Any] = {}
    for name, vlm in variants.items():
        settings = [("plain", 0)] + ([("default", None)] if name == "float32" else [])
        for label, speculative in settings:

            def answer(vlm: Any = vlm, tokens: int = n) -> None:
                lb.vlm_generate(vlm, prompts, imgs, max_new_tokens=tokens)

            def cold(vlm: Any = vlm, speculative: int | None = speculative) -> None:
                vlm.set_decoding(speculative=speculative)
                vlm.clear_caches()

            def warm(vlm: Any = vlm, speculative: int | None = speculative) -> None:
                vlm.set_decoding(speculative=speculative)
                answer(vlm, 1)  # the prompt's KV goes into the prefix cache

            runs[f"{name}_{label}_answer"] = (answer, cold)
            if label == "plain":
                runs[f"{name}_{label}_warm_n"] = (answer, warm)
                runs[f"{name}_{label}_warm_1"] = (lambda vlm=vlm: answer(vlm, 1), warm)
    times = lb.alternating(runs, repeats=spec.repeats, device="cpu")
    out: dict[str, Any] = {"new_tokens": n, "seconds": times, "step_ms": {}, "answer_s": {}}
    for key, seconds in times.items():
        if key.endswith("_answer"):
            out["answer_s"][key.removesuffix("_answer")] = seconds
        elif key.endswith("_warm_n"):
            name = key.removesuffix("_warm_n")
            out["step_ms"][name] = 1e3 * (seconds - times[f"{name}_warm_1"]) / (n - 1)
    for variant in variants.values():
        variant.set_decoding()
    base_step, plain, default = (out["step_ms"]["float32_plain"], out["answer_s"]["float32_plain"],
                                 out["answer_s"]["float32_default"])  # fmt: skip
    out["ratios"] = {}
    for m in METHODS:
        out["ratios"] |= {f"{m}_step_speedup_vs_float32": base_step / out["step_ms"][f"{m}_plain"],
                          f"{m}_answer_speedup_vs_float32_plain": plain / out["answer_s"][f"{m}_plain"],
                          f"{m}_answer_speedup_vs_float32_default": default / out["answer_s"][f"{m}_plain"]}  # fmt: skip
    out["target_int8_step"] = lb.target(out["ratios"]["int8_step_speedup_vs_float32"], at_least=STEP_TARGET)
    return out


def measure_agreement(variants: dict[str, Any], *, prompts: int, tokens: int) -> dict[str, Any]:
    """Greedy tokens of each quantized variant against float32's, position by position, over ``prompts`` prompts."""
    images = lb.make_images(max(1, prompts // len(lb.QUESTIONS) + 1), size=(640, 480), seed=1)
    cases = [(lb.QUESTIONS[i % len(lb.QUESTIONS)], images[i // len(lb.QUESTIONS)]) for i in range(prompts)]
    answers = {name: [lb.vlm_generate(vlm, [q], [[img]], max_new_tokens=tokens)[0] for q, img in cases]
               for name, vlm in variants.items()}  # fmt: skip
    out: dict[str, Any] = {"prompts": prompts, "new_tokens": tokens}
    reference = answers["float32"]
    for method in METHODS:
        same = total = identical = 0
        for ref, got in zip(reference, answers[method], strict=True):
            total += len(ref)
            same += sum(a == b for a, b in zip(ref, got, strict=False))
            identical += ref == got
        out[method] = {"token_share_equal": same / max(total, 1), "answers_identical": identical / prompts}
    return out


def measure_answers(data: Path, *, records: int) -> dict[str, Any]:
    """Exact match of the shipped default model in float32 / int8 / int4 on the first ``records`` test records."""
    from vlmkit import VLM
    from vlmkit.evaluation.records import read_records
    from vlmkit.evaluation.runner import evaluate

    chosen = read_records(data / "test.json")[:records]
    out: dict[str, Any] = {"data": f"{data} test split, first {len(chosen)} records"}
    for name in ("float32", *METHODS):
        vlm = VLM.from_pretrained(quantize=None if name == "float32" else name)
        report = evaluate(vlm, chosen, image_folder=data, batch_size=8, max_new_tokens=64)
        out[name] = {"exact_match": report.score, "n": report.n, "seconds": report.seconds,
                     "tasks": {task: t.score for task, t in report.tasks.items()}}  # fmt: skip
    base = out["float32"]["exact_match"]
    for method in METHODS:
        out[f"{method}_points_below_float32"] = 100 * (base - out[method]["exact_match"])
    out["target_int8_within_1_point"] = lb.target(out["int8_points_below_float32"], at_most=1.0)
    return out


def measure_libraries(
    *, out_features: int = 8192, in_features: int = 2048, repeats: int = 5
) -> dict[str, Any]:
    """One linear layer at batch 1: vlmkit's CPU layers against float32 and against the libraries' own CPU paths
    (torch.ao ``quantize_dynamic``, bitsandbytes, torchao) where they import; a failure is recorded, not raised."""
    import copy
    import warnings

    from torch import nn

    from vlmkit.quantization import Int4Linear, Int8DynamicLinear

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    x = torch.randn(1, in_features)
    exact = linear(x).detach()
    candidates: dict[str, Any] = {
        "float32 F.linear": lambda: linear,
        "vlmkit int8 (fbgemm row, per-token)": lambda: Int8DynamicLinear.from_linear(linear),
        "vlmkit int4 (group 128, bf16 activations)": lambda: Int4Linear.from_linear(linear, group_size=128),
        "torch.ao quantize_dynamic qint8 (per-tensor)": lambda: _ao_dynamic(linear),
        "bitsandbytes nf4 on CPU": lambda: _bnb(linear, nf4=True),
        "bitsandbytes int8 on CPU": lambda: _bnb(linear, nf4=False),
        "torchao Int8WeightOnlyConfig (eager)": lambda: _torchao(
            copy.deepcopy(linear), "Int8WeightOnlyConfig"
        ),
        "torchao Int8DynamicActivationInt8WeightConfig (eager)": lambda: _torchao(
            copy.deepcopy(linear), "Int8DynamicActivationInt8WeightConfig"
        ),
        "torchao Int4WeightOnlyConfig": lambda: _torchao(copy.deepcopy(linear), "Int4WeightOnlyConfig"),
    }
    out: dict[str, Any] = {"shape": [out_features, in_features], "batch": 1}
    with torch.inference_mode():
        for name, build in candidates.items():
            try:
                layer = build()
                got = layer(x).float()
                seconds = lb.timed(
                    lambda layer=layer: [layer(x) for _ in range(10)], repeats=repeats, device="cpu"
                )
                out[name] = {
                    "ms": seconds * 100,
                    "relative_error": float((got - exact).norm() / exact.norm()),
                }
            except Exception as exc:  # noqa: BLE001 - a library that cannot run here is a finding
                out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    base = out["float32 F.linear"]["ms"]
    for value in out.values():
        if isinstance(value, dict) and "ms" in value:
            value["speedup_vs_float32"] = base / value["ms"]
    return out


def _ao_dynamic(linear: Any) -> Any:
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)[0]


def _bnb(linear: Any, *, nf4: bool) -> Any:
    import bitsandbytes as bnb

    weight = linear.weight.data.clone()
    if nf4:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.float32,
                                  quant_type="nf4")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False,
                                    threshold=6.0)  # fmt: skip
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")


def _torchao(linear: Any, config: str) -> Any:
    import torchao.quantization as tq

    tq.quantize_(linear, getattr(tq, config)())
    return linear


def ensure_data(directory: Path) -> Path:
    if not (directory / "test.json").is_file():
        subprocess.run([sys.executable, "-m", "vlmkit", "synth", "--n", "15000", "--seed", "99", "--out",
                        str(directory)], check=True)  # fmt: skip
    return directory


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "vlmkit-synth-seed99")
    parser.add_argument("--records", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["speed", "agreement", "answers", "libraries"]
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = bench_cpu.cpu_spec(repeats=args.repeats, max_new_tokens=args.max_new_tokens)
    result: dict[str, Any] = {"benchmark": "quantize_cpu", "environment": lb.environment(spec),
                              "note": "2-core machine shared with other work; ratios are from one run"}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vlmkit-qbench-") as tmp:
        directory = lb.build_checkpoint(Path(tmp) / "llava", spec)
        variants = load_variants(directory)
    result["bytes"] = {name: vlm.info()["bytes"] for name, vlm in variants.items()}
    with torch.inference_mode(False):
        if "speed" not in args.skip:
            images = lb.make_images(1, size=spec.image_size_px, seed=0)
            result["speed"] = measure_speed(variants, spec, images)
        if "agreement" not in args.skip:
            result["agreement"] = measure_agreement(
                variants, prompts=args.prompts, tokens=args.max_new_tokens
            )
        del variants
        if "libraries" not in args.skip:
            result["libraries"] = measure_libraries(repeats=args.repeats)
        if "answers" not in args.skip:
            result["answers"] = measure_answers(ensure_data(args.data), records=args.records)
    result["wall_s"] = time.perf_counter() - started
    # a run that skips a section keeps that section of an existing result file
    previous = json.loads(args.out.read_text()) if args.skip and args.out.is_file() else {}
    result = {key: previous[key] for key in args.skip if key in previous} | result
    lb.emit(result, out=args.out)
    return result


if __name__ == "__main__":
    main()
