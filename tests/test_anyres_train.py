"""Training with AnyRes tiling: batches of mixed image sizes (so rows have different image-token counts and
images different tile counts) lower the loss in all three stages, the frozen-tower feature cache works per
tile, and an interrupted run resumes bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tiny
from vlmkit.api import VLM
from vlmkit.data.dataset import ConversationDataset, collate, read_records
from vlmkit.training.checkpoint import FINAL_STATE
from vlmkit.training.config import TrainConfig
from vlmkit.training.loop import Trainer
from vlmkit.training.objectives import TokenLoss
from vlmkit.training.session import RunSession, train
from vlmkit.training.stages import StageConfig

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}
# (width, height): square, landscape, portrait, tiny, a wide strip
SIZES = [(32, 32), (64, 32), (32, 96), (8, 8), (120, 20)]


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("anyres-train-parts")
    return {
        "clip": tiny.save_vision(root / "clip", "clip"),
        "llama": tiny.save_language(root / "llama", "llama"),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Colour questions over images of five sizes; every fifth record asks about two images."""
    root = tmp_path_factory.mktemp("anyres-colours")
    records = []
    for i in range(20):
        name = list(COLOURS)[i % 4]
        size = SIZES[i % len(SIZES)]
        Image.new("RGB", size, COLOURS[name]).save(root / f"{i}.png")
        if i % 5 == 4:
            records.append({"id": str(i), "image": [f"{i}.png", f"{i - 1}.png"], "conversations": [
                {"from": "human", "value": "<image>\n<image>\nWhat colour is the first image?"},
                {"from": "gpt", "value": name}]})  # fmt: skip
            continue
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the image?"}, {"from": "gpt", "value": name}]})  # fmt: skip
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def fresh(parts) -> VLM:
    return VLM.build(
        vision=parts["clip"], language=parts["llama"], resolution="anyres", tiling={"max_tiles": 3}
    )


def config(data: Path, out: Path, stage: StageConfig, **kwargs) -> TrainConfig:
    defaults = dict(batch_size=4, max_steps=20, warmup_ratio=0.0, progress=False, plot=False)
    return TrainConfig(data=data / "train.jsonl", out=out, stage=stage, **(defaults | kwargs))


def mean_loss(vlm: VLM, data: Path) -> float:
    dataset = ConversationDataset(
        read_records(data / "train.jsonl"), processor=vlm.processor, image_folder=data
    )
    batch = collate(
        [dataset[i] for i in range(len(dataset))], pad_token_id=vlm.processor.pad_token_id, image_size=32
    )
    with torch.no_grad():
        loss = TokenLoss(vlm.model.eval())(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                           labels=batch.labels, pixel_values=batch.pixel_values,
                                           image_layouts=batch.image_layouts)  # fmt: skip
    return float(loss) / batch.num_target_tokens


def test_batches_mix_token_and_tile_counts(parts, data):
    vlm = fresh(parts)
    dataset = ConversationDataset(
        read_records(data / "train.jsonl"), processor=vlm.processor, image_folder=data
    )
    batch = collate([dataset[i] for i in range(5)], pad_token_id=vlm.processor.pad_token_id, image_size=32)
    per_row = (batch.input_ids == vlm.model.image_token_id).sum(-1).tolist()
    assert len(set(per_row)) >= 4  # rows with different image-token counts (8x8 and 32x32 both take 36)
    assert batch.pixel_values.shape[0] == sum(layout.num_tiles for layout in batch.image_layouts)
    assert len({layout.num_tiles for layout in batch.image_layouts}) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["projector", "lora", "full"])
def test_every_stage_lowers_the_loss(parts, data, tmp_path, stage):
    lr = {"projector": 1e-2, "lora": 1e-2, "full": 3e-3}[stage]
    extra = {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0} if stage == "lora" else {}
    stage_config = StageConfig(stage=stage, lr=lr, **extra)
    vlm = fresh(parts)
    before = mean_loss(vlm, data)
    newline = vlm.model.tiling.image_newline.detach().clone()
    result = train(vlm, config(data, tmp_path / "out", stage_config))
    assert result.steps == 20
    after = VLM.from_pretrained(tmp_path / "out")
    # the projector stage cannot teach a random LM the answers: it only has to help
    assert (
        mean_loss(after, data)
        < {"projector": 0.98 * before, "lora": before - 0.5, "full": 0.7 * before}[stage]
    )
    assert not torch.equal(after.model.tiling.image_newline, newline)  # trained with the connector


def test_feature_cache_stores_tiles_and_matches_uncached_training(parts, data, tmp_path):
    stage = StageConfig(stage="projector", lr=1e-2)
    cached = Trainer(fresh(parts), config(data, tmp_path / "a", stage, max_steps=10))
    RunSession(cached).run()
    dataset = ConversationDataset(read_records(data / "train.jsonl"), processor=cached.vlm.processor,
                                  image_folder=data)  # fmt: skip
    tiles = {tuple(layout.grid) for i in range(len(dataset)) for layout in dataset[i].image_layouts}
    assert len(tiles) >= 3 and cached.cache.hits > 0
    plain = Trainer(fresh(parts), config(data, tmp_path / "b", stage, max_steps=10, feature_cache=False))
    RunSession(plain).run()
    a, b = cached.vlm.model.state_dict(), plain.vlm.model.state_dict()
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)


def test_interrupted_anyres_run_resumes_bitwise(parts, data, tmp_path):
    stage = StageConfig(stage="lora", lr=1e-2, lora_rank=4, lora_alpha=8, lora_dropout=0.2)
    run = dict(max_steps=8, save_every=2, batch_size=4)
    train(fresh(parts), config(data, tmp_path / "a", stage, **run))

    def crash(step: int) -> None:
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(fresh(parts), config(data, tmp_path / "b", stage, **run), on_step=crash)
    train(fresh(parts), config(data, tmp_path / "b", stage, **run, resume=True))
    for name in (
        "model.safetensors",
        f"{FINAL_STATE}/trainable.safetensors",
        f"{FINAL_STATE}/optimizer.safetensors",
    ):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("a", "b")]  # fmt: skip
    assert losses[0] == losses[1]


def test_text_only_batch_runs_the_training_tower(parts):
    """A micro-batch without images runs a training tower on one blank image (AnyRes: a list of features)."""
    model = fresh(parts).model
    ids = torch.tensor([[1, 5, 6, 7]])
    loss = TokenLoss(model, blank_images=True)(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.vision.parameters() if p.grad is not None]  # the layers before the readout
    assert grads and not any(g.any() for g in grads)  # reached, at zero weight
