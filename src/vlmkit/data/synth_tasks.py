"""Synthetic tasks: each draws scene(s) from an RNG and asks one question whose answer is computed from them.

A generator returns a ``TaskSample`` (scenes, question, answer). Scenes that cannot carry the question
unambiguously (no shape with a unique kind, a tie in a comparison, ...) are re-drawn from the same RNG, so
the result is still a pure function of the RNG state. Answers are short canonical strings: exact match on
them is meaningful.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from vlmkit.data.synth_scene import (
    COLOURS,
    GRID,
    KINDS,
    Scene,
    ShapeScene,
    caption,
    description,
    holds,
    sample_document,
    sample_shapes,
)

T = TypeVar("T")
RELATIONS = ("left of", "right of", "above", "below")
ORDINAL_IMAGES = ("image 1", "image 2", "image 3")  # the canonical answer to "Which image ...?"


@dataclass(frozen=True)
class TaskSample:
    task: str
    scenes: tuple[Scene, ...]
    question: str  # without image placeholders; the writer adds one per scene
    answer: str


def _retry(make: Callable[[], T | None]) -> T:
    """Call ``make`` until it returns something: it re-draws from its RNG, so this stays deterministic."""
    for _ in range(10_000):
        result = make()
        if result is not None:
            return result
    raise RuntimeError("could not draw a scene for this task")  # unreachable with the built-in tasks


def _shapes(rng: random.Random, size: int, low: int, high: int) -> ShapeScene:
    return sample_shapes(rng, size=size, count=rng.randint(low, high))


def _plural(kind: str) -> str:
    return f"{kind}s"


# ------------------------------------------------------------------------------------- single image, shapes


def caption_task(rng: random.Random, size: int) -> TaskSample:
    scene = _shapes(rng, size, 1, 3)
    return TaskSample("caption", (scene,), "Describe the image.", caption(scene))


def scene_task(rng: random.Random, size: int) -> TaskSample:
    scene = _shapes(rng, size, 2, 4)
    return TaskSample("scene", (scene,), "Describe the scene in detail.", description(scene))


def colour_task(rng: random.Random, size: int) -> TaskSample:
    def make() -> TaskSample | None:
        scene = _shapes(rng, size, 1, 4)
        targets = [s for s in scene.shapes if scene.count(kind=s.kind) == 1]
        if not targets:
            return None
        target = rng.choice(targets)
        return TaskSample("vqa_colour", (scene,), f"What colour is the {target.kind}?", target.colour)

    return _retry(make)


def shape_task(rng: random.Random, size: int) -> TaskSample:
    def make() -> TaskSample | None:
        scene = _shapes(rng, size, 1, 4)
        targets = [s for s in scene.shapes if scene.count(colour=s.colour) == 1]
        if not targets:
            return None
        target = rng.choice(targets)
        return TaskSample("vqa_shape", (scene,), f"What shape is the {target.colour} object?", target.kind)

    return _retry(make)


def count_task(rng: random.Random, size: int) -> TaskSample:
    scene = _shapes(rng, size, 1, 5)
    mode = rng.choice(("all", "kind", "colour"))
    if mode == "kind":
        kind = rng.choice(KINDS)
        question, answer = f"How many {_plural(kind)} are there?", scene.count(kind=kind)
    elif mode == "colour":
        colour = rng.choice([s.colour for s in scene.shapes] + list(COLOURS))  # favour present colours
        question, answer = f"How many {colour} shapes are there?", scene.count(colour=colour)
    else:
        question, answer = "How many shapes are there?", len(scene.shapes)
    return TaskSample("vqa_count", (scene,), question, str(answer))


def exist_task(rng: random.Random, size: int) -> TaskSample:
    scene = _shapes(rng, size, 1, 4)
    if rng.random() < 0.5:
        target = rng.choice(scene.shapes)
        colour, kind = target.colour, target.kind
    else:  # a near miss: shares the colour or the kind of something that is there
        present = {(s.colour, s.kind) for s in scene.shapes}
        near = {(c, s.kind) for s in scene.shapes for c in COLOURS} | {(s.colour, k) for s in scene.shapes
                                                                         for k in KINDS}  # fmt: skip
        colour, kind = rng.choice(sorted(near - present))  # sorted: set order must not leak into the data
    answer = "yes" if scene.count(colour=colour, kind=kind) else "no"
    article = "an" if colour[0] in "aeiou" else "a"
    return TaskSample("vqa_exist", (scene,), f"Is there {article} {colour} {kind}?", answer)


def position_task(rng: random.Random, size: int) -> TaskSample:
    scene = _shapes(rng, size, 1, 4)
    target = rng.choice(scene.shapes)
    return TaskSample("vqa_position", (scene,), f"Where is the {scene.referent(target)}?", target.position)


def size_task(rng: random.Random, size: int) -> TaskSample:
    scene = _shapes(rng, size, 1, 4)
    target = rng.choice(scene.shapes)
    question = f"Is the {scene.referent(target)} small or large?"
    return TaskSample("vqa_size", (scene,), question, target.size)


def relation_task(rng: random.Random, size: int) -> TaskSample:
    """ "Is the circle left of the blue square?" (yes/no) or "What is above the square?" (colour + kind)."""

    def make() -> TaskSample | None:
        scene = _shapes(rng, size, 2, 4)
        rel = rng.choice(RELATIONS)
        a, b = rng.sample(scene.shapes, 2)
        if rng.random() < 0.5:
            if not (holds(rel, a, b) or holds(rel, b, a)):  # same column (row): neither answer is right
                return None
            question = f"Is the {scene.referent(a)} {rel} the {scene.referent(b)}?"
            return TaskSample("vqa_relation", (scene,), question, "yes" if holds(rel, a, b) else "no")
        matches = [s for s in scene.shapes if s is not b and holds(rel, s, b)]
        if len(matches) != 1:
            return None
        question = f"What is {rel} the {scene.referent(b)}?"
        return TaskSample("vqa_relation", (scene,), question, matches[0].name)

    return _retry(make)


# ------------------------------------------------------------------------------------------------- documents

_DOC_QUESTIONS: dict[str, dict[str, str]] = {
    "doc_date": {"invoice": "Extract the date.", "receipt": "Extract the date.", "form": "Extract the date."},
    "doc_total": {"invoice": "What is the total?", "receipt": "What is the total?"},
    "doc_number": {"invoice": "What is the invoice number?", "form": "What is the ID number?"},
    "doc_name": {
        "invoice": "Who is the invoice addressed to?",
        "receipt": "What is the store name?",
        "form": "What is the name on the form?",
    },  # fmt: skip
}


def _document_task(task: str) -> Callable[[random.Random, int], TaskSample]:
    field = task.removeprefix("doc_")

    def make(rng: random.Random, size: int) -> TaskSample:
        doc_type = rng.choice(sorted(_DOC_QUESTIONS[task]))
        doc = sample_document(rng, size=size, doc_type=doc_type)
        answer = {"date": doc.date, "total": doc.total, "number": doc.number, "name": doc.name}[field]
        return TaskSample(task, (doc,), _DOC_QUESTIONS[task][doc_type], answer)

    return make


# ----------------------------------------------------------------------------------------------- multi-image


def compare_task(rng: random.Random, size: int) -> TaskSample:
    """Two or three images: "Which image has more circles?" -> "image 2" (only when the maximum is unique)."""

    def make() -> TaskSample | None:
        scenes = tuple(_shapes(rng, size, 1, 4) for _ in range(rng.choice((2, 3))))
        more = "more" if len(scenes) == 2 else "the most"
        mode = rng.choice(("all", "kind", "colour"))
        if mode == "kind":
            kind = rng.choice(KINDS)
            what, counts = _plural(kind), [s.count(kind=kind) for s in scenes]
        elif mode == "colour":
            colour = rng.choice(list(COLOURS))
            what, counts = f"{colour} shapes", [s.count(colour=colour) for s in scenes]
        else:
            what, counts = "shapes", [len(s.shapes) for s in scenes]
        if counts.count(max(counts)) != 1:
            return None
        answer = ORDINAL_IMAGES[counts.index(max(counts))]
        return TaskSample("multi_compare", scenes, f"Which image has {more} {what}?", answer)

    return _retry(make)


def change_task(rng: random.Random, size: int) -> TaskSample:
    """Two images, one shape recoloured or moved: "the red circle turned blue" / "... moved to the top left"."""
    first = _shapes(rng, size, 1, 3)
    target = rng.choice(first.shapes)
    if rng.random() < 0.5:
        taken = {(s.colour, s.kind) for s in first.shapes}
        colour = rng.choice([c for c in COLOURS if (c, target.kind) not in taken])
        changed = replace(target, colour=colour)
        answer = f"the {target.name} turned {colour}"
    else:
        free = [
            cell for cell in range(GRID * GRID) if cell not in {s.row * GRID + s.col for s in first.shapes}
        ]
        cell = rng.choice(free)
        changed = replace(target, row=cell // GRID, col=cell % GRID)
        answer = f"the {target.name} moved to the {changed.position}"
    second = replace(first, shapes=tuple(changed if s is target else s for s in first.shapes))
    return TaskSample("multi_change", (first, second), "What changed between the images?", answer)


TASKS: dict[str, Callable[[random.Random, int], TaskSample]] = {
    "caption": caption_task,
    "vqa_colour": colour_task,
    "vqa_shape": shape_task,
    "vqa_count": count_task,
    "vqa_exist": exist_task,
    "vqa_position": position_task,
    "vqa_size": size_task,
    "vqa_relation": relation_task,
    "doc_date": _document_task("doc_date"),
    "doc_total": _document_task("doc_total"),
    "doc_number": _document_task("doc_number"),
    "doc_name": _document_task("doc_name"),
    "scene": scene_task,
    "multi_compare": compare_task,
    "multi_change": change_task,
}
