"""The default model in conversations: a fixed held-out slice of multi-turn conversations (a seed never trained
on), every turn scored with the history as context, held to the floors in accuracy.json, so a regression of
the default model in conversations (a new image in a later turn, a follow-up, "In the first image, ...")
fails CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmkit.api import DEFAULT_MODEL_DIR, VLM
from vlmkit.data.synth import generate_dataset
from vlmkit.evaluation.runner import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conversations") / "seed96"
    # the slice accuracy.json quotes: 100 conversations of a seed never trained on
    generate_dataset(out, n=1000, seed=96, conversations=True, test_fraction=0.1)
    return out


def test_conversation_accuracy_stays_at_the_shipped_level(conversations):
    accuracy = json.loads((DEFAULT_MODEL_DIR / "accuracy.json").read_text())
    floors = accuracy["conversations"]["regression_floors"]
    assert set(floors) >= {"overall", "new_image", "follow_up", "reference"}
    records = json.loads((conversations / "test.json").read_text())
    assert len(records) == 100
    report = evaluate(VLM.from_pretrained(), records, image_folder=conversations, batch_size=64,
                      max_new_tokens=96)  # fmt: skip
    scores = {kind: score.score for kind, score in report.kinds.items()} | {"overall": report.score}
    assert sum(score.n for score in report.kinds.values()) == report.n > 300
    below = {
        name: (scores.get(name), floor) for name, floor in floors.items() if (scores.get(name) or 0) < floor
    }
    assert not below, f"conversation exact match fell below the shipped floors (score, floor): {below}"
