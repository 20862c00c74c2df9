"""Speculative greedy decoding: a float16 draft proposes, the float32 LM verifies; the answer never changes."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tiny import left_padded_embeds as embed
from tiny import save_tokenizer
from vlmkit.generation import DecodeOptions, GenerationConfig, backend, generate, stream
from vlmkit.generation.cpu_llama import draft as draft_module
from vlmkit.generation.cpu_llama import speculative, twins
from vlmkit.generation.cpu_llama.draft import Float16Draft, float16_draft
from vlmkit.generation.cpu_llama.lean_step import lean_hidden
from vlmkit.generation.cpu_llama.speculative import DraftLength, speculative_round
from vlmkit.generation.kv_cache import cache_kwarg, new_cache

SPECULATIVE = DecodeOptions(speculative=4)
PROMPTS = ("What colour is the circle?", "USER: Describe the image. ASSISTANT:", "yes")


pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not twins.fbgemm_available(), reason="the float16 draft needs fbgemm"),
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A small Llama (GQA) with sharpened weights, so greedy answers wander over the vocabulary and drafts get
    rejected as well as accepted, and exact ties between candidates are unlikely."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=420, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3, attn_implementation="sdpa")  # fmt: skip
    lm = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for weight in lm.parameters():
            if weight.dim() == 2:
                weight.mul_(4.0)
    directory = save_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return lm, AutoTokenizer.from_pretrained(directory)


def _generate(model: tuple[Any, Any], prompt: str, options: DecodeOptions | None, **kwargs: Any) -> Any:
    lm, tokenizer = model
    embeds, mask = embed(lm, tokenizer, [prompt])
    eos = kwargs.pop("eos", [])
    config = GenerationConfig.from_kwargs(**{"max_new_tokens": 24, **kwargs})
    return generate(lm, inputs_embeds=embeds, attention_mask=mask, tokenizer=tokenizer, config=config,
                    eos_token_ids=eos, options=options)  # fmt: skip


def _noisy(lm: Any, scale: float = 0.3) -> Any:
    """A worse draft than float16: the model with noise on every matrix, so it is often wrong."""
    noisy = copy.deepcopy(lm)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in noisy.parameters():
            if weight.dim() == 2:
                weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * scale)
    return Float16Draft(noisy)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize(
    ("draft_tokens", "which"), [(1, "float16"), (3, "float16"), (7, "float16"), (16, "float16"), (3, "noisy")]
)
def test_speculative_greedy_equals_plain_greedy(
    llama, prompt: str, draft_tokens: int, which: str, monkeypatch
):
    rounds: list[tuple[int, int]] = []  # (proposals, tokens decided) per round

    def counted(*args: Any, **kwargs: Any) -> list[int]:
        decided = speculative_round(*args, **kwargs)
        rounds.append((kwargs["count"], len(decided)))
        return decided

    monkeypatch.setattr(speculative, "speculative_round", counted)
    if which == "noisy":
        monkeypatch.setattr(backend, "float16_draft", lambda lm, twins: _noisy(lm))
    plain = _generate(llama, prompt, None)
    assert _generate(llama, prompt, DecodeOptions(speculative=draft_tokens)) == plain
    # the speculative loop really ran and decided every token after the prefill's
    assert rounds and sum(decided for _, decided in rounds) == len(plain.token_ids[0]) - 1
    accepted = sum(decided - 1 for _, decided in rounds)
    proposed = sum(count for count, _ in rounds)
    if which == "float16":
        assert accepted >= 0.9 * proposed, rounds  # float16 weights rarely change the argmax
    else:
        assert 0 < accepted < proposed, rounds  # accepted and rejected proposals both occur


def test_eos_stop_strings_and_length_end_where_plain_decoding_ends(llama) -> None:
    plain = _generate(llama, PROMPTS[1], None, max_new_tokens=30)
    tokens = plain.token_ids[0]
    eos = tokens[9]  # a token the answer reaches mid-way: both loops must stop right before its first use
    for kwargs in (
        {"eos": [eos]},
        {"max_new_tokens": 5},
        {"max_new_tokens": 1},
        {"stop": plain.texts[0][4:7]},
    ):
        expected = _generate(llama, PROMPTS[1], None, **{"max_new_tokens": 30, **kwargs})
        assert _generate(llama, PROMPTS[1], SPECULATIVE, **{"max_new_tokens": 30, **kwargs}) == expected
    lm, tokenizer = llama
    embeds, mask = embed(lm, tokenizer, [PROMPTS[1]])
    config = GenerationConfig(max_new_tokens=30)
    text = "".join(stream(lm, inputs_embeds=embeds, attention_mask=mask, tokenizer=tokenizer, config=config,
                          eos_token_ids=[], options=SPECULATIVE))  # fmt: skip
    assert text == plain.texts[0]


def test_sampling_penalties_and_batches_decode_as_usual(llama) -> None:
    for kwargs in ({"temperature": 0.8, "seed": 5}, {"repetition_penalty": 1.4}):
        assert _generate(llama, PROMPTS[0], SPECULATIVE, **kwargs) == _generate(
            llama, PROMPTS[0], None, **kwargs
        )
    lm, tokenizer = llama
    embeds, mask = embed(lm, tokenizer, PROMPTS)
    config = GenerationConfig(max_new_tokens=12)
    run = dict(
        inputs_embeds=embeds, attention_mask=mask, tokenizer=tokenizer, config=config, eos_token_ids=[]
    )
    assert generate(lm, **run, options=SPECULATIVE) == generate(lm, **run)


def _prefilled(lm: Any, tokenizer: Any) -> tuple[Any, int, int]:
    embeds, mask = embed(lm, tokenizer, [PROMPTS[0]])
    cache = new_cache(lm)
    with torch.no_grad():
        logits = lm(inputs_embeds=embeds, use_cache=True, **{cache_kwarg(lm): cache}).logits[:, -1]
    return cache, int(logits.argmax()), mask.shape[1]


@torch.no_grad()
def test_one_pass_over_several_tokens_equals_one_token_at_a_time(llama) -> None:
    """The verification pass (causal mask over the new tokens, on top of the cache) is the decode step's maths."""
    lm, tokenizer = llama
    cache_a, token, length = _prefilled(lm, tokenizer)
    cache_b = copy.deepcopy(cache_a)
    ids = torch.tensor([[token, 5, 77, 31]])
    together = lean_hidden(
        lm, input_ids=ids, position_ids=torch.arange(length, length + 4)[None], cache=cache_a
    )
    apart = torch.cat([
        lean_hidden(lm, input_ids=ids[:, i : i + 1], position_ids=torch.tensor([[length + i]]), cache=cache_b)
        for i in range(4)
    ], 1)  # fmt: skip
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache_a.layers[1].keys, cache_b.layers[1].keys, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_rounds_accept_what_the_model_agrees_with_and_crop_the_rest(llama) -> None:
    lm, tokenizer = llama
    cache, token, length = _prefilled(lm, tokenizer)
    # a draft that proposes the model's own tokens: every proposal is accepted, plus the model's bonus token
    decided = speculative_round(lm, _Exact(lm), token=token, position=length, cache=cache, count=4)
    assert len(decided) == 5 and cache.layers[0].keys.shape[-2] == length + 5
    # a draft that always proposes the least likely token: nothing accepted, the model's own token decided
    contrary = copy.deepcopy(lm)
    contrary.lm_head.weight.neg_()
    decided2 = speculative_round(
        lm, Float16Draft(contrary), token=decided[-1], position=length + 5, cache=cache, count=4
    )
    assert len(decided2) == 1 and cache.layers[0].keys.shape[-2] == length + 6
    plain = _generate(llama, PROMPTS[0], None, max_new_tokens=7).token_ids[0]
    assert [token, *decided, *decided2] == plain


