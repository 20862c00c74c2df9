"""``plan``: parameter counts from configs on the meta device, memory against LLaVA-1.5-7B reference
measurements (H100) and against the measured peak of real tiny CPU training steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from vlmkit.api import VLM
from vlmkit.data.dataset import Batch
from vlmkit.training.loop import TrainConfig, Trainer
from vlmkit.training.plan import measure_peak_bytes, plan_memory, shape_from_configs, shape_from_dirs
from vlmkit.training.stages import StageConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# transformers' Llava at LLaVA-1.5-7B shapes, H100, batch 8 x 701 tokens, bf16 weights and AdamW states
REFERENCE_GB = {
    ("projector", False): 40.3,
    ("lora", False): 70.4,
    ("lora", True): 22.2,
    ("full", False): 77.2,
    ("full", True): 55.9,
}


@pytest.fixture(scope="module")
def llava_7b():
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
    language = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)  # fmt: skip
    return shape_from_configs(vision=vision, language=language, projector="mlp")


def test_7b_parameter_counts(llava_7b):
    assert llava_7b.vision_params == 303_507_456  # CLIP ViT-L/14-336
    assert llava_7b.projector_params == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # mlp2x_gelu
    assert llava_7b.lm_params == 6_738_939_904  # Vicuna-7B with llava-hf's 32064-token vocabulary
    assert llava_7b.image_tokens == 576


@pytest.mark.parametrize(("stage", "ckpt"), list(REFERENCE_GB))
def test_7b_plan_within_15_percent_of_h100_measurements(llava_7b, stage, ckpt):
    config = StageConfig(stage=stage, lora_rank=128, lora_alpha=256)  # LoRA: every LM linear, dropout 0.05
    plan = plan_memory(llava_7b, stage=config, batch=8, seq=701, grad_ckpt=ckpt, dtype="bf16")
    assert plan.peak / 1e9 == pytest.approx(REFERENCE_GB[(stage, ckpt)], rel=0.15)


# -------------------------------------------------------------------------------------- measured on CPU

BATCH, SEQ = 8, 128


@pytest.fixture(scope="module")
def tiny_run(parts, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan-data")
    Image.new("RGB", (32, 32), (200, 20, 20)).save(root / "red.png")
    record = {"id": "0", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                               {"from": "gpt", "value": "red"}]}  # fmt: skip
    (root / "d.jsonl").write_text(json.dumps(record) + "\n")
    return root


def full_length_batch(vlm: VLM) -> Batch:
    """BATCH sequences of exactly SEQ tokens, each with one image; text after the image is learned."""
    ids = torch.randint(10, 400, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    ids[:, 4 : 4 + vlm.model.num_image_tokens] = vlm.config.prompt.image_token_id
    labels = ids.clone()
    labels[:, : 4 + vlm.model.num_image_tokens] = -100
    return Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                 pixel_values=torch.randn(BATCH, 3, 32, 32), ids=[str(i) for i in range(BATCH)])  # fmt: skip


def resident_bytes(trainer: Trainer) -> int:
    """Weights and optimizer state: they exist before the measured step starts."""
    tensors = list(trainer.model.parameters())
    tensors += [t for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize(
    ("stage", "ckpt"),
    [(StageConfig(stage="projector"), False), (StageConfig(stage="lora", lora_rank=8, lora_alpha=16), False),
     (StageConfig(stage="full"), False), (StageConfig(stage="full"), True)],
    ids=["projector", "lora", "full", "full-ckpt"],
)  # fmt: skip
def test_plan_matches_measured_peak_of_a_tiny_cpu_step(parts, tiny_run, tmp_path, stage, ckpt):
    vlm = VLM.build(vision=parts["clip"], language=parts["llama"], projector="mlp")
    config = TrainConfig(
        data=tiny_run / "d.jsonl", out=tmp_path / "out", stage=stage, grad_ckpt=ckpt, progress=False
    )
    trainer = Trainer(vlm, config)
    batch = full_length_batch(vlm)
    trainer.train_step([batch])  # creates the AdamW state, as in every step after the first
    measured = measure_peak_bytes(lambda: trainer.train_step([batch]), resident=resident_bytes(trainer))
    plan = plan_memory(shape_from_dirs(vision=parts["clip"], language=parts["llama"]), stage=stage, batch=BATCH, seq=SEQ,
                       grad_ckpt=ckpt, dtype="fp32")  # fmt: skip
    assert plan.peak == pytest.approx(measured, rel=0.30)


def test_plan_cli_json_and_table(parts):
    from vlmkit.cli.main import VlmkitGroup
    from vlmkit.cli.plan import plan_command

    app = typer.Typer(cls=VlmkitGroup, add_completion=False)
    app.command("plan")(plan_command)
    app.command("noop")(lambda: None)
    base = ["plan", "--vision", str(parts["clip"]), "--language", str(parts["llama"]), "--stage", "lora",
            "--lora-rank", "8", "--batch", "2"]  # fmt: skip
    result = CliRunner().invoke(app, [*base, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["settings"]["seq"] == 16 + 256 and data["params"]["lora"]["trainable"] > 0
    assert data["peak"] == data["weights"] + data["optimizer"] + max(data["activations"], data["gradients"])
    shown = CliRunner().invoke(app, base)
    assert shown.exit_code == 0 and "peak" in shown.stdout and "params: lora" in shown.stdout
    bad = CliRunner().invoke(app, [*base[:5], "--stage", "projector", "--lora-vision"])
    assert bad.exit_code == 2 and "--lora-vision" in bad.stderr
