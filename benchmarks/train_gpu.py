"""GPU training benchmark: vlmkit's trainer vs plain transformers (+ peft) at LLaVA-1.5-7B shapes.

Random weights (nothing is downloaded): CLIP ViT-L/14-336 + mlp2x_gelu projector + a Llama-7B-shaped LM,
bf16 weights and AdamW states, batch 8 of ~700 tokens (576 image tokens). For each stage (projector,
LoRA r=128 on every LM linear, full with the tower frozen) it times optimizer steps of

* vlmkit: ``Trainer.train_step`` on a real LLaVA-format dataset (PNG files, tokenizer, chat template,
  the frozen-tower feature cache; the warm-up steps fill the cache, as a first epoch would), and
* transformers: ``LlavaForConditionalGeneration`` (+ peft for LoRA) on pre-built GPU tensors, with the
  same batch, dtype, gradient checkpointing and AdamW,

then prints one JSON object: versions, device, samples/s, tokens/s, step time and peak memory per stage.

    python benchmarks/train_gpu.py              # H100: about 3-4 minutes
    python benchmarks/train_gpu.py --dry-run    # tiny shapes on CPU, seconds: checks the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STAGES = ("projector", "lora", "full")
WORDS = "the a red blue green circle square left right image shows what colour is there one two three".split()


@dataclass(frozen=True)
class Setup:
    """Shapes and loop sizes of one benchmark run."""

    vision: dict[str, Any]
    language: dict[str, Any]
    batch: int
    text_words: int  # words of question + answer per sample (~1 token each)
    warmup: int
    steps: int
    device: str
    precision: str
    grad_ckpt: dict[str, bool]
    lora_rank: int


def full_setup(*, batch: int, warmup: int, steps: int) -> Setup:
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
    language = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)  # fmt: skip
    # checkpointing where an 80 GB card needs it (plan: lora 70 GB, full 77 GB without)
    return Setup(vision=vision, language=language, batch=batch, text_words=90, warmup=warmup, steps=steps,
                 device="cuda", precision="bf16", grad_ckpt={"projector": False, "lora": True, "full": True},
                 lora_rank=128)  # fmt: skip


def dry_setup() -> Setup:
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, projection_dim=32)  # fmt: skip
    language = dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    return Setup(vision=vision, language=language, batch=2, text_words=12, warmup=1, steps=2, device="cpu",
                 precision="fp32", grad_ckpt={"projector": False, "lora": True, "full": False}, lora_rank=4)  # fmt: skip


# ------------------------------------------------------------------------------------------------ parts


def build_tokenizer() -> Any:
    """A word-level fast tokenizer (offsets for label masks) with the LLaVA template's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    extra = (
        "A chat between curious human and an artificial intelligence assistant . The gives helpful , detailed"
    )
    vocab = ["<unk>", "<s>", "</s>", "<pad>", "USER", "ASSISTANT", ":", *dict.fromkeys(WORDS + extra.split())]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")  # fmt: skip


