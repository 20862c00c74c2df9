"""Recipe ``tiny-scratch``: a small VLM trained from nothing on a user's own LLaVA-format data, on a CPU.

1. A byte-level BPE tokenizer is trained on the data's text; a ViT tower, MLP projector and Llama LM are
   created from the recipe's sizes and composed through the normal ``VLM.build`` path.
2. Stage 1: the tower learns to see from a direct loss: dense scene labels when the data ships them
   (``scene_pretrain``), else a question-conditioned answer probe plus per-patch statistics of flat-colour
   regions computed from the pixels (``vision_pretrain``, ``segment_targets``).
3. Stage 2: the tower is frozen (its features are cached) and projector + LM train on the conversations
   with the regular trainer, under a cosine schedule sized to what is left of the time budget.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlmkit.data.dataset import Record, read_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

RECIPE_DIR = Path(__file__).parent
SPECIAL_TOKENS = ["<unk>", "<s>", "<pad>", "<|im_start|>", "<|im_end|>", "<image>"]


@dataclass
class Recipe:
    name: str
    image_size: int = 64
    patch_size: int = 8
    vocab_size: int = 1024
    template: str = "chatml"
    description: str = ""
    # widths of a convolutional stem in place of the ViT's patch embedding (models/vision/stem.py); [] = none
    conv_stem: list[int] = field(default_factory=list)
    vision: dict[str, Any] = field(default_factory=dict)
    language: dict[str, Any] = field(default_factory=dict)
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, name_or_path: str | Path) -> Recipe:
        """A recipe by name (a JSON file shipped next to this module) or by path."""
        path = Path(name_or_path)
        if not path.suffix:
            path = RECIPE_DIR / f"{name_or_path}.json"
        if not path.exists():
            known = sorted(p.stem for p in RECIPE_DIR.glob("*.json"))
            raise ValueError(f"unknown recipe {str(name_or_path)!r}; known: {', '.join(known)}")
        data = json.loads(path.read_text())
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"recipe {path.name}: unknown field {sorted(unknown)[0]!r}")
        return cls(**data)


def digit_pre_tokenizer() -> Any:
    """Byte-level pre-tokenization that first cuts every digit off on its own (as Llama and Qwen do).

    A BPE vocabulary learned on invoices otherwise merges digits into tokens such as "507", and a small
    model must then map three glyphs it sees to one of a thousand ids; one token per digit lets it copy.
    """
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


def split_digits(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """``tokenizer`` (a fast byte-level BPE tokenizer) re-pointed at ``digit_pre_tokenizer``, in place.

    Every id keeps its meaning and every text still encodes (single digits are in the byte alphabet);
    numbers just come out one digit per token. Multi-digit tokens stay in the vocabulary, unused.
    """
    tokenizer.backend_tokenizer.pre_tokenizer = digit_pre_tokenizer()
    return tokenizer


def train_tokenizer(texts: list[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the data's own text (any string encodes; nothing maps to <unk>), one token per
    digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = digit_pre_tokenizer()
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<image>"],
    )  # fmt: skip


def _texts(records: list[Record]) -> list[str]:
    return [m["content"].replace("<image>", " ") for r in records for m in r.messages]


def save_parts(*, recipe: Recipe, tokenizer: PreTrainedTokenizerFast, root: Path) -> tuple[Path, Path]:
    """A new CLIP-style tower and a new Llama (+ tokenizer) saved as ordinary transformers directories."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    vision_dir, language_dir = root / "vision", root / "language"
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=recipe.image_size, patch_size=recipe.patch_size,
                                             hidden_act="gelu", **recipe.vision))  # fmt: skip
    tower.save_pretrained(vision_dir)
    (vision_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_center_crop": False,
        "size": {"height": recipe.image_size, "width": recipe.image_size},
    }))  # fmt: skip
    special = (("bos_token_id", "<s>"), ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<pad>"))
    # one token each, so one int id each (transformers declares int | list[int])
    ids: dict[str, Any] = {name: tokenizer.convert_tokens_to_ids(token) for name, token in special}
    lm = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **ids, **recipe.language)
    )
    lm.save_pretrained(language_dir)
    tokenizer.save_pretrained(language_dir)
    return vision_dir, language_dir


def build_scratch_vlm(records: list[Record], *, recipe: Recipe, seed: int) -> Any:
    """Tokenizer trained on ``records`` + new tower/LM, composed with ``VLM.build`` (the real loading path)."""
    from vlmkit.api import VLM

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(_texts(records), vocab_size=recipe.vocab_size)
    with tempfile.TemporaryDirectory(prefix="vlmkit-scratch-") as tmp:
        vision_dir, language_dir = save_parts(recipe=recipe, tokenizer=tokenizer, root=Path(tmp))
        # feature_layer -1: a tower trained from scratch has no "too specialised" last layer to skip
        return VLM.build(vision=vision_dir, language=language_dir, projector="mlp", feature_layer=-1,
                         conv_stem=tuple(recipe.conv_stem), template=recipe.template, seed=seed)  # fmt: skip


