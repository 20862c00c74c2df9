"""Synthetic tasks: each draws scene(s) from an RNG and asks one question whose answer is computed from them.

A generator returns a ``TaskSample`` (scenes, question, answer). Scenes that cannot carry the question
unambiguously (no shape with a unique kind, a tie in a comparison, ...) are re-drawn from the same RNG, so
the result is still a pure function of the RNG state. Answers are short canonical strings: exact match on
them is meaningful.

The questions themselves are "ask" functions ``(rng, scene) -> (question, answer) | None`` (None: this scene
cannot carry the question), so ``follow_ups`` can ask further questions about the scenes of a sample: several
questions about one image pack into one training sequence.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeAlias, TypeVar

from vlmkit.data.synth_scene import (
    COLOURS,
    GRID,
    KINDS,
    DocumentScene,
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
FOLLOW_UP_TRIES = 8  # draws per task when looking for a question not yet asked about a scene


@dataclass(frozen=True)
class TaskSample:
    task: str
    scenes: tuple[Scene, ...]
    question: str  # without image placeholders; the writer adds one per scene
    answer: str


QA: TypeAlias = tuple[str, str]  # (question, answer)
TaskFn: TypeAlias = Callable[[random.Random, int], TaskSample]
ShapeAsk: TypeAlias = Callable[[random.Random, ShapeScene], QA | None]
Ask: TypeAlias = Callable[[random.Random, tuple[Scene, ...]], QA | None]


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
# Each ask function consumes the RNG exactly as its task did before the split into draw + ask: the data of
# existing seeds must not change.


def ask_caption(rng: random.Random, scene: ShapeScene) -> QA | None:
    return "Describe the image.", caption(scene)


def ask_scene(rng: random.Random, scene: ShapeScene) -> QA | None:
    if len(scene.shapes) < 2:  # the description ends with a relation between two shapes
        return None
    return "Describe the scene in detail.", description(scene)


def ask_colour(rng: random.Random, scene: ShapeScene) -> QA | None:
    targets = [s for s in scene.shapes if scene.count(kind=s.kind) == 1]
    if not targets:
        return None
    target = rng.choice(targets)
    return f"What colour is the {target.kind}?", target.colour


def ask_shape(rng: random.Random, scene: ShapeScene) -> QA | None:
    targets = [s for s in scene.shapes if scene.count(colour=s.colour) == 1]
    if not targets:
        return None
    target = rng.choice(targets)
    return f"What shape is the {target.colour} object?", target.kind


def ask_count(rng: random.Random, scene: ShapeScene) -> QA:
    mode = rng.choice(("all", "kind", "colour"))
    if mode == "kind":
        kind = rng.choice(KINDS)
        question, answer = f"How many {_plural(kind)} are there?", scene.count(kind=kind)
    elif mode == "colour":
        colour = rng.choice([s.colour for s in scene.shapes] + list(COLOURS))  # favour present colours
        question, answer = f"How many {colour} shapes are there?", scene.count(colour=colour)
    else:
        question, answer = "How many shapes are there?", len(scene.shapes)
    return question, str(answer)


def ask_exist(rng: random.Random, scene: ShapeScene) -> QA | None:
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
    return f"Is there {article} {colour} {kind}?", answer


def ask_position(rng: random.Random, scene: ShapeScene) -> QA | None:
    target = rng.choice(scene.shapes)
    return f"Where is the {scene.referent(target)}?", target.position


def ask_size(rng: random.Random, scene: ShapeScene) -> QA | None:
    target = rng.choice(scene.shapes)
    return f"Is the {scene.referent(target)} small or large?", target.size


def ask_relation(rng: random.Random, scene: ShapeScene) -> QA | None:
    """ "Is the circle left of the blue square?" (yes/no) or "What is above the square?" (colour + kind)."""
    if len(scene.shapes) < 2:
        return None
    rel = rng.choice(RELATIONS)
    a, b = rng.sample(scene.shapes, 2)
    if rng.random() < 0.5:
        if not (holds(rel, a, b) or holds(rel, b, a)):  # same column (row): neither answer is right
            return None
        return f"Is the {scene.referent(a)} {rel} the {scene.referent(b)}?", "yes" if holds(
            rel, a, b
        ) else "no"
    matches = [s for s in scene.shapes if s is not b and holds(rel, s, b)]
    if len(matches) != 1:
        return None
    return f"What is {rel} the {scene.referent(b)}?", matches[0].name


def _shape_task(task: str, ask: ShapeAsk, *, low: int, high: int) -> TaskFn:
    """Draw a scene of ``low``..``high`` shapes and ask about it, re-drawing both until the question fits."""

    def draw(rng: random.Random, size: int) -> TaskSample:
        def make() -> TaskSample | None:
            scene = _shapes(rng, size, low, high)
            qa = ask(rng, scene)
            return None if qa is None else TaskSample(task, (scene,), *qa)

        return _retry(make)

    return draw


caption_task = _shape_task("caption", ask_caption, low=1, high=3)
scene_task = _shape_task("scene", ask_scene, low=2, high=4)
colour_task = _shape_task("vqa_colour", ask_colour, low=1, high=4)
shape_task = _shape_task("vqa_shape", ask_shape, low=1, high=4)
count_task = _shape_task("vqa_count", ask_count, low=1, high=5)
exist_task = _shape_task("vqa_exist", ask_exist, low=1, high=4)
position_task = _shape_task("vqa_position", ask_position, low=1, high=4)
size_task = _shape_task("vqa_size", ask_size, low=1, high=4)
relation_task = _shape_task("vqa_relation", ask_relation, low=2, high=4)

SHAPE_QUESTIONS: dict[str, ShapeAsk] = {
    "caption": ask_caption,
    "vqa_colour": ask_colour,
    "vqa_shape": ask_shape,
    "vqa_count": ask_count,
    "vqa_exist": ask_exist,
    "vqa_position": ask_position,
    "vqa_size": ask_size,
    "vqa_relation": ask_relation,
    "scene": ask_scene,
}


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


def ask_document(task: str) -> Callable[[random.Random, DocumentScene], QA | None]:
    """The question of a ``doc_*`` task about a given document; None where its type lacks the field."""
    field = task.removeprefix("doc_")

    def ask(rng: random.Random, doc: DocumentScene) -> QA | None:
        question = _DOC_QUESTIONS[task].get(doc.doc_type)  # receipts have no number, forms no total
        if question is None:
            return None
        return question, {"date": doc.date, "total": doc.total, "number": doc.number, "name": doc.name}[field]

    return ask


def _document_task(task: str) -> TaskFn:
    ask = ask_document(task)

    def make(rng: random.Random, size: int) -> TaskSample:
        doc_type = rng.choice(sorted(_DOC_QUESTIONS[task]))
        doc = sample_document(rng, size=size, doc_type=doc_type)
        qa = ask(rng, doc)
        assert qa is not None  # the type was chosen among those that have the field
        return TaskSample(task, (doc,), *qa)

    return make


# ----------------------------------------------------------------------------------------------- multi-image


def ask_compare(rng: random.Random, scenes: Sequence[ShapeScene]) -> QA | None:
    """ "Which image has more circles?" -> "image 2"; None unless the maximum is unique."""
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
    return f"Which image has {more} {what}?", ORDINAL_IMAGES[counts.index(max(counts))]


def ask_image_count(rng: random.Random, scenes: Sequence[ShapeScene]) -> QA:
    """ "How many circles are in image 2?" -> "1": one image's count, in a set of images."""
    index = rng.randrange(len(scenes))
    question, answer = ask_count(rng, scenes[index])
    what = question.removeprefix("How many ").removesuffix(" are there?")
    return f"How many {what} are in image {index + 1}?", answer


