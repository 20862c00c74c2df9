"""Synthetic LLaVA-format data (DESIGN §4): ``generate_dataset`` writes images and train/test JSON.

Layout of the output directory::

    train.json, test.json        JSON arrays, one record a line: {"id", "task", "image", "conversations"}
    images/train/, images/test/  PNGs (multi-image records: ``000012_1.png``, ``000012_2.png`` ...)
    scenes.jsonl                 {"image": path, "scene": {...}}: the description every answer came from
    synth.json                   settings and counts; also marks the directory as generated here

Record ``i`` of a split is drawn from its own RNG seeded with (seed, split, i), so a set is a pure function
of its arguments: same seed -> byte-identical JSON and identical pixels. Tasks are assigned round-robin, so
every task appears once ``n`` reaches the number of tasks. Test records whose image pixels equal any train
image are re-drawn, so the splits share no image.
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

from vlmkit.data.synth_render import render_scene
from vlmkit.data.synth_scene import DocumentScene, Scene, Shape, ShapeScene, scene_from_dict
from vlmkit.data.synth_tasks import TASKS, TaskSample

__all__ = ["TASKS", "DocumentScene", "Scene", "Shape", "ShapeScene", "draw_sample", "generate_dataset",
           "load_scenes", "render_scene", "scene_from_dict"]  # fmt: skip

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
) -> dict[str, Any]:
    """Write ``n`` records (``test_fraction`` of them to test.json) under ``out``; return counts per split/task."""
    task_names = check_settings(n=n, image_size=image_size, test_fraction=test_fraction, tasks=tasks)
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
            for record, images in _draw_split(split=split, count=sizes[split], seed=seed, image_size=image_size,
                                              tasks=task_names, exclude=train_pixels):  # fmt: skip
                for path, (scene, image) in images.items():
                    image.save(out / path, format="PNG")
                    scenes_file.write(json.dumps({"image": path, "scene": scene.to_dict()}) + "\n")
                    if split == "train":
                        train_pixels.add(pixel_hash(image))
                records.append(record)
            _write_records(out / f"{split}.json", records)
            counts[split] = _count(records)
    settings = {"generator": "vlmkit synth", "version": GENERATOR_VERSION, "seed": seed, "n": n,
                "image_size": image_size, "test_fraction": test_fraction, "tasks": task_names}  # fmt: skip
    (out / "synth.json").write_text(
        json.dumps(settings | {"counts": counts}, indent=2) + "\n", encoding="utf-8"
    )
    return counts


def check_settings(
    *, n: int, image_size: int, test_fraction: float, tasks: Sequence[str] | None
) -> list[str]:
    """Validate the arguments of ``generate_dataset``; return the task list to use."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be >= {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test fraction must be in [0, 1), got {test_fraction}")
    names = list(TASKS) if not tasks else list(dict.fromkeys(tasks))
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; choose from {', '.join(TASKS)}")
    return names


def draw_sample(
    *, seed: int, split: str, index: int, task: str, image_size: int, attempt: int = 0
) -> TaskSample:
    """The scenes, question and answer of one record (a pure function of its arguments)."""
    # a string seed is hashed with SHA-512 by ``random``: stable across processes and platforms
    rng = random.Random(f"vlmkit-synth/{seed}/{split}/{index}/{attempt}")
    return TASKS[task](rng, image_size)


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
    *, split: str, count: int, seed: int, image_size: int, tasks: list[str], exclude: set[str]
) -> Iterator[tuple[dict[str, Any], dict[str, tuple[Scene, Any]]]]:
    """(record, {image path: (scene, PIL image)}) for each record of a split."""
    for index in range(count):
        task = tasks[index % len(tasks)]
        for attempt in itertools.count():
            sample = draw_sample(seed=seed, split=split, index=index, task=task, image_size=image_size,
                                 attempt=attempt)  # fmt: skip
            images = [render_scene(scene) for scene in sample.scenes]
            if not any(pixel_hash(image) in exclude for image in images):
                break
        paths = _image_paths(split=split, index=index, count=len(images))
        record = {
            "id": f"{split}-{index:06d}",
            "task": sample.task,
            "image": paths[0] if len(paths) == 1 else paths,
            "conversations": [
                {"from": "human", "value": human_turn(sample.question, num_images=len(paths))},
                {"from": "gpt", "value": sample.answer},
            ],
        }
        yield record, dict(zip(paths, zip(sample.scenes, images, strict=True), strict=True))


def _image_paths(*, split: str, index: int, count: int) -> list[str]:
    stem = f"images/{split}/{index:06d}"
    return [f"{stem}.png"] if count == 1 else [f"{stem}_{k}.png" for k in range(1, count + 1)]


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    # a JSON array with one record a line: valid JSON, yet diff- and grep-friendly
    body = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)
    path.write_text(f"[\n{body}\n]\n" if records else "[]\n", encoding="utf-8")


def _count(records: list[dict[str, Any]]) -> dict[str, Any]:
    images = sum(len(r["image"]) if isinstance(r["image"], list) else 1 for r in records)
    return {"records": len(records), "images": images, "tasks": dict(Counter(r["task"] for r in records))}


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
