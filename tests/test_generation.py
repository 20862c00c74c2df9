"""Generation loop: KV-cached greedy / sampling / beams against full recomputation and transformers' generate.

Tiny random Llama, Qwen2 and GPT-2 models (tests/tiny.py) are built once per module; prompts go in as
``inputs_embeds`` from the LM's own embedding table, left padded, as the VLM hands them over.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import left_padded_embeds as embed
from tiny import save_language
from vlmkit.generation import GenerationConfig, GenerationResult, generate, stream
from vlmkit.generation.kv_cache import cache_kwarg, new_cache, reorder_cache, reorder_layer_tensors
from vlmkit.generation.sampling import top_k_filter, top_p_filter
from vlmkit.generation.stopping import StopStrings

KINDS = ("llama", "qwen2", "gpt2")
PROMPTS = ("What colour is the circle?", "USER: Describe the image. ASSISTANT:", "yes")
NO_EOS: list[int] = []


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any]]:
    out = {}
    for kind in KINDS:
        directory = save_language(tmp_path_factory.mktemp(kind), kind)
        lm = AutoModelForCausalLM.from_pretrained(directory).eval()
        out[kind] = (lm, AutoTokenizer.from_pretrained(directory))
    return out


@pytest.fixture(params=KINDS)
def model(request: pytest.FixtureRequest, models: dict[str, tuple[Any, Any]]) -> tuple[Any, Any]:
    return models[request.param]


def run(
    lm: Any, tokenizer: Any, prompts: Any, eos: list[int] | None = NO_EOS, **kwargs: Any
) -> GenerationResult:
    embeds, mask = embed(lm, tokenizer, prompts)
    config = GenerationConfig.from_kwargs(**kwargs)
    return generate(
        lm, inputs_embeds=embeds, attention_mask=mask, tokenizer=tokenizer, config=config, eos_token_ids=eos
    )


def hf_generate(lm: Any, tok: Any, prompts: Any, **kwargs: Any) -> list[list[int]]:
    """transformers' own generate, cut at its first eos (our token_ids exclude eos)."""
    embeds, mask = embed(lm, tok, prompts)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "penalty only on new tokens with inputs_embeds" and the like
        out = lm.generate(
            inputs_embeds=embeds, attention_mask=mask, pad_token_id=tok.pad_token_id, **kwargs
        ).tolist()
    eos = lm.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    return [row[: next((i for i, t in enumerate(row) if t in eos), len(row))] for row in out]


def strip_pads(row: list[int], tokenizer: Any) -> list[int]:
    """Drop the pad ids transformers appends after a row stopped early."""
    while row and row[-1] == tokenizer.pad_token_id:
        row = row[:-1]
    return row


def clean_stop_string(tokenizer: Any, tokens: list[int]) -> tuple[str, int]:
    """A stop string made of the text of two consecutive generated tokens, and the index of the second."""
    for i in range(len(tokens) - 2):
        before, middle, after = (tokenizer.decode(tokens[:n]) for n in (i, i + 1, i + 2))
        piece = after[len(before) :]
        # both tokens add whole characters (random tiny models emit many partial UTF-8 bytes)
        if after.startswith(middle) and middle.startswith(before) and len(middle) > len(before):
            if len(after) > len(middle) and "\ufffd" not in piece:
                return piece, i + 1
    raise AssertionError(f"no clean two-token window in {tokens}")


# --- correctness of the cached loop ---------------------------------------------------------------------


def test_kv_cached_greedy_equals_full_recomputation(model: tuple[Any, Any]) -> None:
    lm, tokenizer = model
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        for _ in range(20):
            next_id = lm(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=-1)
    expected = ids[0, -20:].tolist()
    result = run(lm, tokenizer, PROMPTS[:1], max_new_tokens=20)
    assert result.token_ids == [expected]
    assert result.finish_reasons == ["length"]


@pytest.mark.slow
def test_greedy_matches_transformers_generate(model: tuple[Any, Any]) -> None:
    lm, tokenizer = model
    expected = hf_generate(lm, tokenizer, PROMPTS, do_sample=False, max_new_tokens=20)
    ours = run(lm, tokenizer, PROMPTS, eos=None, max_new_tokens=20)
    assert ours.token_ids == expected


