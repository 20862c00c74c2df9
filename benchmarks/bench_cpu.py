"""CPU benchmark: vlmkit vs transformers' LlavaForConditionalGeneration.generate on small random llava-hf models.

Two specs, each saved as a llava-hf directory and loaded by both libraries:

- ``small``: CLIP-style tower (224 px, patch 16, 12 x 384) + MLP projector + a 58M-parameter Llama (8 x 512,
  vocab 32064); 80M parameters, batch-1 decode bound by streaming the LM weights.
- ``tiny``: the shapes of vlmkit's shipped ``tiny-scratch`` model: a CLIP-style tower (64 px, patch 8, 4 x 128,
  4 heads, MLP 512, last layer's features) + MLP projector + Llama (4 x 128, 4 heads, 4 kv heads, intermediate
  512, vocab 1024, tied embeddings); about 2M parameters, where per-token framework overhead dominates.

Two transformers baselines for batch-1 ``ask``: *generate only (pixels given)* - ``generate`` on vlmkit's
ready-made ``input_ids`` / ``pixel_values`` (the ``transformers`` figures and ``*_over_transformers`` ratios) - and
*end to end (processor + generate)* - from the same image bytes and prompt string to the answer string through
transformers' own ``LlavaProcessor`` + ``generate`` + ``batch_decode`` (``transformers_end_to_end`` figures,
``ratios.ask_vs_transformers_end_to_end``), which is what ``ask``'s time covers.

Prints one JSON document with a section per spec (versions, device, every figure, ratios to transformers from
the same run, the issue's targets) and writes it to ``benchmarks/results/cpu.json`` (a run of one spec replaces
only that spec's section). About 5 minutes on 2 shared cores:

    python benchmarks/bench_cpu.py [--spec small|tiny|all] [--repeats 3] [--max-new-tokens 32] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llava_bench as lb  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu.json"


def cpu_spec(*, repeats: int, max_new_tokens: int) -> lb.Spec:
    return lb.Spec(
        name="small-llava-cpu",
        device="cpu",
        dtype="float32",
        vision={
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_hidden_layers": 12,
            "num_attention_heads": 6,
            "image_size": 224,
            "patch_size": 16,
            "projection_dim": 384,
        },  # fmt: skip
        text={
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "max_position_embeddings": 2048,
        },  # fmt: skip
        max_new_tokens=max_new_tokens,
        batches=(1, 8, 32),
        encode_batch=8,
        repeats=repeats,
    )


def tiny_spec(*, repeats: int, max_new_tokens: int) -> lb.Spec:
    """The ``tiny-scratch`` recipe's shapes (src/vlmkit/training/recipes/tiny-scratch.json) as a llava-hf model."""
    return lb.Spec(
        name="tiny-llava-cpu",
        device="cpu",
        dtype="float32",
        vision={
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "projection_dim": 128,
            "hidden_act": "gelu",
        },  # fmt: skip
        text={
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
        },  # fmt: skip
        max_new_tokens=max_new_tokens,
        batches=(1, 8, 32),
        encode_batch=8,
        repeats=repeats,
        words=1022,  # + <image> 1022, <pad> 1023
        vocab_size=1024,
        vision_feature_layer=-1,
    )


SPECS = {"small": cpu_spec, "tiny": tiny_spec}


def decode_modes(vlm: Any, spec: lb.Spec, images: list[bytes]) -> dict[str, Any]:
    """Batch-1 decode tokens/s with a dynamic cache (default), a static cache, and a compiled step: why the CPU
    default is eager + dynamic."""
    prompts, imgs = [lb.QUESTIONS[0]], [[images[0]]]
    out: dict[str, Any] = {}
    reference = lb.vlm_generate(vlm, prompts, imgs, max_new_tokens=spec.max_new_tokens)
    for name, options in (
        ("dynamic_eager", {}),
        ("static_eager", {"static_cache": True}),
        ("compiled", {"compile": True}),
    ):
        vlm.set_decoding(speculative=0, **options)  # the step itself; speculation has its own section
        start = time.perf_counter()
        tokens = lb.vlm_generate(
            vlm, prompts, imgs, max_new_tokens=spec.max_new_tokens
        )  # compiles, if at all
        first_call = time.perf_counter() - start
        cold = {"before": vlm.clear_caches, "repeats": spec.repeats, "device": "cpu"}
        t1 = lb.timed(lambda: lb.vlm_generate(vlm, prompts, imgs, max_new_tokens=1), **cold)
        tn = lb.timed(lambda: lb.vlm_generate(vlm, prompts, imgs, max_new_tokens=spec.max_new_tokens), **cold)
        steps = len(tokens[0]) - 1
        out[name] = {
            "tok_s": steps / max(tn - t1, 1e-9),
            "first_call_s": first_call,
            "same_tokens": tokens == reference,
        }
    vlm.set_decoding()
    return out


