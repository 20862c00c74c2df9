"""Training on CPU with tiny parts: each stage learns and freezes what it should, exact resume, loss
normalisation under accumulation, skipped samples, the feature cache, DDP on gloo, and the CLI.

The data: solid-colour 32x32 images, "What colour is the image?" -> the colour name.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import typer
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from vlmkit.api import VLM
from vlmkit.data.dataset import ConversationDataset, collate, read_records
from vlmkit.training.checkpoint import FINAL_STATE, TRAINER_FILE
from vlmkit.training.config import TrainConfig
from vlmkit.training.loop import Trainer
from vlmkit.training.lora import load_adapters, merge_lora
from vlmkit.training.objectives import TokenLoss, where_loss, where_readout
from vlmkit.training.session import RunSession, train
from vlmkit.training.stages import StageConfig

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}
QUESTION = "<image>\nWhat colour is the image?"


pytestmark = pytest.mark.usefixtures("one_thread")


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def colour_records(n: int, *, prefix: str = "") -> list[dict]:
    names = list(COLOURS)
    return [{"id": f"{prefix}{i}", "image": f"{names[i % 4]}.png",
             "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": names[i % 4]}]}
            for i in range(n)]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(root / f"{name}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    write_records(root / "train.jsonl", colour_records(16))
    write_records(root / "eval.jsonl", colour_records(4, prefix="eval-"))
    bad = colour_records(8)
    bad[2]["image"], bad[5]["image"] = "corrupt.png", "missing.png"
    bad.append(
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}],
        }
    )
    write_records(root / "bad.jsonl", bad)
    return root


def fresh(parts) -> VLM:
    return VLM.build(vision=parts["clip"], language=parts["llama"], projector="mlp")


def config(data: Path, out: Path, stage: StageConfig, **kwargs) -> TrainConfig:
    defaults = dict(batch_size=4, max_steps=30, warmup_ratio=0.0, progress=False, plot=False)
    return TrainConfig(data=data / "train.jsonl", out=out, stage=stage, **(defaults | kwargs))


def mean_loss(vlm: VLM, data: Path) -> float:
    """Mean next-token loss per target token over train.jsonl."""
    dataset = ConversationDataset(
        read_records(data / "train.jsonl"), processor=vlm.processor, image_folder=data
    )
    batch = collate(
        [dataset[i] for i in range(len(dataset))], pad_token_id=vlm.processor.pad_token_id, image_size=32
    )
    with torch.no_grad():
        loss = TokenLoss(vlm.model.eval())(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                           labels=batch.labels, pixel_values=batch.pixel_values)  # fmt: skip
    return float(loss) / batch.num_target_tokens


def weights(vlm: VLM) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in vlm.model.named_parameters()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {
        part for name, t in before.items() if not torch.equal(t, after[name]) for part in [name.split(".")[0]]
    }


@pytest.fixture(scope="module")
def pretrained(parts, data, tmp_path_factory) -> Path:
    """A model whose LM has learned the task (full stage): the starting point LLaVA's stage 1 assumes."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    train(fresh(parts), config(data, out, StageConfig(stage="full", lr=5e-3), max_steps=60, batch_size=8))
    return out


# ------------------------------------------------------------------------------------------------ stages


def test_full_stage_learns_and_keeps_the_frozen_tower(parts, data, tmp_path):
    vlm = fresh(parts)
    before, loss_before = weights(vlm), mean_loss(vlm, data)
    result = train(vlm, config(data, tmp_path / "out", StageConfig(stage="full", lr=3e-3)))
    assert result.steps == 30 and result.stopped == "done"
    loaded = VLM.from_pretrained(tmp_path / "out")
    assert mean_loss(loaded, data) < 0.5 * loss_before
    assert changed(before, weights(loaded)) == {"projector", "language_model"}