@pytest.mark.slow
def test_left_padded_batch_equals_each_prompt_alone(model: tuple[Any, Any]) -> None:
    lm, tokenizer = model
    batch = run(lm, tokenizer, PROMPTS, max_new_tokens=12)
    alone = [run(lm, tokenizer, [p], max_new_tokens=12).token_ids[0] for p in PROMPTS]
    assert batch.token_ids == alone


def test_rows_finishing_on_eos_keep_the_rest_of_the_batch_exact(models: dict[str, tuple[Any, Any]]) -> None:
    lm, tokenizer = models["llama"]
    free = run(lm, tokenizer, PROMPTS, max_new_tokens=12)
    eos_id = free.token_ids[1][3]  # row 1 emits it at step 3 (maybe earlier): it stops there
    batch = run(lm, tokenizer, PROMPTS, eos=[eos_id], max_new_tokens=12)
    alone = [run(lm, tokenizer, [p], eos=[eos_id], max_new_tokens=12) for p in PROMPTS]
    assert batch.token_ids == [r.token_ids[0] for r in alone]
    assert batch.finish_reasons == [r.finish_reasons[0] for r in alone]
    cut = free.token_ids[1].index(eos_id)
    assert batch.token_ids[1] == free.token_ids[1][:cut] and batch.finish_reasons[1] == "stop"


def test_default_eos_comes_from_model_and_tokenizer(models: dict[str, tuple[Any, Any]]) -> None:
    lm, tokenizer = models["llama"]

    def favour_eos(_module: Any, _inputs: Any, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., tokenizer.eos_token_id] += (
            100.0  # bias the head (a hook, so the shared model is untouched)
        )
        return logits

    handle = lm.lm_head.register_forward_hook(favour_eos)
    try:
        result = run(lm, tokenizer, PROMPTS[:1], eos=None, max_new_tokens=5)
        explicit = run(lm, tokenizer, PROMPTS[:1], eos=[], max_new_tokens=5)
    finally:
        handle.remove()
    assert result.token_ids == [[]] and result.texts == [""] and result.finish_reasons == ["stop"]
    assert explicit.finish_reasons == ["length"]


# --- beams ----------------------------------------------------------------------------------------------


def test_one_beam_equals_greedy(model: tuple[Any, Any]) -> None:
    lm, tokenizer = model
    assert (
        run(lm, tokenizer, PROMPTS, num_beams=1, max_new_tokens=10).token_ids
        == run(lm, tokenizer, PROMPTS, max_new_tokens=10).token_ids
    )


@pytest.mark.slow
def test_beam_search_matches_transformers(model: tuple[Any, Any]) -> None:
    lm, tokenizer = model
    expected = hf_generate(lm, tokenizer, PROMPTS, do_sample=False, num_beams=3, max_new_tokens=12)
    ours = run(lm, tokenizer, PROMPTS, eos=None, num_beams=3, max_new_tokens=12)
    assert ours.token_ids == expected


def test_beam_search_matches_transformers_with_early_eos(models: dict[str, tuple[Any, Any]]) -> None:
    lm, tokenizer = models["qwen2"]
    greedy = run(lm, tokenizer, PROMPTS[:2], max_new_tokens=8).token_ids
    eos_id = greedy[0][2]  # a likely token, so finished hypotheses compete with running beams
    lm.generation_config.eos_token_id = eos_id
    try:
        expected = hf_generate(lm, tokenizer, PROMPTS[:2], do_sample=False, num_beams=3, max_new_tokens=10)
    finally:
        lm.generation_config.eos_token_id = 2
    ours = run(lm, tokenizer, PROMPTS[:2], eos=[eos_id], num_beams=3, max_new_tokens=10)
    assert ours.token_ids == expected


@pytest.mark.slow
@pytest.mark.parametrize("num_beams", [1, 3])
def test_stop_strings_match_transformers(models: dict[str, tuple[Any, Any]], num_beams: int) -> None:
    lm, tokenizer = models["llama"]
    free = run(lm, tokenizer, PROMPTS, eos=None, num_beams=num_beams, max_new_tokens=16)
    stop, _ = clean_stop_string(tokenizer, free.token_ids[0])
    options = dict(do_sample=False, num_beams=num_beams, max_new_tokens=16)
    expected = hf_generate(lm, tokenizer, PROMPTS, stop_strings=[stop], tokenizer=tokenizer, **options)
    ours = run(lm, tokenizer, PROMPTS, eos=None, num_beams=num_beams, max_new_tokens=16, stop=[stop])
    assert ours.token_ids == [strip_pads(row, tokenizer) for row in expected]
    assert ours.finish_reasons[0] == "stop" and all(stop not in text for text in ours.texts)
    assert ours.texts[0] == free.texts[0][: free.texts[0].index(stop)]


