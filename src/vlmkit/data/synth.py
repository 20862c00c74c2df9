"""Synthetic LLaVA-format data (docs/design.md, "Data format"): ``generate_dataset`` writes images and train/test JSON.

Layout of the output directory::

    train.json, test.json        JSON arrays, one record a line: {"id", "task", "image", "conversations"}
    images/train/, images/test/  PNGs (multi-image records: ``000012_1.png``, ``000012_2.png`` ...; with
                                 several questions per image, train images are named by group: ``g000012.png``)
    scenes.jsonl                 {"image": path, "scene": {...}}: the description every answer came from
    synth.json                   settings and counts; also marks the directory as generated here

Record ``i`` of a split is drawn from its own RNG seeded with (seed, split, i), so a set is a pure function
of its arguments: same seed -> byte-identical JSON and identical pixels. Tasks are assigned round-robin, so
every task appears once ``n`` reaches the number of tasks. Test records whose image pixels equal any train
image are re-drawn, so the splits share no image.

With ``questions_per_image`` K > 1 the train split is made of groups (packing all questions about one image
into one training sequence is much cheaper): group ``g`` has its own RNG, its anchor task is
``tasks[g % len(tasks)]``, and up to K - 1 further questions about the same scene(s) follow from the other
selected tasks that fit them (``synth_tasks.follow_ups``). Each question is still its own record; the records
of a group share its image(s). The test split always keeps one question per image, so held-out evaluation
stays balanced per task. K = 1 writes exactly what the one-question-per-image generator always wrote.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vlmkit.data.synth_conv import CONVERSATION_TASK, Conversation, check_tasks, draw_conversation
from vlmkit.data.synth_render import render_scene
from vlmkit.data.synth_scene import DocumentScene, Scene, Shape, ShapeScene, scene_from_dict
from vlmkit.data.synth_tasks import ALL_TASKS, EXTRA_TASKS, TASKS, TaskSample, follow_ups

__all__ = ["EXTRA_TASKS", "TASKS", "DocumentScene", "Scene", "Shape", "ShapeScene", "draw_group", "draw_sample",
           "generate_dataset", "load_scenes", "render_scene", "scene_from_dict"]  # fmt: skip

GENERATOR_VERSION = 1
MIN_IMAGE_SIZE = 32
SPLITS = ("train", "test")
_OWN_FILES = ("train.json", "test.json", "scenes.jsonl", "synth.json")


def generate_dataset(
    out: Path,
    *,
    n: int,
    seed: int,
    image_size: int = 64,
    test_fraction: float = 0.1,
    tasks: Sequence[str] | None = None,
    questions_per_image: int = 1,
    conversations: bool = False,
) -> dict[str, Any]:
    """Write ``n`` records (``test_fraction`` of them to test.json) under ``out``; return counts per split/task.

    ``questions_per_image`` (K) applies to the train split only: up to K records (questions) share each train
    image, and ``n`` still counts records. The test split always has one question per image.
    ``conversations``: every record is a multi-turn conversation (``synth_conv``) of the single-image tasks
    among ``tasks``, with 1-3 images arriving in different turns; ``n`` counts conversations.
    """
    task_names = check_settings(n=n, image_size=image_size, test_fraction=test_fraction, tasks=tasks,
                                questions_per_image=questions_per_image, conversations=conversations)  # fmt: skip
    out = Path(out).expanduser()
    _prepare_out(out)
    n_test = min(int(n * test_fraction + 0.5), n - 1)  # round half up; train keeps at least one record
    sizes = {"train": n - n_test, "test": n_test}
    train_pixels: set[str] = set()
    counts: dict[str, Any] = {}
    with (out / "scenes.jsonl").open("w", encoding="utf-8") as scenes_file:
        for split in SPLITS:
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            records = []
            per_image = questions_per_image if split == "train" else 1
            for group, images in _draw_split(split=split, count=sizes[split], seed=seed, image_size=image_size,
                                             tasks=task_names, exclude=train_pixels,
                                             questions_per_image=per_image, conversations=conversations):  # fmt: skip
                for path, (scene, image) in images.items():
                    image.save(out / path, format="PNG")
                    scenes_file.write(json.dumps({"image": path, "scene": scene.to_dict()}) + "\n")
                    if split == "train":
                        train_pixels.add(pixel_hash(image))
                records.extend(group)
            _write_records(out / f"{split}.json", records)
            counts[split] = _count(records)
    settings = {"generator": "vlmkit synth", "version": GENERATOR_VERSION, "seed": seed, "n": n,
                "image_size": image_size, "test_fraction": test_fraction, "tasks": task_names}  # fmt: skip
    if questions_per_image != 1:  # absent means 1: synth.json of a K = 1 set stays as it always was
        settings["questions_per_image"] = questions_per_image
    if conversations:  # likewise absent for single-question sets
        settings["conversations"] = True
    (out / "synth.json").write_text(
        json.dumps(settings | {"counts": counts}, indent=2) + "\n", encoding="utf-8"
    )
    return counts


def check_settings(
    *,
    n: int,
    image_size: int,
    test_fraction: float,
    tasks: Sequence[str] | None,
    questions_per_image: int = 1,
    conversations: bool = False,
) -> list[str]:
    """Validate the arguments of ``generate_dataset``; return the task list to use."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if questions_per_image < 1:
        raise ValueError(f"questions per image must be >= 1, got {questions_per_image}")
    if conversations and questions_per_image != 1:
        raise ValueError("questions per image does not apply to conversations (each already asks several)")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be >= {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test fraction must be in [0, 1), got {test_fraction}")
    names = list(TASKS) if not tasks else list(dict.fromkeys(tasks))
    unknown = [name for name in names if name not in ALL_TASKS]
    if unknown:
        raise ValueError(
            f"unknown task(s) {', '.join(map(repr, unknown))}; choose from {', '.join(ALL_TASKS)}"
        )
    return check_tasks(names) if conversations else names


def draw_sample(
    *, seed: int, split: str, index: int, task: str, image_size: int, attempt: int = 0
) -> TaskSample:
    """The scenes, question and answer of one record (a pure function of its arguments)."""
    # a string seed is hashed with SHA-512 by ``random``: stable across processes and platforms
    rng = random.Random(f"vlmkit-synth/{seed}/{split}/{index}/{attempt}")
    return ALL_TASKS[task](rng, image_size)


def draw_group(
    *,
    seed: int,
    split: str,
    group: int,
    tasks: Sequence[str],
    image_size: int,
    questions: int,
    attempt: int = 0,
) -> list[TaskSample]:
    """Up to ``questions`` samples about the same scene(s): the anchor task's own sample, then follow-ups."""
    rng = random.Random(f"vlmkit-synth/{seed}/{split}/group{group}/{attempt}")
    first = ALL_TASKS[tasks[group % len(tasks)]](rng, image_size)
    return [first, *follow_ups(rng, first, tasks=tasks, count=questions - 1)]


def human_turn(question: str, *, num_images: int) -> str:
    """One ``<image>`` per image: bare for one image, labelled "Image k:" for several (answers say "image k")."""
    if num_images == 1:
        return f"<image>\n{question}"
    labels = "\n".join(f"Image {k}: <image>" for k in range(1, num_images + 1))
    return f"{labels}\n{question}"


def pixel_hash(image: Any) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def load_scenes(directory: Path) -> dict[str, Scene]:
    """image path (relative, as in the records) -> its scene, from ``scenes.jsonl``."""
    scenes = {}
    with (Path(directory) / "scenes.jsonl").open(encoding="utf-8") as lines:
        for line in lines:
            entry = json.loads(line)
            scenes[entry["image"]] = scene_from_dict(entry["scene"])
    return scenes


def _draw_split(
    *,
    split: str,
    count: int,
    seed: int,
    image_size: int,
    tasks: list[str],
    exclude: set[str],
    questions_per_image: int,
    conversations: bool = False,
) -> Iterator[tuple[list[dict[str, Any]], dict[str, tuple[Scene, Any]]]]:
    """(records, {image path: (scene, PIL image)}) for each image (group) of a split, ``count`` records in all.

    A draw with an image in ``exclude`` (pixel hashes) is re-drawn with the next attempt.
    """
    if conversations:
        yield from _draw_conversations(split=split, count=count, seed=seed, image_size=image_size, tasks=tasks,
                                       exclude=exclude)  # fmt: skip
        return

    def draw(unit: int, questions: int, attempt: int) -> list[TaskSample]:
        if questions_per_image == 1:  # the original layout: record i has its own RNG and its own image
            task = tasks[unit % len(tasks)]
            return [draw_sample(seed=seed, split=split, index=unit, task=task, image_size=image_size,
                                attempt=attempt)]  # fmt: skip
        return draw_group(seed=seed, split=split, group=unit, tasks=tasks, image_size=image_size,
                          questions=questions, attempt=attempt)  # fmt: skip

    index = unit = 0
    while index < count:
        questions = min(questions_per_image, count - index)  # the last group may be cut short
        for attempt in itertools.count():
            samples = draw(unit, questions, attempt)
            images = [render_scene(scene) for scene in samples[0].scenes]
            if not any(pixel_hash(image) in exclude for image in images):
                break
        name = f"{unit:06d}" if questions_per_image == 1 else f"g{unit:06d}"
        yield _group(split=split, first=index, name=name, samples=samples, images=images)
        index, unit = index + len(samples), unit + 1


def _draw_conversations(
    *, split: str, count: int, seed: int, image_size: int, tasks: list[str], exclude: set[str]
) -> Iterator[tuple[list[dict[str, Any]], dict[str, tuple[Scene, Any]]]]:
    """One record per conversation, its own RNG each; re-drawn while any of its images is in ``exclude``."""
    for index in range(count):
        for attempt in itertools.count():
            rng = random.Random(f"vlmkit-synth/{seed}/{split}/conv{index}/{attempt}")
            conversation = draw_conversation(rng, image_size=image_size, tasks=tasks)
            images = [render_scene(scene) for scene in conversation.scenes]
            if not any(pixel_hash(image) in exclude for image in images):
                break
        paths = [f"images/{split}/c{index:06d}_{k}.png" for k in range(1, len(images) + 1)]
        record = conversation_record(conversation, id=f"{split}-{index:06d}", paths=paths)
        yield [record], dict(zip(paths, zip(conversation.scenes, images, strict=True), strict=True))


def conversation_record(conversation: Conversation, *, id: str, paths: list[str]) -> dict[str, Any]:
    """LLaVA format; an image's ``<image>`` sits in the turn it arrives in. ``turns``: each gpt turn's task,
    kind (first / new_image / follow_up / reference) and the image (1-based) it is about."""
    messages, turns = [], []
    for turn in conversation.turns:
        question = human_turn(turn.question, num_images=1) if turn.attaches else turn.question
        messages += [{"from": "human", "value": question}, {"from": "gpt", "value": turn.answer}]
        turns.append({"task": turn.task, "kind": turn.kind, "image": turn.about + 1})
    return {"id": id, "task": CONVERSATION_TASK, "image": paths[0] if len(paths) == 1 else paths,
            "conversations": messages, "turns": turns}  # fmt: skip


def _group(
    *, split: str, first: int, name: str, samples: list[TaskSample], images: list[Any]
) -> tuple[list[dict[str, Any]], dict[str, tuple[Scene, Any]]]:
    """Records ``first``, ``first + 1``, ... (one per sample), all pointing at the same image file(s)."""
    paths = _image_paths(split=split, name=name, count=len(images))
    records = [
        _record(split=split, index=first + k, sample=sample, paths=paths) for k, sample in enumerate(samples)
    ]
    return records, dict(zip(paths, zip(samples[0].scenes, images, strict=True), strict=True))


def _record(*, split: str, index: int, sample: TaskSample, paths: list[str]) -> dict[str, Any]:
    return {
        "id": f"{split}-{index:06d}",
        "task": sample.task,
        "image": paths[0] if len(paths) == 1 else paths,
        "conversations": [
            {"from": "human", "value": human_turn(sample.question, num_images=len(paths))},
            {"from": "gpt", "value": sample.answer},
        ],
    }


def _image_paths(*, split: str, name: str, count: int) -> list[str]:
    stem = f"images/{split}/{name}"
    return [f"{stem}.png"] if count == 1 else [f"{stem}_{k}.png" for k in range(1, count + 1)]


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    # a JSON array with one record a line: valid JSON, yet diff- and grep-friendly
    body = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)
    path.write_text(f"[\n{body}\n]\n" if records else "[]\n", encoding="utf-8")


def _count(records: list[dict[str, Any]]) -> dict[str, Any]:
    images = {
        path for r in records for path in (r["image"] if isinstance(r["image"], list) else [r["image"]])
    }
    counts = {
        "records": len(records),
        "images": len(images),
        "tasks": dict(Counter(r["task"] for r in records)),
    }
    turns = [turn for r in records for turn in r.get("turns", ())]
    if turns:  # conversations: their questions by task and by kind
        counts["turns"] = {"tasks": dict(Counter(t["task"] for t in turns)),
                           "kinds": dict(Counter(t["kind"] for t in turns))}  # fmt: skip
    return counts


def _prepare_out(out: Path) -> None:
    """Create ``out``; a previous synth output there is replaced, anything else is never touched."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "synth.json").is_file():
            raise ValueError(
                f"refusing to write into {out}: it is not empty and was not made by vlmkit synth"
            )
        for name in _OWN_FILES:
            (out / name).unlink(missing_ok=True)
        for split in SPLITS:
            shutil.rmtree(out / "images" / split, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