def test_projector_stage_trains_only_the_projector(pretrained, data, tmp_path):
    vlm = VLM.from_pretrained(pretrained)
    torch.manual_seed(1)
    for layer in (vlm.model.projector.linear_1, vlm.model.projector.linear_2):
        layer.reset_parameters()  # a fresh projector in front of an LM that knows the task
    before, loss_before = weights(vlm), mean_loss(vlm, data)
    train(vlm, config(data, tmp_path / "out", StageConfig(stage="projector", lr=1e-2)))
    loaded = VLM.from_pretrained(tmp_path / "out")
    assert mean_loss(loaded, data) < 0.3 * loss_before
    assert changed(before, weights(loaded)) == {"projector"}


def test_lora_stage_changes_only_adapters_and_projector(parts, data, tmp_path):
    vlm = fresh(parts)
    before, loss_before = weights(vlm), mean_loss(vlm, data)
    snapshot: dict[str, torch.Tensor] = {}
    stage = StageConfig(stage="lora", lr=1e-2, lora_rank=8, lora_alpha=16, lora_dropout=0.0)
    train(vlm, config(data, tmp_path / "out", stage), on_step=lambda step: snapshot.update(weights(vlm)))
    # before the merge: base weights bitwise unchanged; only lora_* and the projector moved
    moved = {n for n, t in snapshot.items() if ".lora_" in n or n.startswith("projector.")}
    base = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): t
        for n, t in snapshot.items()
        if n not in moved
    }
    assert base.keys() == {n for n in before if not n.startswith("projector.")}
    assert all(torch.equal(before[n], t) for n, t in base.items())
    assert all(
        n.startswith("projector.") or ".lora_" in n
        for n in load_file(tmp_path / "out" / FINAL_STATE / "trainable.safetensors")
    )
    # the saved model is merged and loads as a plain model; the adapter re-applied to the base gives the same
    loaded = VLM.from_pretrained(tmp_path / "out")
    assert mean_loss(loaded, data) < loss_before - 0.5
    rebuilt = merge_lora(load_adapters(fresh(parts), directory=tmp_path / "out" / "adapter"))
    assert all(torch.allclose(t, weights(loaded)[n], atol=1e-6) for n, t in weights(rebuilt).items())


@pytest.mark.parametrize(
    ("stage", "moved"),
    [(StageConfig(stage="full", freeze_vision=False, lr=1e-3), {"vision", "projector", "language_model"}),
     (StageConfig(stage="lora", lora_vision=True, lora_rank=4, lora_alpha=8, lr=1e-2),
      {"vision", "projector", "language_model"})],
    ids=["full-train-vision", "lora-vision"],
)  # fmt: skip
def test_options_that_train_the_tower(parts, data, tmp_path, stage, moved):
    vlm = fresh(parts)
    before = weights(vlm)
    trainer = Trainer(vlm, config(data, tmp_path / "out", stage, max_steps=3))
    assert trainer.cache is None  # a tower that changes cannot be cached
    RunSession(trainer).run()
    assert changed(before, weights(VLM.from_pretrained(tmp_path / "out"))) == moved
    if stage.lora_vision:
        assert (tmp_path / "out" / "adapter" / "vision" / "adapter_config.json").is_file()


# ----------------------------------------------------------------------------------- where objective


@pytest.fixture(scope="module")
def ramps(tmp_path_factory) -> Path:
    """Images whose colour runs left to right (red) and top to bottom (green), each with its own blue, so a
    patch's content says where it is: what a trained tower's tokens carry, and a random tiny one's do not."""
    root = tmp_path_factory.mktemp("ramps")
    ramp = torch.linspace(0, 255, 32)
    for i in range(8):
        pixels = torch.stack(
            [ramp.expand(32, 32), ramp[:, None].expand(32, 32), torch.full((32, 32), 30.0 * i)]
        )
        Image.fromarray(pixels.permute(1, 2, 0).byte().numpy()).save(root / f"{i}.png")
    records = [{"id": str(i), "image": f"{i % 8}.png", "conversations": [
        {"from": "human", "value": QUESTION}, {"from": "gpt", "value": "red"}]} for i in range(16)]  # fmt: skip
    write_records(root / "train.jsonl", records)
    return root