def build_vlm(setup: Setup) -> Any:
    """A vlmkit VLM with random weights, created directly on the device in the benchmark dtype."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from vlmkit.api import VLM, add_image_token
    from vlmkit.config import LanguageConfig, ProjectorConfig, PromptConfig, VisionConfig, VLMConfig
    from vlmkit.models.vlm import VisionLanguageModel

    vision = CLIPVisionConfig(**setup.vision).to_dict()
    prompt = PromptConfig(template="llava-v1")
    tokenizer = build_tokenizer()
    prompt.image_token_id = add_image_token(tokenizer, prompt)
    config = VLMConfig(vision=VisionConfig(hf_config=vision, image_size=setup.vision["image_size"], resize_mode="pad"),
                       projector=ProjectorConfig(type="mlp"), prompt=prompt,
                       language=LanguageConfig(hf_config=LlamaConfig(**setup.language).to_dict()))  # fmt: skip
    with torch.device(setup.device), default_dtype(setup):
        model = VisionLanguageModel(config=config)
    return VLM(model=model, tokenizer=tokenizer)


class default_dtype:  # noqa: N801 - used like torch's context managers
    """Create parameters directly in bf16 (a 7B model in fp32 would need 28 GB just to be cast)."""

    def __init__(self, setup: Setup) -> None:
        self.dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32

    def __enter__(self) -> None:
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.previous)


def write_dataset(root: Path, *, setup: Setup, records: int) -> Path:
    """``records`` LLaVA-format samples, each with its own random-noise PNG."""
    from PIL import Image

    rng = random.Random(0)
    size = setup.vision["image_size"]
    rows = []
    for i in range(records):
        pixels = torch.randint(
            0, 256, (size, size, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8
        )
        Image.fromarray(pixels.numpy()).save(root / f"{i}.png")
        words = [rng.choice(WORDS) for _ in range(setup.text_words)]
        half = len(words) // 2
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + " ".join(words[:half])},
            {"from": "gpt", "value": " ".join(words[half:])}]})  # fmt: skip
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], None], *, setup: Setup) -> dict[str, float]:
    """Run warm-up steps, then time ``setup.steps`` steps; -> step time and peak memory."""
    for _ in range(setup.warmup):
        step()
    sync(setup.device)
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(setup.steps):
        step()
    sync(setup.device)
    seconds = (time.perf_counter() - start) / setup.steps
    peak = torch.cuda.max_memory_allocated() / 1e9 if setup.device == "cuda" else None
    return {"step_s": round(seconds, 4), "samples_per_s": round(setup.batch / seconds, 3), "peak_gb": peak}


def vlmkit_stage(stage: str, *, setup: Setup, data: Path, work: Path) -> dict[str, Any]:
    from vlmkit.training.loop import TrainConfig, Trainer
    from vlmkit.training.stages import StageConfig

    vlm = build_vlm(setup)
    stage_config = StageConfig(stage=stage, lora_rank=setup.lora_rank, lora_alpha=2 * setup.lora_rank)
    config = TrainConfig(data=data, out=work / stage, stage=stage_config, batch_size=setup.batch, precision=setup.precision,
                         grad_ckpt=setup.grad_ckpt[stage], max_steps=setup.warmup + setup.steps, warmup_ratio=0.0,
                         progress=False, plot=False, workers=0 if setup.device == "cpu" else 4,
                         cpu=setup.device == "cpu")  # fmt: skip
    trainer = Trainer(vlm, config=config)
    stream = trainer.batch_stream(start=0, stop=setup.warmup + setup.steps)
    tokens: list[int] = []

    def step() -> None:
        batches = next(stream)
        tokens.append(sum(int(b.attention_mask.sum()) for b in batches))
        trainer.train_step(batches)
        trainer.step += 1

    result = timed(step, setup=setup)
    result["tokens_per_sample"] = round(sum(tokens) / (len(tokens) * setup.batch), 1)
    result["plan_gb"] = planned_gb(stage_config, setup=setup, seq=round(result["tokens_per_sample"]))
    trainer.accelerator.free_memory()  # accelerate keeps references to prepared models and optimizers
    return result


def planned_gb(stage: Any, *, setup: Setup, seq: int) -> float:
    """What ``vlmkit plan`` predicts for this stage, to read next to the measured peak."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from vlmkit.training.plan import plan_memory, shape_from_configs

    shape = shape_from_configs(
        vision=CLIPVisionConfig(**setup.vision), language=LlamaConfig(**setup.language)
    )
    plan = plan_memory(shape, stage=stage, batch=setup.batch, seq=seq, grad_ckpt=setup.grad_ckpt[stage.stage],
                       dtype=setup.precision)  # fmt: skip
    return round(plan.peak / 1e9, 3)


def transformers_stage(stage: str, *, setup: Setup, seq: int) -> dict[str, Any]:
    """The same step with plain transformers Llava (+ peft), inputs pre-built on the device."""
    model = build_llava(stage, setup=setup)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    inputs = llava_inputs(model, setup=setup, seq=seq)

    def step() -> None:
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, setup=setup)


