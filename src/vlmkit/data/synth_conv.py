"""Synthetic multi-turn conversations: one to three images arriving in different user turns.

A conversation is a list of turns, each a question and the answer computed from the scene it is about:

- ``first``: turn 1, the first image arrives with a question about it;
- ``new_image``: a later turn brings the next image, and its question is about that image (the latest);
- ``follow_up``: a text-only turn asking something more about the latest image;
- ``reference``: a text-only turn about an earlier image by its ordinal ("In the first image, ...").

Questions come from the single-image tasks (``synth_tasks.SHAPE_QUESTIONS`` and the document fields), so
each turn is labelled with its task as well as its kind. A conversation is a pure function of its RNG.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from vlmkit.data.synth_scene import DocumentScene, Scene, ShapeScene
from vlmkit.data.synth_tasks import SHAPE_QUESTIONS, TASKS, ask_document

CONVERSATION_TASK = "conversation"  # the ``task`` of a conversation record; its turns carry their own tasks
TURN_KINDS = ("first", "new_image", "follow_up", "reference")
ORDINALS = ("first", "second", "third")
DOCUMENT_TASKS = ("doc_date", "doc_total", "doc_number", "doc_name")
SINGLE_IMAGE_TASKS = (*SHAPE_QUESTIONS, *DOCUMENT_TASKS)
IMAGE_COUNT_WEIGHTS = {1: 0.2, 2: 0.45, 3: 0.35}  # mostly several images: the later ones are the point
EXTRA_TURNS = (0, 1, 1, 2)  # text-only turns after each image arrives (drawn uniformly)
REFERENCE_SHARE = 0.45  # of the text-only turns once an earlier image exists
_TRIES = 8


@dataclass(frozen=True)
class Turn:
    question: str  # without the image placeholder
    answer: str
    task: str  # the single-image task the question belongs to
    kind: str  # one of TURN_KINDS
    about: int  # index of the image the question is about
    attaches: bool  # this user turn brings image ``about``


@dataclass(frozen=True)
class Conversation:
    scenes: tuple[Scene, ...]
    turns: tuple[Turn, ...]


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """The single-image tasks among ``tasks`` (conversations ask only those); at least one is needed."""
    chosen = [task for task in tasks if task in SINGLE_IMAGE_TASKS]
    if not chosen:
        raise ValueError(
            f"conversations need at least one single-image task; choose from {', '.join(SINGLE_IMAGE_TASKS)}"
        )
    return chosen


def draw_conversation(rng: random.Random, *, image_size: int, tasks: Sequence[str]) -> Conversation:
    """One to three images; each arrives with a question, then 0-2 text-only turns (follow-ups or references)."""
    count = rng.choices(list(IMAGE_COUNT_WEIGHTS), weights=list(IMAGE_COUNT_WEIGHTS.values()))[0]
    scenes: list[Scene] = []
    turns: list[Turn] = []
    asked: list[set[str]] = []
    for index in range(count):
        task = tasks[rng.randrange(len(tasks))]
        sample = TASKS[task](rng, image_size)
        scenes.append(sample.scenes[0])
        asked.append({sample.question})
        kind = "first" if index == 0 else "new_image"
        turns.append(Turn(sample.question, sample.answer, task, kind, about=index, attaches=True))
        for _ in range(rng.choice(EXTRA_TURNS)):
            refer = index > 0 and rng.random() < REFERENCE_SHARE
            about = rng.randrange(index) if refer else index
            turn = _another_question(rng, scenes[about], about=about, tasks=tasks, asked=asked[about])
            if turn is None:
                continue
            if refer:
                turn = Turn(refer_to(turn.question, ordinal=ORDINALS[about]), turn.answer, turn.task,
                            "reference", about=about, attaches=False)  # fmt: skip
            asked[about].add(turn.question)
            turns.append(turn)
    return Conversation(scenes=tuple(scenes), turns=tuple(turns))


def refer_to(question: str, *, ordinal: str) -> str:
    """ "What colour is the circle?" -> "In the first image, what colour is the circle?"."""
    if question == "Describe the image.":
        return f"Describe the {ordinal} image."
    return f"In the {ordinal} image, {question[0].lower()}{question[1:]}"


def _another_question(
    rng: random.Random, scene: Scene, *, about: int, tasks: Sequence[str], asked: set[str]
) -> Turn | None:
    """A question about ``scene`` not asked about it yet, from a random task that fits it; None if none."""
    fitting = [task for task in tasks if (task in DOCUMENT_TASKS) == isinstance(scene, DocumentScene)]
    for _ in range(_TRIES):
        task = fitting[rng.randrange(len(fitting))] if fitting else None
        if task is None:
            return None
        if isinstance(scene, ShapeScene):
            qa = SHAPE_QUESTIONS[task](rng, scene)
        else:
            qa = ask_document(task)(rng, scene)
        if qa is not None and qa[0] not in asked:
            return Turn(qa[0], qa[1], task, "follow_up", about=about, attaches=False)
    return None