def where_accuracy(vlm: VLM, data: Path) -> float:
    """How often the fixed readout names the right grid cell (row and column) of each image token."""
    pixels = vlm.processor.image_processor([Image.open(data / f"{i}.png") for i in range(8)])
    with torch.no_grad():
        features = vlm.model.encode_images(pixels)  # [8, tokens, dim]
    _, tokens, dim = features.shape
    grid = math.isqrt(tokens)
    readout = where_readout(dim=dim, grid=grid, device=features.device)
    scores = torch.nn.functional.normalize(features.float(), dim=-1) @ readout
    index = torch.arange(tokens)
    rows_ok = scores[..., :grid].argmax(-1) == index // grid
    cols_ok = scores[..., grid:].argmax(-1) == index % grid
    return float((rows_ok & cols_ok).float().mean())


def test_where_loss_is_low_only_for_tokens_that_name_their_cell():
    grid, dim = 4, 32
    readout = where_readout(dim=dim, grid=grid, device=torch.device("cpu"))
    index = torch.arange(grid * grid)
    placed = readout[:, index // grid].T + readout[:, grid + index % grid].T  # [tokens, dim]
    assert float(where_loss(placed[None])) < 0.01
    assert float(where_loss(placed.flip(0)[None])) > 5  # the right directions on the wrong tokens
    with pytest.raises(ValueError, match="square grid"):
        where_loss(torch.randn(1, 15, dim))
    with pytest.raises(ValueError, match="at least 8 dims"):
        where_loss(torch.randn(1, 16, 6))


def test_where_weight_teaches_image_tokens_their_cell_and_leaves_the_logged_loss_alone(
    parts, ramps, tmp_path
):
    assert where_accuracy(fresh(parts), ramps) < 0.5
    runs = {}
    for weight in (0.0, 1.0):
        out = tmp_path / f"w{weight}"
        train(
            fresh(parts),
            config(ramps, out, StageConfig(stage="full", lr=3e-3), where_weight=weight, log_every=1),
        )
        runs[weight] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    where = [r["where_loss"] for r in runs[1.0] if "where_loss" in r]
    # same first batch, same weights: the logged next-token loss does not include the where term
    assert runs[1.0][0]["loss"] == pytest.approx(runs[0.0][0]["loss"], rel=1e-6)
    assert all("where_loss" not in r for r in runs[0.0])
    assert where[-1] < 0.3 * where[0]
    assert where_accuracy(VLM.from_pretrained(tmp_path / "w1.0"), ramps) > 0.9
    assert where_accuracy(VLM.from_pretrained(tmp_path / "w0.0"), ramps) < 0.5


def test_where_weight_rejects_bad_values_and_a_resampler(parts, data, tmp_path):
    with pytest.raises(ValueError, match="where_weight"):
        config(data, tmp_path / "a", StageConfig(stage="full"), where_weight=-1.0).validate()
    with pytest.raises(ValueError, match="where_weight"):
        config(data, tmp_path / "b", StageConfig(stage="full"), where_weight=float("nan")).validate()
    resampler = VLM.build(vision=parts["clip"], language=parts["llama"], projector="resampler")
    with pytest.raises(ValueError, match="resampler"):
        Trainer(resampler, config(data, tmp_path / "c", StageConfig(stage="full"), where_weight=0.5))


# ------------------------------------------------------------------------------------- exactness, resume


class Interrupt(Exception):
    pass


def test_interrupted_and_resumed_run_is_bitwise_identical(parts, data, tmp_path):
    # LoRA dropout and three epochs of reshuffled data exercise the RNG and data-order state
    stage = StageConfig(stage="lora", lr=1e-2, lora_rank=4, lora_alpha=8, lora_dropout=0.2)
    run = dict(max_steps=12, save_every=3, keep_last=2, batch_size=4)
    train(fresh(parts), config(data, tmp_path / "a", stage, **run))

    def crash(step: int) -> None:
        if step == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(fresh(parts), config(data, tmp_path / "b", stage, **run), on_step=crash)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == [
        "step-00000003",
        "step-00000006",
    ]
    train(fresh(parts), config(data, tmp_path / "b", stage, **run, resume=True))
    for name in (
        "model.safetensors",
        f"{FINAL_STATE}/trainable.safetensors",
        f"{FINAL_STATE}/optimizer.safetensors",
    ):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows_a, rows_b = ([json.loads(line) for line in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()]
                      for run_dir in ("a", "b"))  # fmt: skip
    assert [r["step"] for r in rows_b] == list(range(1, 13))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


def test_resume_refuses_a_different_run_and_fresh_run_refuses_a_used_out(parts, data, tmp_path):
    train(fresh(parts), config(data, tmp_path / "out", StageConfig(stage="projector"), max_steps=1))
    with pytest.raises(ValueError, match="--resume"):
        train(fresh(parts), config(data, tmp_path / "out", StageConfig(stage="projector"), max_steps=1))
    with pytest.raises(ValueError, match="batch_size"):
        train(fresh(parts), config(data, tmp_path / "out", StageConfig(stage="projector"), max_steps=2, batch_size=2,
                                   resume=True))  # fmt: skip


def test_max_minutes_stops_cleanly_and_the_run_resumes(parts, data, tmp_path):
    cfg = config(data, tmp_path / "out", StageConfig(stage="projector"), max_steps=3, max_minutes=0.0)
    result = train(fresh(parts), cfg)
    assert result.stopped == "max_minutes" and result.steps == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / FINAL_STATE).is_dir()
    cfg.max_minutes, cfg.resume = None, True
    assert train(fresh(parts), cfg).steps == 3