def test_cache_reorder_selects_rows_with_and_without_the_helper(models: dict[str, tuple[Any, Any]]) -> None:
    lm, tokenizer = models["llama"]
    embeds, mask = embed(lm, tokenizer, PROMPTS[:2])
    caches = [new_cache(lm), new_cache(lm)]
    with torch.no_grad():
        for cache in caches:
            lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **{cache_kwarg(lm): cache})
    keys = [layer.keys.clone() for layer in caches[0].layers]
    values = [layer.values.clone() for layer in caches[0].layers]
    index = torch.tensor([1, 1, 0])
    reorder_cache(caches[0], index)
    reorder_layer_tensors(caches[1], index)  # the path for releases whose cache lacks reorder_cache
    for cache in caches:
        assert all(torch.equal(layer.keys, k[index]) for layer, k in zip(cache.layers, keys, strict=True))
        assert all(torch.equal(layer.values, v[index]) for layer, v in zip(cache.layers, values, strict=True))


# --- sampling -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(model: tuple[Any, Any]) -> None:
    lm, tokenizer = model
    rng_before = torch.get_rng_state()
    first = run(lm, tokenizer, PROMPTS, temperature=1.0, seed=7, max_new_tokens=16).token_ids
    again = run(lm, tokenizer, PROMPTS, temperature=1.0, seed=7, max_new_tokens=16).token_ids
    assert torch.equal(rng_before, torch.get_rng_state())
    assert first == again
    others = [
        run(lm, tokenizer, PROMPTS, temperature=1.0, seed=s, max_new_tokens=16).token_ids for s in (8, 9, 10)
    ]
    assert any(other != first for other in others)


@pytest.mark.slow
def test_top_k_one_sampling_equals_greedy(model: tuple[Any, Any]) -> None:
    lm, tokenizer = model
    greedy = run(lm, tokenizer, PROMPTS, max_new_tokens=12).token_ids
    assert (
        run(lm, tokenizer, PROMPTS, temperature=1.5, top_k=1, seed=0, max_new_tokens=12).token_ids == greedy
    )


def test_tiny_top_p_sampling_equals_greedy(models: dict[str, tuple[Any, Any]]) -> None:
    lm, tokenizer = models["llama"]
    greedy = run(lm, tokenizer, PROMPTS, max_new_tokens=8).token_ids
    assert (
        run(lm, tokenizer, PROMPTS, temperature=1.0, top_p=1e-6, seed=0, max_new_tokens=8).token_ids == greedy
    )


@pytest.mark.slow
@pytest.mark.parametrize("num_beams", [1, 3])
def test_repetition_penalty_matches_transformers(model: tuple[Any, Any], num_beams: int) -> None:
    # Unpadded prompts only: with inputs_embeds, transformers >= 5.2x skips the first <pad count> *generated*
    # tokens of a padded row (prompt_ignore_length meant for prompt ids); we penalise every generated token, so
    # our padded batch equals each prompt alone instead.
    lm, tokenizer = model
    options = dict(num_beams=num_beams, repetition_penalty=2.5, max_new_tokens=12)
    alone = []
    for prompt in PROMPTS:
        expected = hf_generate(lm, tokenizer, [prompt], do_sample=False, **options)
        ours = run(lm, tokenizer, [prompt], eos=None, **options).token_ids
        assert ours == expected
        alone += ours
    assert run(lm, tokenizer, PROMPTS, eos=None, **options).token_ids == alone
    assert alone != run(lm, tokenizer, PROMPTS, eos=None, num_beams=num_beams, max_new_tokens=12).token_ids


def test_top_k_and_top_p_filters() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert torch.isinf(top_k_filter(logits, top_k=2)).tolist() == [[True, False, True, False]]
    probs = logits.softmax(-1)[0]  # ~ [0.03, 0.64, 0.09, 0.24]
    kept = ~torch.isinf(top_p_filter(logits, top_p=0.8))
    assert kept.tolist() == [[False, True, False, True]] and probs[1] + probs[3] >= 0.8
    assert (~torch.isinf(top_p_filter(logits, top_p=0.01))).sum() == 1  # always keeps the best token


# --- stopping, lengths, streaming -----------------------------------------------------------------------