def decode_floor(vlm: Any, *, repeats: int = 20) -> dict[str, float]:
    """One token's unavoidable work: every LM weight matrix times one vector (the decode step is bound by
    streaming these weights from memory) with ``F.linear`` and with oneDNN (what vlmkit's lean step uses on models
    this size), and the time to merely read those bytes once (``sum``): the memory-bandwidth floor."""
    from vlmkit.generation.cpu_llama.twins import onednn_available

    lm = vlm.model.language_model
    mats = [p for n, p in lm.named_parameters() if p.dim() == 2 and "embed_tokens" not in n]
    if lm.get_output_embeddings().weight is lm.get_input_embeddings().weight:
        mats.append(lm.get_output_embeddings().weight)
    vectors = {m.shape[1]: torch.randn(1, m.shape[1]) for m in mats}
    out: dict[str, float] = {"weight_mbytes": sum(m.nbytes for m in mats) / 2**20}
    with torch.inference_mode():
        gemv = lb.timed(lambda: [torch.nn.functional.linear(vectors[m.shape[1]], m) for m in mats],
                        repeats=repeats, device="cpu")  # fmt: skip
        read = lb.timed(lambda: [m.sum() for m in mats], repeats=repeats, device="cpu")
        out |= {"weights_gemv_ms": gemv * 1e3, "weights_read_ms": read * 1e3}
        if onednn_available():
            onednn = lb.timed(lambda: [torch.ops.mkldnn._linear_pointwise(vectors[m.shape[1]], m, None, "none", [], "")
                                       for m in mats], repeats=repeats, device="cpu")  # fmt: skip
            out["weights_onednn_gemv_ms"] = onednn * 1e3
    return out


def decode_choice(vlm: Any, hf: Any, spec: lb.Spec, images: list[bytes]) -> dict[str, Any]:
    """Batch-1 whole answers with vlmkit's default decoding (``speculative=None``: a float16 draft where the LM is
    too big for the CPU caches, else plain) and with plain decoding (``speculative=0``), cold and for a repeated
    image, all taking turns with transformers' ``generate`` (``single``'s baseline)."""
    n, image, question = spec.max_new_tokens, images[0], lb.QUESTIONS[0]
    inputs = lb.hf_inputs(vlm, [question], [[image]])
    expected = lb.hf_generate(hf, inputs, max_new_tokens=n)
    follow_ups = iter(f"{q} ({i})" for i in range(10**6) for q in lb.QUESTIONS[1:])
    out: dict[str, Any] = {
        "tokens_generated": len(expected[0]),
        "speculative_rounds": _count_rounds(vlm, question, image, n),
    }
    runs: dict[str, Any] = {"transformers": (lambda: lb.hf_generate(hf, inputs, max_new_tokens=n), None)}
    for name, k in (("plain", 0), ("default", None)):
        vlm.set_decoding(speculative=k)
        out[f"same_tokens_as_transformers_{name}"] = (
            lb.vlm_generate(vlm, [question], [[image]], max_new_tokens=n) == expected
        )

        def cold(k: int | None = k) -> None:
            vlm.set_decoding(speculative=k)
            vlm.clear_caches()

        def seen_before(k: int | None = k) -> None:
            cold(k)
            vlm.ask(question, images=[image], max_new_tokens=1)

        runs[f"vlmkit_cold_{name}"] = (lambda: vlm.ask(question, images=[image], max_new_tokens=n), cold)
        runs[f"vlmkit_repeated_image_{name}"] = (
            lambda: vlm.ask(next(follow_ups), images=[image], max_new_tokens=n),
            seen_before,
        )
    out["answer_s"] = lb.alternating(runs, repeats=spec.repeats, device="cpu")
    seen_before()  # the default setting, the image seen once: a follow-up reuses the prompt's KV
    follow = next(follow_ups)
    reused = lb.vlm_generate(vlm, [follow], [[image]], max_new_tokens=n)
    fresh = lb.hf_generate(hf, lb.hf_inputs(vlm, [follow], [[image]]), max_new_tokens=n)
    out["same_tokens_with_prefix_reuse_default"] = reused == fresh
    vlm.set_decoding()
    return out