def test_schedule_steps_stops_partway_down_a_longer_schedule(parts, data, tmp_path):
    def lrs(out: Path, **kwargs) -> list[float]:
        train(fresh(parts), config(data, out, StageConfig(stage="projector"), warmup_ratio=0.2, **kwargs))
        return [
            r["lr"]["projector"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        ]

    full = lrs(tmp_path / "full", max_steps=10)
    assert lrs(tmp_path / "part", max_steps=4, schedule_steps=10) == full[:4]
    with pytest.raises(ValueError, match="shorter than the run"):
        lrs(tmp_path / "bad", max_steps=4, schedule_steps=3)


def test_accumulation_4x2_equals_batch_8(parts, data, tmp_path):
    """The loss is normalised by the target tokens of the whole accumulated batch, so the split is invisible."""
    # Adam's first step is lr * g / (|g| + eps): for |g| ~ eps it amplifies float noise, hence a small lr
    trainers = [Trainer(fresh(parts), config(data, tmp_path / f"r{i}", StageConfig(stage="full", lr=1e-4),
                                             batch_size=size, grad_accum=accum))
                for i, (size, accum) in enumerate([(8, 1), (2, 4)])]  # fmt: skip
    for trainer in trainers:
        trainer.backward(trainer.step_batches(0))
    grads = [{n: p.grad for n, p in t.model.named_parameters() if p.grad is not None} for t in trainers]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5) for n in grads[0])
    for trainer in trainers:
        trainer.optimizer_step()
    after = [weights(t.vlm) for t in trainers]
    assert all(torch.allclose(after[0][n], after[1][n], atol=1e-6) for n in after[0])


def test_corrupt_and_missing_images_are_skipped_counted_and_reported(parts, data, tmp_path):
    # micro-batches of one: the bad records leave empty micro-batches and the text-only record one that
    # touches no trainable weight of the projector stage; both must still step
    cfg = config(
        data, tmp_path / "out", StageConfig(stage="projector"), max_steps=5, batch_size=1, grad_accum=2
    )
    cfg.data = data / "bad.jsonl"
    result = train(fresh(parts), cfg)
    assert set(result.skipped) == {"2", "5"} and "missing.png" in result.skipped["5"]
    state = json.loads((tmp_path / "out" / FINAL_STATE / TRAINER_FILE).read_text())
    assert set(state["skipped"]) == {"2", "5"}