def test_max_new_tokens_is_respected(model: tuple[Any, Any]) -> None:
    lm, tokenizer = model
    result = run(lm, tokenizer, PROMPTS, max_new_tokens=7)
    assert [len(ids) for ids in result.token_ids] == [7, 7, 7]
    assert result.finish_reasons == ["length"] * 3


def test_stop_string_spanning_tokens_cuts_text_and_stops_early(model: tuple[Any, Any]) -> None:
    lm, tokenizer = model
    free = run(lm, tokenizer, PROMPTS[:1], max_new_tokens=24)
    stop, last_index = clean_stop_string(tokenizer, free.token_ids[0])
    result = run(lm, tokenizer, PROMPTS[:1], max_new_tokens=24, stop=(stop,))
    full_text = free.texts[0]
    assert result.texts == [full_text[: full_text.index(stop)]]
    assert result.finish_reasons == ["stop"]
    assert len(result.token_ids[0]) <= last_index + 1 < 24
    assert result.token_ids[0] == free.token_ids[0][: len(result.token_ids[0])]


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [False, True])
def test_stream_joined_equals_generate(model: tuple[Any, Any], sampling: bool) -> None:
    lm, tokenizer = model
    free = run(lm, tokenizer, PROMPTS[:1], max_new_tokens=24)
    stop, _ = clean_stop_string(tokenizer, free.token_ids[0])
    kwargs = dict(max_new_tokens=24, stop=(stop, "never-appears"))
    if sampling:
        kwargs.update(temperature=0.8, top_p=0.9, top_k=50, seed=3)
    for options in (kwargs, {**kwargs, "stop": ()}):
        config = GenerationConfig.from_kwargs(**options)
        embeds, mask = embed(lm, tokenizer, PROMPTS[:1])
        common = dict(inputs_embeds=embeds, attention_mask=mask, tokenizer=tokenizer, config=config)
        deltas = list(stream(lm, **common, eos_token_ids=NO_EOS))
        assert "".join(deltas) == generate(lm, **common, eos_token_ids=NO_EOS).texts[0]
        # only the final delta may end in U+FFFD (bytes that never completed a character)
        assert all(deltas) and not any(d.endswith("\ufffd") for d in deltas[:-1])


def test_stream_rejects_beams_and_batches(models: dict[str, tuple[Any, Any]]) -> None:
    lm, tokenizer = models["llama"]
    embeds, mask = embed(lm, tokenizer, PROMPTS)
    with pytest.raises(ValueError, match="num_beams"):
        stream(
            lm,
            inputs_embeds=embeds[:1],
            attention_mask=mask[:1],
            tokenizer=tokenizer,
            config=GenerationConfig(num_beams=2),
        )
    with pytest.raises(ValueError, match="batch of 1"):
        stream(lm, inputs_embeds=embeds, attention_mask=mask, tokenizer=tokenizer, config=GenerationConfig())


def test_stream_safe_holds_back_partial_characters_and_stop_prefixes() -> None:
    stops = StopStrings(tokenizer=None, stops=("</end>", "##"))
    assert stops.stream_safe("hello \ufffd") == "hello "
    assert stops.stream_safe("hello </en") == "hello "
    assert stops.stream_safe("a #") == "a "
    assert stops.stream_safe("a <b") == "a <b"
    assert stops.cut("x ## y </end>") == "x "


def test_right_padding_is_rejected(models: dict[str, tuple[Any, Any]]) -> None:
    lm, tokenizer = models["llama"]
    embeds, mask = embed(lm, tokenizer, PROMPTS)
    with pytest.raises(ValueError, match="left padded"):
        generate(
            lm,
            inputs_embeds=embeds,
            attention_mask=mask.flip(-1),
            tokenizer=tokenizer,
            config=GenerationConfig(),
        )


# --- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2, temperature=0.7), "num_beams"),
        (dict(stop=("ok", "")), "stop"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_config_validation_names_the_argument(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GenerationConfig.from_kwargs(**kwargs)
    with pytest.raises(ValueError, match=name):
        GenerationConfig(**kwargs).validate()


def test_config_from_kwargs() -> None:
    with pytest.raises(TypeError, match="max_tokens"):
        GenerationConfig.from_kwargs(max_tokens=3)
    config = GenerationConfig.from_kwargs(stop="###", temperature=0.5, seed=1)
    assert config.stop == ("###",) and config.do_sample and config.seed == 1
    assert GenerationConfig.from_kwargs(stop=None).stop == ()
    assert GenerationConfig(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