@dataclass
class RecipeResult:
    out: Path
    stage1: dict[str, float]
    stage2_steps: int
    stage2_loss: float | None
    seconds: float
    skipped: int


def run_recipe(
    *,
    recipe: Recipe,
    data: Path,
    image_folder: Path,
    out: Path,
    eval_data: Path | None = None,
    minutes_scale: float = 1.0,
    stage1_steps: int | None = None,
    stage2_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> RecipeResult:
    """Both stages end to end; the model lands in ``out`` as a normal vlmkit directory.

    Budgets are the recipe's minutes (times ``minutes_scale``); ``stage1_steps`` / ``stage2_steps`` fix step
    counts instead, for runs that must not depend on the machine's speed (tests, exact reproduction).
    """
    start = time.perf_counter()
    _stage2_config(recipe.stage2)  # a bad stage-2 setting fails now, not after stage 1
    torch.set_flush_denormal(True)  # denormals stall small conv/linear layers on CPU
    records = read_records(data)
    vlm = build_scratch_vlm(records, recipe=recipe, seed=seed)
    stats, skipped = _stage1(vlm=vlm, recipe=recipe, records=records, data=data, image_folder=image_folder,
                             minutes=recipe.stage1["minutes"] * minutes_scale, steps=stage1_steps, seed=seed,
                             log=log)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vlmkit-packed-") as tmp:
        train_data = _packed_data(
            records=records, recipe=recipe, data=data, folder=Path(tmp), seed=seed, log=log
        )
        minutes = _stage2_minutes(recipe=recipe, scale=minutes_scale, elapsed=time.perf_counter() - start)
        result = _stage2(vlm=vlm, recipe=recipe, data=train_data, image_folder=image_folder, out=out,
                         eval_data=eval_data, minutes=minutes, steps=stage2_steps, seed=seed, progress=progress,
                         log=log)  # fmt: skip
    return RecipeResult(out=out, stage1=stats, stage2_steps=result.steps, stage2_loss=result.loss,
                        seconds=time.perf_counter() - start, skipped=skipped + len(result.skipped))  # fmt: skip


def _stage2_minutes(*, recipe: Recipe, scale: float, elapsed: float) -> float:
    """Stage 2's budget: its own share, cut so the whole run (data preparation and stage 1 included) stays
    within both stages' minutes; 0.25 minutes are kept back for timing steps and saving."""
    total = (recipe.stage1["minutes"] + recipe.stage2["minutes"]) * scale
    left = total - elapsed / 60 - 0.25
    return max(0.5, min(recipe.stage2["minutes"] * scale, left))


def _stage1(
    *, vlm: Any, recipe: Recipe, records: list[Record], data: Path, image_folder: Path, minutes: float,
    steps: int | None, seed: int, log: Callable[[str], None],
) -> tuple[dict[str, float], int]:  # fmt: skip
    """Teach the tower to see: from scene labels when the data has them (``objective`` "auto"/"scene"), else
    from the question/answer pairs themselves ("answers")."""
    from vlmkit.training.recipes import scene_pretrain, vision_pretrain

    s1 = recipe.stage1
    objective = s1.get("objective", "auto")
    if objective not in ("auto", "scene", "answers"):
        raise ValueError(f"recipe stage1.objective must be auto, scene or answers, got {objective!r}")
    where = s1.get("where", False)  # scene labels only: every token must also say where it is
    if not isinstance(where, bool):
        raise ValueError(f"recipe stage1.where must be true or false, got {where!r}")
    if where and objective == "answers":
        raise ValueError("recipe stage1.where needs scene labels (objective auto or scene), not 'answers'")
    processor = vlm.processor.image_processor
    options = dict(vision=vlm.model.vision, processor=processor, minutes=minutes, max_steps=steps,
                   batch_size=s1["batch_size"], lr=s1["lr"], weight_decay=s1.get("weight_decay", 0.0), seed=seed,
                   log=log)  # fmt: skip
    scenes_file = scene_pretrain.find_scenes(data=data, image_folder=image_folder)
    if objective == "scene" and scenes_file is None:
        raise ValueError(f"stage1.objective 'scene' needs a scenes.jsonl in {image_folder} or next to {data}")
    if objective != "answers" and scenes_file is not None:
        from vlmkit.data.synth import load_scenes

        labels = scene_pretrain.build_scene_labels(
            scenes=load_scenes(scenes_file.parent), names=[n for r in records for n in r.images],
            image_folder=image_folder, processor=processor, patch_size=vlm.model.vision.patch_size,
        )  # fmt: skip
        log(f"stage 1: dense scene labels for {len(labels.images)} images from {scenes_file}")
        stats = scene_pretrain.pretrain_vision_on_scenes(labels=labels, where=where, **options)
        return stats, labels.skipped
    if where:
        log("stage 1: no scenes.jsonl, so stage1.where (a scene-label objective) does not apply")
    triples = vision_pretrain.build_triples(records, image_folder=image_folder, tokenizer=vlm.tokenizer,
                                            processor=processor, vocab=len(vlm.tokenizer))  # fmt: skip
    log(f"stage 1: {len(triples.image_index)} question/answer pairs on {len(triples.images)} images")
    segments = s1.get("segments", False)
    if not isinstance(segments, bool):
        raise ValueError(f"recipe stage1.segments must be true or false, got {segments!r}")
    return vision_pretrain.pretrain_vision(triples=triples, segments=segments, **options), triples.skipped


def _packed_data(
    *, records: list[Record], recipe: Recipe, data: Path, folder: Path, seed: int, log: Callable[[str], None]
) -> Path:
    """Stage 2's training file: questions about the same image(s) packed into multi-turn conversations."""
    from vlmkit.data.packing import pack_by_image, write_records

    turns = int(recipe.stage2.get("pack_turns", 8))
    if turns <= 1:
        return data
    packed = pack_by_image(records, max_turns=turns, seed=seed)
    if len(packed) == len(records):
        return data  # one question per image: nothing to pack
    log(f"stage 2: {len(records)} records packed into {len(packed)} conversations (up to {turns} turns)")
    write_records(packed, folder / "packed.json")
    return folder / "packed.json"


def _stage2(
    *, vlm: Any, recipe: Recipe, data: Path, image_folder: Path, out: Path, eval_data: Path | None,
    minutes: float, steps: int | None, seed: int, progress: bool, log: Callable[[str], None],
) -> Any:  # fmt: skip
    from vlmkit.training.config import TrainConfig
    from vlmkit.training.session import train

    s2 = recipe.stage2
    stage = _stage2_config(s2)
    base = dict(data=data, out=out, image_folder=image_folder, stage=stage, batch_size=s2["batch_size"],
                warmup_ratio=s2.get("warmup_ratio", 0.03), weight_decay=s2.get("weight_decay", 0.0), seed=seed,
                eval_data=eval_data, save_every=0, keep_last=1, log_every=10, progress=progress)  # fmt: skip
    if steps is not None:
        return train(vlm, TrainConfig(**base, max_steps=steps))
    steps = _steps_for_budget(vlm=vlm, config=TrainConfig(**base, max_steps=1000), minutes=minutes)
    log(f"stage 2: {steps} steps of batch {s2['batch_size']} in about {minutes:.1f} minutes")
    # the schedule is sized to the budget; max_minutes is the safety net if the machine slows down
    return train(vlm, TrainConfig(**base, max_steps=steps, max_minutes=minutes * 1.15))


def _stage2_config(s2: dict[str, Any]) -> Any:
    """Projector + LM at the recipe's LR; with ``vision_lr_scale`` > 0 the tower trains too, at that fraction."""
    from vlmkit.training.stages import StageConfig

    scale = s2.get("vision_lr_scale", 0.0)
    if not isinstance(scale, int | float) or isinstance(scale, bool) or scale < 0:
        raise ValueError(
            f"recipe stage2.vision_lr_scale must be a number >= 0 (0 = frozen tower), got {scale!r}"
        )
    scales = {"projector": 1.0} | ({"vision": float(scale)} if scale else {})
    return StageConfig(stage="full", freeze_vision=not scale, lr=s2["lr"], lr_scales=scales)


def _steps_for_budget(*, vlm: Any, config: Any, minutes: float) -> int:
    """Time real optimizer steps on a throwaway copy, then size the cosine schedule to the budget.

    With the frozen tower's features cached, first-epoch steps (which encode images) cost more than later
    ones (which read the cache), so both are timed: a fresh batch, then the same batch again.
    """
    import copy

    from vlmkit.training.loop import Trainer

    probe = type(vlm)(model=copy.deepcopy(vlm.model), tokenizer=vlm.tokenizer)  # the VLM holds caches/locks
    with tempfile.TemporaryDirectory(prefix="vlmkit-calibrate-") as tmp:
        trainer = Trainer(probe, _replace(config, out=Path(tmp), progress=False, plot=False))
        trainer.train_step(trainer.step_batches(0))  # warm-up: allocation, first-call overheads
        cold = _time_steps(trainer, steps=[1, 2])
        warm = _time_steps(trainer, steps=[1, 2, 1, 2])  # features now cached
        per_epoch = math.ceil(len(trainer.dataset) / trainer.layout.global_batch)
    budget = minutes * 60
    if per_epoch * cold >= budget:
        return max(10, int(budget / cold))
    return max(10, per_epoch + int((budget - per_epoch * cold) / warm))


def _time_steps(trainer: Any, *, steps: list[int]) -> float:
    start = time.perf_counter()
    for step in steps:
        trainer.train_step(trainer.step_batches(step))
    return (time.perf_counter() - start) / len(steps)


def _replace(config: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(config, **changes)