def test_feature_cache_encodes_each_image_once(parts, data, tmp_path):
    trainer = Trainer(
        fresh(parts), config(data, tmp_path / "out", StageConfig(stage="projector"), max_steps=8)
    )
    RunSession(trainer).run()
    assert trainer.cache.misses == 4 and trainer.cache.hits == 8 * 4 - 4  # 4 distinct images, 2 epochs of 16
    uncached = Trainer(fresh(parts), config(data, tmp_path / "plain", StageConfig(stage="projector"), max_steps=8,
                                            feature_cache=False))  # fmt: skip
    RunSession(uncached).run()
    assert uncached.cache is None
    a, b = weights(trainer.vlm), weights(uncached.vlm)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    # a different tower (or weights) is a different cache namespace
    other = fresh(parts)
    with torch.no_grad():
        next(other.model.vision.parameters()).add_(1.0)
    assert (
        Trainer(other, config(data, tmp_path / "o", StageConfig(stage="projector"))).cache.root
        != trainer.cache.root
    )


# ---------------------------------------------------------------------------------------------- DDP


DDP_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from vlmkit.api import VLM
    from vlmkit.training.config import TrainConfig
    from vlmkit.training.session import train
    from vlmkit.training.stages import StageConfig

    vision, language, data, out = sys.argv[1:5]
    vlm = VLM.build(vision=vision, language=language, projector="mlp")
    train(vlm, TrainConfig(data=Path(data), out=Path(out), stage=StageConfig(stage="full", lr=3e-3), batch_size=2,
                           grad_accum=1, max_steps=3, warmup_ratio=0.0, progress=False, plot=False, save_every=2))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(parts, data, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script), str(parts["clip"]), str(parts["llama"]), str(data / "train.jsonl"),
               str(tmp_path / "ddp")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr
    # one process, same global batch of 4: 2 x 2 accumulation
    train(fresh(parts), config(data, tmp_path / "one", StageConfig(stage="full", lr=3e-3), batch_size=2,
                               grad_accum=2, max_steps=3))  # fmt: skip
    a, b = (
        load_file(tmp_path / "ddp" / "model.safetensors"),
        load_file(tmp_path / "one" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert {p.name for p in (tmp_path / "ddp" / FINAL_STATE).iterdir()} >= {
        "rng-rank0.json",
        "rng-rank1.json",
    }


# ---------------------------------------------------------------------------------------------- CLI


def cli_app() -> typer.Typer:
    from vlmkit.cli.main import VlmkitGroup
    from vlmkit.cli.train import train_command

    app = typer.Typer(cls=VlmkitGroup, add_completion=False)
    app.command("train")(train_command)
    app.command("noop")(lambda: None)  # two commands make a group, as in the real app
    return app


def test_cli_train_end_to_end(tiny_vlm_dir, data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", data / "bad.jsonl", "--image-folder", data, "--out", out, "--model", tiny_vlm_dir,
            "--stage", "full", "--lr", "3e-3", "--batch-size", "4", "--max-steps", "4", "--eval-data",
            data / "eval.jsonl", "--eval-every", "2", "--save-every", "2", "--where-weight", "0.5", "--json"]  # fmt: skip
    result = CliRunner().invoke(cli_app(), [str(a) for a in args])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 4 and summary["skipped_ids"] == ["2", "5"] and summary["eval_loss"] > 0
    assert "trainable" in result.stderr and "skipped 2 record(s)" in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in rows)
    assert all(r["where_loss"] > 0 for r in rows)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert VLM.from_pretrained(out).ask(
        "What colour is the image?", images=[data / "red.png"], max_new_tokens=2
    )
    again = CliRunner().invoke(cli_app(), [str(a) for a in args])
    assert again.exit_code == 2 and "--resume" in again.stderr
    bad = CliRunner().invoke(cli_app(), ["train", "--data", str(data / "nope.jsonl"), "--out", str(tmp_path / "x"),
                                         "--model", str(tiny_vlm_dir)])  # fmt: skip
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --data") and "Traceback" not in bad.output


@pytest.mark.slow
def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/train_gpu.py needs a GPU; --dry-run runs the same code at tiny shapes on CPU."""
    script = Path(__file__).parents[1] / "benchmarks" / "train_gpu.py"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), "--dry-run"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["dry_run"] and {"torch", "transformers", "peft"} <= report["versions"].keys()
    for stage in ("projector", "lora", "full"):
        for impl in ("vlmkit", "transformers"):
            assert report["stages"][stage][impl]["samples_per_s"] > 0, report["stages"][stage]
