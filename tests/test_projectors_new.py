"""The cross-attn (text-conditioned) and pixel-shuffle projectors: exact maths, prompt conditioning without
leaks (padding, answers), batch == single, cached decode == teacher-forced recompute, training, save / load."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.api import VLM
from vlmkit.config import ProjectorConfig
from vlmkit.models.convert.export import unrepresentable_reasons
from vlmkit.models.projectors import build_projector
from vlmkit.models.projectors.pixel_shuffle import pixel_shuffle
from vlmkit.processing.processor import Sample
from vlmkit.processing.prompting import IGNORE_INDEX, pad_batch

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- pixel shuffle


def test_pixel_shuffle_groups_each_block_of_neighbours():
    side, r, dim = 6, 3, 2
    grid = torch.arange(side * side * dim, dtype=torch.float32).view(1, side * side, dim)
    out = pixel_shuffle(grid, factor=r)
    assert out.shape == (1, (side // r) ** 2, r * r * dim)
    square = grid.view(side, side, dim)
    for block_row in range(side // r):
        for block_col in range(side // r):
            block = square[block_row * r : (block_row + 1) * r, block_col * r : (block_col + 1) * r]
            assert torch.equal(out[0, block_row * (side // r) + block_col], block.reshape(-1))


def test_pixel_shuffle_projector_counts_and_refuses_odd_grids():
    projector = build_projector(
        config=ProjectorConfig(type="pixel-shuffle", shuffle_factor=2), in_dim=8, out_dim=12
    )
    assert projector.num_output_tokens(16) == 4 and projector(torch.randn(3, 16, 8)).shape == (3, 4, 12)
    for tokens in (17, 9):  # a CLS token on a 4x4 grid; a 3x3 grid that r=2 does not divide
        with pytest.raises(ValueError, match="shuffle_factor=2"):
            projector.num_output_tokens(tokens)


# ---------------------------------------------------------------------------------------------- cross-attn


def test_cross_attn_starts_as_its_mlp_and_every_part_gets_gradients():
    torch.manual_seed(0)
    projector = build_projector(config=ProjectorConfig(type="cross-attn", num_heads=2), in_dim=8, out_dim=16)
    features, text = torch.randn(2, 5, 8), torch.randn(2, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.bool)
    assert torch.equal(projector(features, text=text, text_mask=mask), projector.mlp(features))
    with torch.no_grad():
        for layer in projector.layers:
            layer.gate_attn.fill_(0.5), layer.gate_ffn.fill_(0.5)
    projector(features, text=text, text_mask=mask).pow(2).sum().backward()
    for name, param in projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.fixture(scope="module")
def cross_vlm(parts):
    """A cross-attn model whose gates are open, as after training (at init they are 0: an MLP projector)."""
    vlm = VLM.build(
        vision=parts["clip"], language=parts["llama"], projector=ProjectorConfig(type="cross-attn")
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in vlm.model.projector.layers:
            layer.gate_attn.fill_(0.8), layer.gate_ffn.fill_(0.8)
            layer.null_kv.normal_()
    return vlm


def _image_embeds(vlm: VLM, prompts: list[str], image) -> list[torch.Tensor]:
    """The LM-space image tokens each prompt's row gets, in one left-padded batch (as ``ask_batch`` builds it)."""
    samples = [Sample(messages=vlm.processor.user_prompt(p, num_images=1), images=[image]) for p in prompts]
    embeds, _mask = vlm._prefill_inputs(samples)
    rows = [vlm.processor.encode_sample(s, add_generation_prompt=True, with_labels=False) for s in samples]
    ids = pad_batch(rows, pad_token_id=vlm.processor.pad_token_id, side="left")["input_ids"]
    is_image = ids == vlm.config.prompt.image_token_id
    return [embeds[i][is_image[i]] for i in range(len(prompts))]


def test_cross_attn_reads_the_prompt_but_not_the_padding(cross_vlm, images):
    vlm = cross_vlm.enable_caches(feature_cache_bytes=0)
    alone = _image_embeds(vlm, ["What colour is it?"], images[0])[0]
    other = _image_embeds(vlm, ["How many circles are there?"], images[0])[0]
    padded = _image_embeds(vlm, ["What colour is it?", "Describe the image in a few words, left to right."],
                           images[0])[0]  # fmt: skip
    assert (alone - other).abs().max() > 1e-3  # the prompt changes the image's tokens
    assert (alone - padded).abs().max() <= 1e-6  # padding does not


