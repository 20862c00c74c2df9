"""QLoRA on CPU (training/qlora.py): adapters over an int8 / int4 base LM learn, the quantized base never moves,
an interrupted run resumes bitwise, the merged model is unquantized, and the refusals are clear."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tiny
from test_training import Interrupt, colour_records, config, mean_loss, write_records
from vlmkit.api import VLM
from vlmkit.config import ConfigError
from vlmkit.quantization import QuantizationError, QuantizedLinear, is_quantized
from vlmkit.training.checkpoint import FINAL_STATE
from vlmkit.training.config import StageConfig
from vlmkit.training.lora import load_adapters
from vlmkit.training.session import train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def qparts(tmp_path_factory):
    """A CLIP tower + a 64-wide Llama (int4 groups need widths divisible by 32)."""
    root = tmp_path_factory.mktemp("qlora-parts")
    return tiny.save_vision(root / "clip", "clip"), tiny.save_language(root / "llama", "llama", hidden=64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    from test_training import COLOURS

    root = tmp_path_factory.mktemp("qlora-colours")
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(root / f"{name}.png")
    write_records(root / "train.jsonl", colour_records(16))
    return root


def fresh(qparts) -> VLM:
    vision, language = qparts
    return VLM.build(vision=vision, language=language, projector="mlp")


def quantized_state(vlm: VLM) -> dict[str, torch.Tensor]:
    """Codes and scales of every quantized layer, by name (peft's wrapper names stripped)."""
    return {name.replace("base_model.model.", "").replace(".base_layer", "") + f".{key}": t.clone()
            for name, m in vlm.model.named_modules() if isinstance(m, QuantizedLinear)
            for key, t in m.state_dict().items()}  # fmt: skip


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_qlora_learns_and_leaves_the_quantized_base_alone(qparts, data, tmp_path, method):
    vlm = fresh(qparts)
    loss_before = mean_loss(vlm, data)
    stage = StageConfig(stage="lora", quantize=method, lr=1e-2, lora_rank=8, lora_alpha=16, lora_dropout=0.0)
    snapshot: dict[str, torch.Tensor] = {}
    base: dict[str, torch.Tensor] = {}

    def on_step(step: int) -> None:
        if step == 1:
            base.update(quantized_state(vlm))
        snapshot.update(quantized_state(vlm))

    train(vlm, config(data, tmp_path / "out", stage, max_steps=25, grad_ckpt=True), on_step=on_step)
    assert base and base.keys() == snapshot.keys()
    assert all(torch.equal(base[k], snapshot[k]) for k in base)  # the quantized base never moved
    trained = load_file(tmp_path / "out" / FINAL_STATE / "trainable.safetensors")
    assert trained and all(".lora_" in n or n.startswith("projector.") for n in trained)
    # the saved model is merged: dequantized base + adapters, unquantized, and it learned
    merged = VLM.from_pretrained(tmp_path / "out")
    assert merged.config.quantization is None and not is_quantized(merged.model)
    assert "quantization" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert mean_loss(merged, data) < loss_before - 0.5


def test_qlora_adapters_reapply_to_a_quantized_base(qparts, data, tmp_path):
    vlm = fresh(qparts)
    base_dir = vlm.save_pretrained(tmp_path / "base")
    stage = StageConfig(stage="lora", quantize="int8", lr=1e-2, lora_rank=8, lora_alpha=16, lora_dropout=0.0)
    train(VLM.from_pretrained(base_dir), config(data, tmp_path / "out", stage, max_steps=20))
    merged_loss = mean_loss(VLM.from_pretrained(tmp_path / "out"), data)
    adapted = load_adapters(
        VLM.from_pretrained(base_dir, quantize="int8"), directory=tmp_path / "out" / "adapter"
    )
    assert is_quantized(adapted.model)
    # the same adapters on the int8 base: the merged model differs only by the activations' rounding
    assert mean_loss(adapted, data) == pytest.approx(merged_loss, rel=0.05, abs=0.02)


def test_qlora_resumes_bitwise(qparts, data, tmp_path):
    stage = StageConfig(stage="lora", quantize="int8", lr=1e-2, lora_rank=4, lora_alpha=8, lora_dropout=0.2)
    run = dict(max_steps=8, save_every=3, keep_last=2, batch_size=4)
    train(fresh(qparts), config(data, tmp_path / "a", stage, **run))

    def crash(step: int) -> None:
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(fresh(qparts), config(data, tmp_path / "b", stage, **run), on_step=crash)
    train(fresh(qparts), config(data, tmp_path / "b", stage, **run, resume=True))
    for name in (
        "model.safetensors",
        f"{FINAL_STATE}/trainable.safetensors",
        f"{FINAL_STATE}/optimizer.safetensors",
    ):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    other = StageConfig(stage="lora", quantize="int4", lr=1e-2, lora_rank=4, lora_alpha=8, lora_dropout=0.2)
    with pytest.raises(ValueError, match="stage"):  # a different base quantization is a different run
        train(fresh(qparts), config(data, tmp_path / "b", other, **run, resume=True))


def test_qlora_refusals(qparts, data, tmp_path):
    with pytest.raises(ConfigError, match="needs stage 'lora'"):
        StageConfig(stage="full", quantize="int8").validate()
    with pytest.raises(ConfigError, match="cannot be combined with fsdp"):
        config(data, tmp_path / "out", StageConfig(stage="lora", quantize="int8"), fsdp=True).validate()
    with pytest.raises(QuantizationError, match="needs bitsandbytes on a CUDA device"):
        train(
            fresh(qparts),
            config(data, tmp_path / "out", StageConfig(stage="lora", quantize="nf4"), max_steps=1),
        )


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_plan_matches_measured_peak_of_a_qlora_cpu_step(qparts, tmp_path, method):
    from PIL import Image

    from test_plan import BATCH, SEQ, full_length_batch, resident_bytes
    from vlmkit.training.config import TrainConfig
    from vlmkit.training.loop import Trainer
    from vlmkit.training.plan import measure_peak_bytes, plan_memory, shape_from_dirs

    Image.new("RGB", (32, 32), (200, 20, 20)).save(tmp_path / "red.png")
    record = {"id": "0", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                               {"from": "gpt", "value": "red"}]}  # fmt: skip
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    stage = StageConfig(stage="lora", quantize=method, lora_rank=8, lora_alpha=16)
    trainer = Trainer(fresh(qparts), TrainConfig(data=tmp_path / "d.jsonl", out=tmp_path / "out", stage=stage,
                                                 progress=False))  # fmt: skip
    batch = full_length_batch(trainer.vlm)
    trainer.train_step([batch])  # creates the AdamW state, as in every step after the first
    codes = sum(
        b.numel() * b.element_size() for b in trainer.model.buffers() if b.dtype in (torch.int8, torch.uint8)
    )
    measured = measure_peak_bytes(
        lambda: trainer.train_step([batch]), resident=resident_bytes(trainer) + codes
    )
    vision, language = qparts
    plan = plan_memory(shape_from_dirs(vision=vision, language=language), stage=stage, batch=BATCH, seq=SEQ,
                       dtype="fp32")  # fmt: skip
    assert plan.peak == pytest.approx(measured, rel=0.30)
    unquantized = plan_memory(shape_from_dirs(vision=vision, language=language), batch=BATCH, seq=SEQ, dtype="fp32",
                              stage=StageConfig(stage="lora", lora_rank=8, lora_alpha=16))  # fmt: skip
    assert plan.weights < unquantized.weights