def _compare_scenes(rng: random.Random, size: int) -> tuple[ShapeScene, ...]:
    return tuple(_shapes(rng, size, 1, 4) for _ in range(rng.choice((2, 3))))


def compare_task(rng: random.Random, size: int) -> TaskSample:
    """Two or three images and a comparison of their counts (only when the maximum is unique)."""

    def make() -> TaskSample | None:
        scenes = _compare_scenes(rng, size)
        qa = ask_compare(rng, scenes)
        return None if qa is None else TaskSample("multi_compare", scenes, *qa)

    return _retry(make)


def image_count_task(rng: random.Random, size: int) -> TaskSample:
    """The scenes of ``multi_compare`` and the count behind a comparison, for one named image."""
    scenes = _compare_scenes(rng, size)
    return TaskSample("multi_count", scenes, *ask_image_count(rng, scenes))


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


TASKS: dict[str, TaskFn] = {
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
# Opt-in tasks: drawn only when named in ``tasks``, so the default mix (and every set made before them) stays
# as it was. ``multi_count`` is a training aid: it asks for the per-image counts a comparison rests on.
EXTRA_TASKS: dict[str, TaskFn] = {"multi_count": image_count_task}
ALL_TASKS: dict[str, TaskFn] = {**TASKS, **EXTRA_TASKS}


# ------------------------------------------------------------------------------------------------ follow-ups


def _on_one_shape_scene(ask: ShapeAsk) -> Ask:
    def on(rng: random.Random, scenes: tuple[Scene, ...]) -> QA | None:
        scene = scenes[0] if len(scenes) == 1 else None
        return ask(rng, scene) if isinstance(scene, ShapeScene) else None

    return on


def _on_one_document(ask: Callable[[random.Random, DocumentScene], QA | None]) -> Ask:
    def on(rng: random.Random, scenes: tuple[Scene, ...]) -> QA | None:
        scene = scenes[0] if len(scenes) == 1 else None
        return ask(rng, scene) if isinstance(scene, DocumentScene) else None

    return on


def _on_several_shape_scenes(ask: Callable[[random.Random, Sequence[ShapeScene]], QA | None]) -> Ask:
    def on(rng: random.Random, scenes: tuple[Scene, ...]) -> QA | None:
        shapes = [scene for scene in scenes if isinstance(scene, ShapeScene)]
        return ask(rng, shapes) if len(scenes) > 1 and len(shapes) == len(scenes) else None

    return on


# Tasks that can ask about the scene(s) of another task's sample; a sample is followed up only by tasks of
# its own family. multi_change has none: "What changed?" is the only question its pair of scenes carries.
_FAMILIES: tuple[dict[str, Ask], ...] = (
    {task: _on_one_shape_scene(ask) for task, ask in SHAPE_QUESTIONS.items()},
    {task: _on_one_document(ask_document(task)) for task in _DOC_QUESTIONS},
    {
        "multi_compare": _on_several_shape_scenes(ask_compare),
        "multi_count": _on_several_shape_scenes(ask_image_count),
    },
)


def follow_ups(
    rng: random.Random, first: TaskSample, *, tasks: Sequence[str], count: int
) -> list[TaskSample]:
    """Up to ``count`` more questions about ``first.scenes`` from ``tasks``, none asked twice.

    Tasks not asked yet come first (in random order), then asked ones again with a new target; fewer than
    ``count`` come back once ``FOLLOW_UP_TRIES`` draws per task find no new question (e.g. a receipt has only
    three fields). A pure function of the RNG state.
    """
    family = next((f for f in _FAMILIES if first.task in f), {})
    askers = {task: family[task] for task in tasks if task in family}
    samples = [first]
    while len(samples) <= count:
        sample = _new_question(rng, samples, askers)
        if sample is None:
            break
        samples.append(sample)
    return samples[1:]


def _new_question(rng: random.Random, samples: list[TaskSample], askers: dict[str, Ask]) -> TaskSample | None:
    asked_tasks = {sample.task for sample in samples}
    asked = {sample.question for sample in samples}
    fresh = [task for task in askers if task not in asked_tasks]
    again = [task for task in askers if task in asked_tasks]
    rng.shuffle(fresh)
    rng.shuffle(again)
    scenes = samples[0].scenes
    for task in fresh + again:
        for _ in range(FOLLOW_UP_TRIES):
            qa = askers[task](rng, scenes)
            if qa is not None and qa[0] not in asked:
                return TaskSample(task, scenes, *qa)
    return None