def test_cross_attn_batch_equals_single_and_stream_equals_ask(cross_vlm, images):
    vlm = cross_vlm.enable_caches(feature_cache_bytes=0)
    prompts = ["What colour is it?", "Which image has more circles? Answer left or right."]
    batch = vlm.ask_batch(prompts, images=[[images[0]], [images[1]]], max_new_tokens=6)
    assert batch == [
        vlm.ask(p, images=[im], max_new_tokens=6) for p, im in zip(prompts, images, strict=False)
    ]
    assert "".join(vlm.stream(prompts[0], images=[images[0]], max_new_tokens=6)) == batch[0]


def test_cached_decode_equals_teacher_forced_recompute_with_answers_masked(cross_vlm, images):
    """Greedy decoding with a KV cache == argmax of one full forward over prompt + answer, where the answer
    tokens are labels: the projector reads the same prompt in both, so training sees what inference sees."""
    vlm = cross_vlm.enable_caches(feature_cache_bytes=0)
    sample = Sample(
        messages=vlm.processor.user_prompt("What colour is it?", num_images=1), images=[images[0]]
    )
    answer = vlm.generate([sample], max_new_tokens=8).token_ids[0]
    row = vlm.processor.encode_sample(sample, add_generation_prompt=True, with_labels=False)
    prompt_ids = torch.as_tensor(row.input_ids)
    ids = torch.cat([prompt_ids, torch.tensor(answer)]).unsqueeze(0)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, len(prompt_ids) :] = ids[0, len(prompt_ids) :]
    pixels = vlm.processor.image_processor([images[0]])
    with torch.no_grad():
        logits = vlm.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                           labels=labels).logits  # fmt: skip
        leaky = vlm.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
    steps = range(len(prompt_ids) - 1, ids.shape[1] - 1)
    assert [int(logits[0, i].argmax()) for i in steps] == answer
    assert not torch.allclose(logits, leaky)  # without labels the answer would condition the image


def test_cross_attn_feature_cache_keeps_the_tower_output(cross_vlm, images):
    vlm = cross_vlm.enable_caches()
    first = vlm.ask("What colour is it?", images=[images[2]], max_new_tokens=4)
    second = vlm.ask("How many circles are there?", images=[images[2]], max_new_tokens=4)
    stats = vlm.feature_cache.stats()
    assert stats["hits"] == 1 and stats["entries"] == 1
    (cached,) = vlm.feature_cache._memory.values()
    assert cached.shape == (vlm.model.vision.num_tokens, vlm.model.vision.hidden_size)  # not LM-space
    uncached = VLM(model=vlm.model, tokenizer=vlm.tokenizer, feature_cache_bytes=0, prefix_cache_bytes=0)
    assert [first, second] == [uncached.ask(p, images=[images[2]], max_new_tokens=4)
                               for p in ("What colour is it?", "How many circles are there?")]  # fmt: skip


def test_export_refuses_the_new_projectors(parts):
    for kind in ("cross-attn", "pixel-shuffle"):
        vlm = VLM.build(vision=parts["clip"], language=parts["llama"], projector=kind)
        assert any(f"projector {kind!r}" in reason for reason in unrepresentable_reasons(vlm.model))


# ---------------------------------------------------------------------------------------------- training