class _Exact:
    """A draft that proposes exactly what the float32 model would (through the lean step itself)."""

    def __init__(self, lm: Any) -> None:
        self.lm = lm

    def propose(
        self, *, token: int, position: int, count: int, cache: Any, stop: frozenset[int]
    ) -> list[int]:
        out: list[int] = []
        for step in range(count):
            ids = torch.tensor([[out[-1] if out else token]])
            hidden = lean_hidden(
                self.lm, input_ids=ids, position_ids=torch.tensor([[position + step]]), cache=cache
            )
            out.append(int(self.lm.lm_head(hidden[:, -1]).argmax()))
        return out


@torch.no_grad()
def test_the_float16_draft_proposes_what_the_model_would(llama) -> None:
    """The fused float16 step is the model's maths up to float16 weights: same greedy tokens here, and it writes
    the same keys and values into the cache (up to float16 rounding)."""
    lm, tokenizer = llama
    cache_a, token, length = _prefilled(lm, tokenizer)
    cache_b = copy.deepcopy(cache_a)
    cache = twins.TwinCache()
    draft = float16_draft(lm, twins=cache)
    assert draft is not None and float16_draft(lm, twins=cache) is draft  # cached
    proposals = draft.propose(token=token, position=length, count=6, cache=cache_a, stop=frozenset())
    assert proposals == _Exact(lm).propose(
        token=token, position=length, count=6, cache=cache_b, stop=frozenset()
    )
    torch.testing.assert_close(cache_a.layers[2].values, cache_b.layers[2].values, rtol=2e-2, atol=2e-2)
    # drafting ends right after an end-of-sequence token
    cache_c = copy.deepcopy(cache_b)
    _crop = speculative._crop
    _crop(cache_c, length)
    short = draft.propose(
        token=token, position=length, count=6, cache=cache_c, stop=frozenset({proposals[2]})
    )
    assert short == proposals[: proposals.index(proposals[2]) + 1]


