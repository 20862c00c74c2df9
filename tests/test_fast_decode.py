"""Fast decoding: static vs dynamic cache, compiled vs eager step, delayed host syncs, reused prompt KV, batching.

Every fast path must give the same tokens as the plain eager loop (greedy, and seeded sampling). The compiled
test really runs inductor on CPU on the tiny model (about 10-20 s the first time, cached by inductor afterwards).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import left_padded_embeds as embed
from tiny import save_language
from vlmkit.api import VLM
from vlmkit.generation import DecodeOptions, DecodeResources, GenerationConfig, generate, stream
from vlmkit.generation.forward import decode_step, prefill
from vlmkit.generation.kv_cache import new_cache, snapshot_prompt
from vlmkit.generation.static_cache import bucket_length, static_cache_supported
from vlmkit.processing.processor import Sample

KINDS = ("llama", "qwen2", "gpt2")
PROMPTS = ("What colour is the circle?", "USER: Describe the image. ASSISTANT:", "yes")
STATIC = DecodeOptions(static_cache=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any]]:
    out = {}
    for kind in KINDS:
        directory = save_language(tmp_path_factory.mktemp(kind), kind)
        out[kind] = (
            AutoModelForCausalLM.from_pretrained(directory).eval(),
            AutoTokenizer.from_pretrained(directory),
        )
    return out


def run(
    model: tuple[Any, Any], prompts: tuple[str, ...], options: DecodeOptions | None, **kwargs: Any
) -> Any:
    lm, tokenizer = model
    embeds, mask = embed(lm, tokenizer, prompts)
    eos, resources = kwargs.pop("eos", []), kwargs.pop("resources", None)
    config = GenerationConfig.from_kwargs(**{"max_new_tokens": 16, **kwargs})
    return generate(lm, inputs_embeds=embeds, attention_mask=mask, tokenizer=tokenizer, config=config,
                    eos_token_ids=eos, options=options, resources=resources)  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        ("llama", {}),
        ("qwen2", {}),
        ("gpt2", {}),
        ("llama", {"temperature": 0.9, "top_p": 0.9, "seed": 3}),
        ("gpt2", {"repetition_penalty": 1.3}),
    ],
)
def test_static_cache_equals_dynamic(models: dict[str, Any], kind: str, settings: dict[str, Any]) -> None:
    assert static_cache_supported(models[kind][0])
    dynamic = run(models[kind], PROMPTS, None, **settings)
    assert run(models[kind], PROMPTS, STATIC, **settings) == dynamic
    assert run(models[kind], PROMPTS, STATIC, **settings) == dynamic  # the pooled cache, reused


@pytest.mark.parametrize(
    "options", [DecodeOptions(sync_every=4), DecodeOptions(static_cache=True, sync_every=5)]
)
def test_syncing_every_few_steps_changes_nothing(models: dict[str, Any], options: DecodeOptions) -> None:
    model = models["llama"]
    eos = run(model, PROMPTS, None).token_ids[1][3]  # a token row 1 produces: rows finish at different steps
    stop = model[1].decode(run(model, PROMPTS, None).token_ids[0][2:4])
    for kwargs in ({"eos": [eos]}, {"stop": [stop]}, {"eos": [eos], "stop": [stop], "max_new_tokens": 7}):
        plain = run(model, PROMPTS, None, **kwargs)
        assert run(model, PROMPTS, options, **kwargs) == plain


def test_static_cache_lengths_are_bucketed_and_pooled(models: dict[str, Any]) -> None:
    assert (bucket_length(1), bucket_length(256), bucket_length(257)) == (256, 256, 512)
    resources = DecodeResources()
    run(models["llama"], PROMPTS, STATIC, resources=resources)
    run(models["llama"], PROMPTS[:2], STATIC, resources=resources)  # another batch size: another cache
    run(models["llama"], PROMPTS, STATIC, resources=resources)
    assert len(resources.pool._idle) == 2


@pytest.mark.parametrize("options", [None, STATIC])
def test_prompt_kv_reuse_equals_full_prefill(models: dict[str, Any], options: DecodeOptions | None) -> None:
    lm, tokenizer = models["qwen2"]
    embeds, mask = embed(lm, tokenizer, ("USER: Describe the image. What colour is the circle? ASSISTANT:",))
    cache = new_cache(lm)
    with torch.no_grad():
        prefill(lm, inputs_embeds=embeds[:, :9], attention_mask=mask[:, :9], cache=cache)
    past = snapshot_prompt(cache, length=9).truncate(6)
    config = GenerationConfig(max_new_tokens=12)
    full = generate(lm, inputs_embeds=embeds, attention_mask=mask, tokenizer=tokenizer, config=config)
    seen = []
    reused = generate(lm, inputs_embeds=embeds[:, 6:], attention_mask=mask, tokenizer=tokenizer, config=config,
                      options=options, past=past, on_prefill=seen.append)  # fmt: skip
    assert reused == full
    assert seen[0].length == embeds.shape[1]
    deltas = stream(lm, inputs_embeds=embeds[:, 6:], attention_mask=mask, tokenizer=tokenizer, config=config,
                    options=options, past=past)  # fmt: skip
    assert "".join(deltas) == full.texts[0]
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(
            lm,
            inputs_embeds=embeds[:, 5:],
            attention_mask=mask,
            tokenizer=tokenizer,
            config=config,
            past=past,
        )


def _sample(vlm: VLM, prompt: str, images: list) -> Sample:
    return Sample(messages=vlm.processor.user_prompt(prompt, num_images=len(images)), images=images)


def test_vlm_batch_equals_single_with_every_fast_path(tiny_vlm, images) -> None:
    prompts = [
        "Describe the image.",
        "<image> vs <image>: which has more circles?",
        "Just text, no image here.",
    ]
    imgs = [[images[0]], [images[1], images[2]], []]
    plain = VLM(
        model=tiny_vlm.model, tokenizer=tiny_vlm.tokenizer, feature_cache_bytes=0, prefix_cache_bytes=0
    )
    fast = VLM(model=tiny_vlm.model, tokenizer=tiny_vlm.tokenizer, static_cache=True, sync_every=3,
               encode_mode="sequential")  # fmt: skip
    samples = [_sample(plain, p, i) for p, i in zip(prompts, imgs, strict=True)]
    expected = [plain.generate([s], max_new_tokens=10).token_ids[0] for s in samples]
    assert plain.generate(samples, max_new_tokens=10).token_ids == expected
    assert fast.generate(samples, max_new_tokens=10).token_ids == expected
    assert [fast.generate([s], max_new_tokens=10).token_ids[0] for s in samples] == expected
    assert fast.feature_cache.stats()["hits"] == 3 and fast.prefix_cache.stats()["lookups"] == 3


@pytest.mark.slow
@pytest.mark.filterwarnings("error:compiled decode step failed")
def test_compiled_decode_equals_eager(tiny_vlm, images) -> None:
    """Real torch.compile (inductor, CPU) of the decode step, with prefix reuse and streaming on top."""
    eager = VLM(
        model=tiny_vlm.model, tokenizer=tiny_vlm.tokenizer, feature_cache_bytes=0, prefix_cache_bytes=0
    )
    compiled = VLM(model=tiny_vlm.model, tokenizer=tiny_vlm.tokenizer, compile=True)
    # (a failed compile falls back to eager with a warning: the filterwarnings mark turns that into a failure)
    for prompt in ("Describe the image.", "What colour is the circle?", "What colour is the square?"):
        sample = _sample(eager, prompt, images[:1])
        expected = eager.generate([sample], max_new_tokens=12).token_ids
        with torch._dynamo.config.patch(error_on_recompile=prompt != "Describe the image."):
            assert compiled.generate([sample], max_new_tokens=12).token_ids == expected
    assert compiled.prefix_cache.stats()["hits"] == 2
    text = "".join(compiled.stream("What colour is the circle?", images=images[:1], max_new_tokens=12))
    assert text == eager.ask("What colour is the circle?", images=images[:1], max_new_tokens=12)


def test_decode_options_validate() -> None:
    with pytest.raises(ValueError, match="sync_every"):
        DecodeOptions(sync_every=0)
    with pytest.raises(ValueError, match="compile"):
        DecodeOptions(compile="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="encode_mode"):
        VLM.set_encode_mode(object.__new__(VLM), "threads")
    assert DecodeOptions(compile={"backend": "eager"}).uses_static_cache


@pytest.mark.slow
def test_gpu_benchmark_dry_run(tmp_path) -> None:
    """benchmarks/bench_gpu.py end to end at tiny shapes on CPU (the real run needs an H100)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import bench_gpu

    result = bench_gpu.main(["--dry-run", "--out", str(tmp_path / "gpu.json")])
    assert (tmp_path / "gpu.json").exists() and result["dry_run"]
    assert set(result["decode_by_batch"]) == {"1", "2"} and not result["environment"]["device"].startswith(
        "cuda"
    )
    assert (
        result["single"]["same_tokens_as_transformers"] and result["single"]["same_tokens_with_prefix_reuse"]
    )
    assert all(r["same_tokens_as_transformers"] for r in result["decode_by_batch"].values())
    assert {"ttft_repeated_over_cold", "decode_batch1_over_transformers", "encode_over_transformers"} <= set(
        result["ratios"]
    )
    assert set(result["targets"]) == {"batch1_decode_tok_s", "repeated_image_ttft_ms", "encode_img_s_batch64"}