def colour_data(root):
    """Solid-colour images; two questions per image, so a text-conditioned projector has something to read."""
    import json

    from PIL import Image

    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}
    records = []
    for i, (name, rgb) in enumerate(colours.items()):
        Image.new("RGB", (32, 32), rgb).save(root / f"{name}.png")
        for question, answer in (("What colour is the image?", name), ("Is the image red?",
                                                                       "yes" if name == "red" else "no")):  # fmt: skip
            records.append({"id": f"{i}-{answer}", "image": f"{name}.png",
                            "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                              {"from": "gpt", "value": answer}]})  # fmt: skip
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root / "train.jsonl"


def train_and_round_trip(vlm: VLM, data, out, *, steps: int = 80):
    """Train (full stage) and return (loss before, loss after, the model loaded back from ``out``)."""
    from vlmkit.data.dataset import ConversationDataset, collate, read_records
    from vlmkit.training.config import TrainConfig
    from vlmkit.training.objectives import TokenLoss
    from vlmkit.training.session import train
    from vlmkit.training.stages import StageConfig

    def loss(model: VLM) -> tuple[float, torch.Tensor]:
        dataset = ConversationDataset(read_records(data), processor=model.processor, image_folder=data.parent)
        batch = collate([dataset[i] for i in range(len(dataset))], pad_token_id=model.processor.pad_token_id,
                        image_size=model.config.vision.image_size)  # fmt: skip
        with torch.no_grad():
            value = TokenLoss(model.model.eval())(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                  labels=batch.labels, pixel_values=batch.pixel_values)  # fmt: skip
            logits = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 pixel_values=batch.pixel_values, labels=batch.labels).logits  # fmt: skip
        return float(value) / batch.num_target_tokens, logits

    before, _ = loss(vlm)
    config = TrainConfig(data=data, out=out, stage=StageConfig(stage="full", lr=3e-3), batch_size=4,
                         max_steps=steps, warmup_ratio=0.0, progress=False, plot=False)  # fmt: skip
    train(vlm, config)
    loaded = VLM.from_pretrained(out)
    after, logits = loss(loaded)
    again = VLM.from_pretrained(loaded.save_pretrained(out.parent / "again"))
    assert torch.equal(loss(again)[1], logits)  # identical logits after another save / load
    return before, after, loaded


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cross-attn", "pixel-shuffle"])
def test_new_projectors_train_and_round_trip(parts, tmp_path, kind):
    data = colour_data(tmp_path)
    vlm = VLM.build(vision=parts["clip"], language=parts["llama"], projector=kind)
    start = {k: v.clone() for k, v in vlm.model.projector.state_dict().items()}
    before, after, loaded = train_and_round_trip(vlm, data, tmp_path / "out")
    assert after < 0.2 * before, (before, after)
    moved = [k for k, v in loaded.model.projector.state_dict().items() if not torch.equal(v, start[k])]
    assert len(moved) == len(start)  # every projector tensor trained (for cross-attn: the gates opened too)


def test_cross_attn_refuses_anyres_tiling(parts):
    with pytest.raises(ValueError, match="AnyRes tiling does not combine"):
        VLM.build(vision=parts["clip"], language=parts["llama"], projector="cross-attn", resolution="anyres")


@pytest.mark.slow
def test_cross_attn_through_the_server(cross_vlm, images):
    """The server's batched and streamed answers equal ``chat`` on the same messages."""
    pytest.importorskip("fastapi")
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    from starlette.testclient import TestClient

    from vlmkit.serving.app import create_app

    buffer = io.BytesIO()
    images[0].save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    vlm = cross_vlm.enable_caches()

    def messages(question: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]  # fmt: skip

    questions = ["What colour is it?", "How many circles are there on the left side?"]
    expected = [vlm.chat(messages(q), max_new_tokens=6) for q in questions]
    with TestClient(create_app(vlm)) as http:

        def post(question: str, stream: bool = False):
            body = {"messages": messages(question), "max_tokens": 6, "temperature": 0, "stream": stream}
            return http.post("/v1/chat/completions", json=body)

        with ThreadPoolExecutor(2) as pool:  # concurrent: the engine may batch them
            replies = list(pool.map(post, questions))
        assert [r.json()["choices"][0]["message"]["content"] for r in replies] == expected
        events = [
            line[6:] for line in post(questions[1], True).text.splitlines() if line.startswith("data: ")
        ]
        chunks = [
            json.loads(e)["choices"][0]["delta"].get("content", "")
            for e in events[:-1]
            if json.loads(e)["choices"]
        ]
        assert "".join(chunks) == expected[1]


@pytest.mark.slow
def test_projector_benchmark_dry_run(tmp_path):
    """benchmarks/projectors.py end to end at tiny sizes: synth data, training, eval, interleaved timing, JSON."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "projectors.py"
    out = tmp_path / "projectors.json"
    run = subprocess.run([sys.executable, str(script), "--dry-run", "--projectors", "cross-attn,pixel-shuffle",
                          "--work", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert (
        results["pixel-shuffle"]["visual_tokens_per_image"] == 16
        and results["cross-attn"]["timing"]["rounds"] == 1
    )