def build_llava(stage: str, *, setup: Setup) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=CLIPVisionConfig(**setup.vision), text_config=LlamaConfig(**setup.language),
                         image_token_index=setup.language["vocab_size"] - 1, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")  # fmt: skip
    with torch.device(setup.device), default_dtype(setup):
        model = LlavaForConditionalGeneration(config)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    if stage == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if stage == "lora":
        from peft import LoraConfig, get_peft_model

        targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        lora = LoraConfig(
            r=setup.lora_rank, lora_alpha=2 * setup.lora_rank, lora_dropout=0.05, target_modules=targets
        )
        model = get_peft_model(model, lora)
    projector.requires_grad_(True)
    if setup.grad_ckpt[stage]:
        from vlmkit.training.loop import enable_checkpointing  # the same call, whichever transformers

        enable_checkpointing(model)
    return model.train()


def llava_inputs(model: Any, *, setup: Setup, seq: int) -> dict[str, torch.Tensor]:
    """[batch, seq] ids with one expanded image block after BOS; loss on the last quarter of the text."""
    vision = setup.vision
    image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    vocab = setup.language["vocab_size"]
    ids = torch.randint(10, vocab - 2, (setup.batch, seq), generator=torch.Generator().manual_seed(0))
    ids[:, 1 : 1 + image_tokens] = vocab - 1
    labels = torch.full_like(ids, -100)
    labels[:, -(seq - image_tokens) // 4 :] = ids[:, -(seq - image_tokens) // 4 :]
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(setup.batch, 3, vision["image_size"], vision["image_size"]).to(dtype)
    tensors = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": pixels,
    }
    return {k: v.to(setup.device) for k, v in tensors.items()}


# ------------------------------------------------------------------------------------------------- main


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    import vlmkit

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "vlmkit": vlmkit.__version__,
            "cuda": torch.version.cuda or "none"}  # fmt: skip


def run_stage(stage: str, *, setup: Setup, data: Path, work: Path) -> dict[str, Any]:
    """Both implementations for one stage; a failure is recorded, not fatal, so the other stages still run."""
    out: dict[str, Any] = {"grad_ckpt": setup.grad_ckpt[stage]}
    for name, fn in (("vlmkit", lambda: vlmkit_stage(stage, setup=setup, data=data, work=work)),
                     ("transformers", lambda: transformers_stage(stage, setup=setup, seq=seq_of(out)))):  # fmt: skip
        try:
            out[name] = fn()
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        gc.collect()
        if setup.device == "cuda":
            torch.cuda.empty_cache()
    if "samples_per_s" in out["vlmkit"] and "samples_per_s" in out["transformers"]:
        out["speedup"] = round(out["vlmkit"]["samples_per_s"] / out["transformers"]["samples_per_s"], 3)
    return out


def seq_of(stage_result: dict[str, Any]) -> int:
    """The baseline's sequence length: vlmkit's measured mean, so both process the same tokens."""
    return int(round(stage_result.get("vlmkit", {}).get("tokens_per_sample", 701)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (seconds)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # data-loading workers fork after tokenizer use
    setup = (
        dry_setup() if args.dry_run else full_setup(batch=args.batch, warmup=args.warmup, steps=args.steps)
    )
    if setup.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or use --dry-run for the tiny CPU check")
    started = time.perf_counter()
    report: dict[str, Any] = {"versions": versions(), "dry_run": args.dry_run, "stages": {},
                              "device": torch.cuda.get_device_name() if setup.device == "cuda" else "cpu",
                              "settings": {"batch": setup.batch, "warmup_steps": setup.warmup, "timed_steps": setup.steps,
                                           "precision": setup.precision, "lora_rank": setup.lora_rank}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # every record is seen during warm-up, so timed vlmkit steps run on cached tower features
        data = write_dataset(work, setup=setup, records=setup.batch * setup.warmup)
        for stage in args.stages:
            report["stages"][stage] = run_stage(stage, setup=setup, data=data, work=work)
    report["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