def test_weights_beyond_float16_get_no_draft(llama) -> None:
    lm = copy.deepcopy(llama[0])
    with torch.no_grad():
        lm.model.layers[1].mlp.up_proj.weight[0, 0] = 1e6
    assert float16_draft(lm, twins=twins.TwinCache()) is None


def test_draft_length_grows_shrinks_and_gives_up_on_a_poor_draft() -> None:
    length = DraftLength(8)
    length.update(proposed=8, accepted=8)
    assert length.next == 8  # capped
    length.update(proposed=8, accepted=3)
    assert length.next == 7
    length.update(proposed=7, accepted=7)
    assert length.next == 8
    poor = DraftLength(4)
    poor.update(proposed=4, accepted=1)
    poor.update(proposed=3, accepted=0)
    assert poor.next == 2  # fewer than 8 proposals so far: keeps trying
    poor.update(proposed=2, accepted=0)
    assert poor.next == 0  # 1 of 9 accepted: plain one-token passes from now on


def test_a_poor_draft_falls_back_to_plain_passes_and_the_answer_holds(llama, monkeypatch) -> None:
    rounds: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> list[int]:
        rounds.append(kwargs["count"])
        return speculative_round(*args, **kwargs)

    monkeypatch.setattr(speculative, "speculative_round", counted)
    monkeypatch.setattr(backend, "float16_draft", lambda lm, twins: _noisy(lm, scale=3.0))
    plain = _generate(llama, PROMPTS[0], None)
    assert _generate(llama, PROMPTS[0], DecodeOptions(speculative=4)) == plain
    assert 0 in rounds and rounds[-1] == 0  # gave up drafting


def test_auto_speculation_only_for_greedy_batch1_requests_on_big_lms(llama, monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(speculative, "speculative_round", lambda *a, **k: calls.append(k["count"]) or
                        speculative_round(*a, **k))  # fmt: skip
    plain = _generate(llama, PROMPTS[0], DecodeOptions(speculative=0))
    assert _generate(llama, PROMPTS[0], DecodeOptions()) == plain and not calls  # small LM: no draft
    monkeypatch.setattr(twins, "ONEDNN_MIN_BYTES", 0)  # now "too big for the caches"
    if twins.onednn_available():
        assert _generate(llama, PROMPTS[0], DecodeOptions()) == plain
        assert calls and calls[0] == backend.AUTO_DRAFT_TOKENS
    calls.clear()
    _generate(llama, PROMPTS[0], DecodeOptions(), temperature=0.7, seed=1)
    assert not calls
    if (
        twins.onednn_available()
    ):  # a draft auto mode cannot afford: plain decoding; an explicit N still drafts
        monkeypatch.setattr(draft_module, "AUTO_MAX_BYTES", 0)
        assert _generate(llama, PROMPTS[0], DecodeOptions()) == plain and not calls
        assert (
            _generate(llama, PROMPTS[0], DecodeOptions(speculative=3)) == plain and calls and max(calls) == 3
        )
        monkeypatch.setattr(draft_module, "AUTO_MAX_BYTES", 1 << 30)
        monkeypatch.setattr(draft_module, "_available_memory", lambda: 1000)
        assert not draft_module.affordable(llama[0])


def test_decode_options_check_speculative() -> None:
    for bad in (-1, 17, 2.0, True, "4"):
        with pytest.raises(ValueError, match="speculative"):
            DecodeOptions(speculative=bad)  # type: ignore[arg-type]
    assert DecodeOptions(speculative=0).speculative == 0
    assert DecodeOptions().speculative is None


@torch.no_grad()
def test_the_float16_draft_handles_biases_and_grouped_heads() -> None:
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                         attn_implementation="sdpa")  # fmt: skip
    lm = LlamaForCausalLM(config).eval()
    for module in lm.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            module.bias.normal_(std=0.5)  # biases that matter
        if isinstance(module, torch.nn.Linear):
            module.weight.mul_(4.0)
    cache_a = new_cache(lm)
    lm(inputs_embeds=torch.randn(1, 7, 64), use_cache=True, **{cache_kwarg(lm): cache_a})
    cache_b = copy.deepcopy(cache_a)
    proposals = Float16Draft(lm).propose(token=5, position=7, count=8, cache=cache_a, stop=frozenset())
    assert proposals == _Exact(lm).propose(token=5, position=7, count=8, cache=cache_b, stop=frozenset())
    torch.testing.assert_close(cache_a.layers[1].keys, cache_b.layers[1].keys, rtol=2e-2, atol=2e-2)