@pytest.mark.parametrize("shape", [{}, {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True}])
def test_lean_decode_step_is_bitwise_the_models_own(shape: dict[str, Any]) -> None:
    """The CPU lean step (no padding, small Llama) gives exactly the logits of the model's forward, GQA and biases
    included; padding, another architecture or a hooked layer keep the model's own path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmkit.generation.cpu_llama.lean_step import lean_decode_step, lean_step_model, plain_dynamic_cache
    from vlmkit.generation.forward import decode_step

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, tie_word_embeddings=True, attn_implementation="sdpa", **shape)  # fmt: skip
    lm = LlamaForCausalLM(config).eval()
    embeds, mask = torch.randn(1, 9, 64), torch.ones(1, 9, dtype=torch.long)
    model = lean_step_model(lm, attention_mask=mask)
    assert model is lm and lean_step_model(lm, attention_mask=torch.tensor([[0] + [1] * 8])) is None
    with torch.no_grad():
        ours, theirs = new_cache(lm), new_cache(lm)
        prefill(lm, inputs_embeds=embeds, attention_mask=mask, cache=ours)
        logits = prefill(lm, inputs_embeds=embeds, attention_mask=mask, cache=theirs)
        assert plain_dynamic_cache(ours, num_layers=2)
        tokens, positions = logits.argmax(-1)[:, None], torch.tensor([[9]])
        for _ in range(6):
            mask = torch.cat((mask, mask.new_ones(1, 1)), dim=-1)
            expected = decode_step(
                lm, input_ids=tokens, attention_mask=mask, position_ids=positions, cache=theirs
            )
            got = lean_decode_step(model, input_ids=tokens, position_ids=positions, cache=ours)
            assert torch.equal(got, expected)
            tokens, positions = expected.argmax(-1)[:, None], positions + 1
    handle = lm.model.layers[0].mlp.register_forward_hook(lambda *_: None)
    assert lean_step_model(lm, attention_mask=mask) is None
    handle.remove()


@torch.no_grad()
def test_lean_step_appends_in_place_but_never_into_tensors_it_did_not_make() -> None:
    """The lean step writes new KV into a buffer with spare room instead of re-concatenating the cache; the
    prefill's tensors (which the prefix cache keeps) stay untouched, through crops (speculative rounds) too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmkit.generation.cpu_llama.lean_step import lean_decode_step
    from vlmkit.generation.kv_cache import snapshot_prompt

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, attn_implementation="sdpa")  # fmt: skip
    lm = LlamaForCausalLM(config).eval()
    embeds, mask = torch.randn(1, 9, 64), torch.ones(1, 9, dtype=torch.long)
    cache, reference = new_cache(lm), new_cache(lm)
    prefill(lm, inputs_embeds=embeds, attention_mask=mask, cache=cache)
    prefill(lm, inputs_embeds=embeds, attention_mask=mask, cache=reference)
    prompt = snapshot_prompt(cache, length=9)
    kept = [(k.clone(), v.clone()) for k, v in prompt.layers]
    for step, token in enumerate([5, 17, 3, 40]):
        ids, positions = torch.tensor([[token]]), torch.tensor([[9 + step]])
        lean_decode_step(lm, input_ids=ids, position_ids=positions, cache=cache)
        decode_step(lm, input_ids=ids, attention_mask=torch.ones(1, 10 + step, dtype=torch.long),
                    position_ids=positions, cache=reference)  # fmt: skip
        if step == 1:  # cut the last position, as a rejected proposal is cut, and write it again
            for layer, ref in zip(cache.layers, reference.layers, strict=True):
                layer.keys, layer.values = layer.keys[:, :, :10], layer.values[:, :, :10]
                ref.keys, ref.values = ref.keys[:, :, :10], ref.values[:, :, :10]
            lean_decode_step(lm, input_ids=ids, position_ids=positions, cache=cache)
            decode_step(lm, input_ids=ids, attention_mask=torch.ones(1, 11, dtype=torch.long),
                        position_ids=positions, cache=reference)  # fmt: skip
    for layer, ref in zip(cache.layers, reference.layers, strict=True):
        assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
        assert layer.keys.untyped_storage().nbytes() > layer.keys.nbytes  # a view into a roomier buffer
    for (keys, values), (k, v) in zip(prompt.layers, kept, strict=True):
        assert torch.equal(keys, k) and torch.equal(values, v)