def _count_rounds(vlm: Any, question: str, image: bytes, n: int) -> dict[str, Any]:
    """The default's speculative rounds for one cold answer: how many, and draft tokens asked / accepted."""
    from vlmkit.generation.cpu_llama import speculative

    rounds: list[tuple[int, int]] = []
    original = speculative.speculative_round

    def counted(*args: Any, **kwargs: Any) -> list[int]:
        decided = original(*args, **kwargs)
        rounds.append((kwargs["count"], len(decided) - 1))
        return decided

    vlm.set_decoding()
    vlm.clear_caches()
    speculative.speculative_round = counted
    try:
        vlm.ask(question, images=[image], max_new_tokens=n)
    finally:
        speculative.speculative_round = original
    return {
        "rounds": len(rounds),
        "proposed": sum(c for c, _ in rounds),
        "accepted": sum(a for _, a in rounds),
    }


def run_spec(spec: lb.Spec, *, skip_modes: bool) -> dict[str, Any]:
    """Every figure for one spec: build the checkpoint, load it twice, measure, compare."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlmkit-bench-") as tmp:
        directory = lb.build_checkpoint(Path(tmp) / "llava", spec)
        vlm, hf = lb.load_both(directory, spec)
        processor = lb.load_hf_processor(directory)
    images = lb.make_images(max(spec.batches), size=spec.image_size_px, seed=0)
    with torch.inference_mode(False):
        single = lb.measure_single(vlm, hf, spec, images, processor=processor)
        batches = {str(b): lb.measure_batch(vlm, hf, spec, images, batch=b) for b in spec.batches}
        encode = lb.measure_encode(vlm, hf, spec, images)
        modes = None if skip_modes else decode_modes(vlm, spec, images)
        choice = decode_choice(vlm, hf, spec, images)
        floor = decode_floor(vlm)
    ttft, answer, short = single["ttft_s"], single["answer_s"], single["short_answer_s"]
    choice_answer = choice["answer_s"]
    ratios = {
        "ask_cold_over_transformers": answer["vlmkit_cold"] / answer["transformers"],
        "ask_repeated_image_over_transformers": answer["vlmkit_repeated_image"] / answer["transformers"],
        "short_ask_cold_over_transformers": short["vlmkit_cold"] / short["transformers"],
        "short_ask_repeated_image_over_transformers": short["vlmkit_repeated_image"] / short["transformers"],
        "ttft_cold_over_transformers": ttft["vlmkit_cold"] / ttft["transformers"],
        "ttft_repeated_over_transformers": ttft["vlmkit_repeated_image"] / ttft["transformers"],
        "ttft_repeated_over_cold": ttft["vlmkit_repeated_image"] / ttft["vlmkit_cold"],
        "cache_hit_over_encode": encode["hit_over_encode"],
        **{f"decode_batch{b}_over_transformers": batches[str(b)]["ratio"] for b in spec.batches},
        "encode_over_transformers": encode["ratio"],
        # vlmkit's default decides per model; both settings, over the same transformers runs
        "decode_choice": {
            f"ask_{case}_{name}_over_transformers": choice_answer[f"vlmkit_{case}_{name}"]
            / choice_answer["transformers"]
            for case in ("cold", "repeated_image")
            for name in ("plain", "default")
        },
        # the same ask times over transformers end to end (processor + generate + batch_decode, same bytes/prompt)
        "ask_vs_transformers_end_to_end": {
            "ask_cold": answer["vlmkit_cold"] / answer["transformers_end_to_end"],
            "ask_repeated_image": answer["vlmkit_repeated_image"] / answer["transformers_end_to_end"],
            "short_ask_cold": short["vlmkit_cold"] / short["transformers_end_to_end"],
            "short_ask_repeated_image": short["vlmkit_repeated_image"] / short["transformers_end_to_end"],
            "ttft_cold": ttft["vlmkit_cold"] / ttft["transformers_end_to_end"],
            "ttft_repeated": ttft["vlmkit_repeated_image"] / ttft["transformers_end_to_end"],
        },
    }
    end_to_end = ratios["ask_vs_transformers_end_to_end"]
    return {
        "environment": lb.environment(spec),
        "model": lb.model_summary(vlm, hf, spec),
        "single": single,
        "default_speculative": "auto"
        if vlm.decode_options.speculative is None
        else vlm.decode_options.speculative,
        "decode_choice": choice,
        "decode_by_batch": batches,
        "encode": encode,
        "cpu_decode_modes": modes,
        "decode_floor": floor
        | {
            # the plain step (no draft); batch-1 figures elsewhere are vlmkit's default, speculative where it applies
            "batch1_step_ms_vlmkit_plain": 1e3 / modes["dynamic_eager"]["tok_s"] if modes else None,
            "batch1_ms_per_token_vlmkit_default": 1e3 / batches["1"]["vlmkit_tok_s"],
            "batch1_step_ms_transformers": 1e3 / batches["1"]["transformers_tok_s"],
        },
        "same_tokens_as_transformers": single["same_tokens_as_transformers"]
        and single["same_tokens_with_prefix_reuse"]
        and choice["same_tokens_as_transformers_plain"]
        and choice["same_tokens_as_transformers_default"]
        and choice["same_tokens_with_prefix_reuse_default"]
        and all(b["same_tokens_as_transformers"] for b in batches.values()),
        "same_tokens_end_to_end": single["same_tokens_end_to_end"],
        "ratios": ratios,
        "targets": {
            "ask_repeated_image_over_transformers": lb.target(
                ratios["ask_repeated_image_over_transformers"], at_most=0.5
            ),
            # the cold whole-answer (--max-new-tokens, 32) target against both transformers baselines
            "ask_cold_over_transformers": lb.target(ratios["ask_cold_over_transformers"], at_most=0.5)
            | {"baseline": "generate only (pixels given)", "new_tokens": spec.max_new_tokens},
            "ask_cold_over_transformers_end_to_end": lb.target(end_to_end["ask_cold"], at_most=0.5)
            | {"baseline": "end to end (processor + generate)", "new_tokens": spec.max_new_tokens},
            "short_ask_repeated_image_over_transformers": lb.target(
                ratios["short_ask_repeated_image_over_transformers"], at_most=0.5
            ),
            "short_ask_cold_over_transformers": lb.target(
                ratios["short_ask_cold_over_transformers"], at_most=0.5
            ),
            "ttft_repeated_over_cold": lb.target(ratios["ttft_repeated_over_cold"], at_most=0.25),
            "cache_hit_over_encode": lb.target(ratios["cache_hit_over_encode"], at_most=0.02),
        },
        "wall_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", choices=[*SPECS, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--skip-modes", action="store_true", help="skip the static / compiled decode comparison"
    )
    # one thread by default: on a shared 2-core box, 2 OpenMP threads spin-wait behind other work (measured 18x
    # slower vision encodes); both libraries run under the same setting
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(SPECS) if args.spec == "all" else [args.spec]
    # a one-spec run keeps the other specs' sections of an existing result file
    previous = json.loads(args.out.read_text()) if args.out is not None and args.out.exists() else {}
    specs = previous.get("specs", {}) if args.spec != "all" else {}
    for name in names:
        spec = SPECS[name](repeats=args.repeats, max_new_tokens=args.max_new_tokens)
        specs[name] = run_spec(spec, skip_modes=args.skip_modes)
    result = {"benchmark": "bench_cpu", "specs": {name: specs[name] for name in SPECS if name in specs}}
    lb.emit(result, out=args.out)
    return result


if __name__ == "__main__":
    main()
