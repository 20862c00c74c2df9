"""Multi-turn conversations: ``vlmkit synth --conversations`` (images arriving in later turns, follow-ups,
references to an earlier image, every answer re-derived from the scenes) and ``vlmkit eval`` scoring every
turn with the history as context, reported by task, turn position and turn kind."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from typer.testing import CliRunner

from test_synth import oracle
from vlmkit.data.synth import generate_dataset, load_scenes
from vlmkit.data.synth_conv import ORDINALS, TURN_KINDS, refer_to
from vlmkit.evaluation import evaluate
from vlmkit.evaluation.records import RecordError, to_items


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "set"
    generate_dataset(out, n=60, seed=11, conversations=True, test_fraction=0.5)
    return out


def load(out: Path, split: str) -> list[dict]:
    return json.loads((out / f"{split}.json").read_text())


def images_of(record: dict) -> list[str]:
    return record["image"] if isinstance(record["image"], list) else [record["image"]]


def unrefer(question: str) -> tuple[int | None, str]:
    """(ordinal index or None, the plain question) of a turn's question."""
    if m := re.fullmatch(r"Describe the (first|second|third) image\.", question):
        return ORDINALS.index(m[1]), "Describe the image."
    if m := re.fullmatch(r"In the (first|second|third) image, (.)(.*)", question):
        return ORDINALS.index(m[1]), m[2].upper() + m[3]
    return None, question


def test_every_turn_is_answered_from_its_scene(conversations):
    scenes = load_scenes(conversations)
    kinds = set()
    for split in ("train", "test"):
        for record in load(conversations, split):
            paths, turns, messages = images_of(record), record["turns"], record["conversations"]
            assert record["task"] == "conversation" and len(messages) == 2 * len(turns)
            shown = 0  # images attached so far
            for k, turn in enumerate(turns):
                human, gpt = messages[2 * k]["value"], messages[2 * k + 1]["value"]
                attached = human.count("<image>")
                assert attached == (turn["kind"] in ("first", "new_image")) and "<image>" not in gpt
                shown += attached
                ordinal, question = unrefer(human.removeprefix("<image>\n"))
                # a plain question is about the latest image; a reference names an earlier one
                about = shown - 1 if ordinal is None else ordinal
                assert (ordinal is not None and ordinal < shown - 1) == (turn["kind"] == "reference")
                assert turn["image"] == about + 1
                assert gpt == oracle(question, [scenes[paths[about]]]), (record["id"], human)
                kinds.add(turn["kind"])
            assert shown == len(paths) <= 3
    assert kinds == set(TURN_KINDS)


def test_conversations_have_later_images_and_are_deterministic(conversations, tmp_path):
    records = load(conversations, "train") + load(conversations, "test")
    late = [r for r in records if any(t["kind"] == "new_image" for t in r["turns"])]
    assert len(late) > len(records) / 2 and max(len(images_of(r)) for r in records) == 3
    assert json.loads((conversations / "synth.json").read_text())["conversations"] is True
    again = tmp_path / "again"
    generate_dataset(again, n=60, seed=11, conversations=True, test_fraction=0.5)
    assert (again / "train.json").read_bytes() == (conversations / "train.json").read_bytes()
    assert (again / "scenes.jsonl").read_bytes() == (conversations / "scenes.jsonl").read_bytes()
    train_images = {p.read_bytes() for p in (conversations / "images" / "train").iterdir()}
    assert not any(p.read_bytes() in train_images for p in (conversations / "images" / "test").iterdir())


def test_refer_to_and_bad_settings(tmp_path):
    assert refer_to("Describe the image.", ordinal="first") == "Describe the first image."
    assert refer_to("Extract the date.", ordinal="second") == "In the second image, extract the date."
    with pytest.raises(ValueError, match="single-image task"):
        generate_dataset(tmp_path / "a", n=4, seed=0, conversations=True, tasks=["multi_compare"])
    with pytest.raises(ValueError, match="questions per image"):
        generate_dataset(tmp_path / "b", n=4, seed=0, conversations=True, questions_per_image=3)
    only_docs = tmp_path / "docs"
    generate_dataset(only_docs, n=6, seed=0, conversations=True, tasks=["doc_date", "doc_total"])
    assert {t["task"] for r in load(only_docs, "train") for t in r["turns"]} <= {"doc_date", "doc_total"}


# ---------------------------------------------------------------------------------------------- evaluation


class LatestImageVLM:
    """Answers from the pixels of the last image of the prompt ("red" / "blue"), or by question text."""

    def __init__(self, *, text_answers: dict[str, str]) -> None:
        self.config = SimpleNamespace(prompt=SimpleNamespace(image_token="<image>"))
        self.text_answers = text_answers
        self.seen: list[tuple[int, str]] = []  # (images given, last user message)

    def generate(self, samples, **generation):
        texts = []
        for sample in samples:
            question = [m for m in sample.messages if m["role"] == "user"][-1]["content"]
            placeholders = sum(m["content"].count("<image>") for m in sample.messages)
            assert placeholders == len(sample.images)
            self.seen.append((len(sample.images), question))
            red = sample.images[-1].getpixel((0, 0))[0] > 128
            texts.append(self.text_answers.get(question, "red" if red else "blue"))
        return SimpleNamespace(texts=texts)


def two_image_record() -> dict:
    return {"id": "c", "task": "conversation", "image": ["red.png", "blue.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Is it round?"}, {"from": "gpt", "value": "no"},
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "In the first image, what colour is it?"}, {"from": "gpt", "value": "red"},
    ], "turns": [{"task": "colour", "kind": "first"}, {"task": "round", "kind": "follow_up"},
                 {"task": "colour", "kind": "new_image"}, {"task": "colour", "kind": "reference"}]}  # fmt: skip


@pytest.fixture
def folder(tmp_path) -> Path:
    Image.new("RGB", (8, 8), (220, 20, 20)).save(tmp_path / "red.png")
    Image.new("RGB", (8, 8), (20, 20, 220)).save(tmp_path / "blue.png")
    return tmp_path


def test_every_turn_is_scored_with_its_history(folder):
    vlm = LatestImageVLM(text_answers={"Is it round?": "yes"})
    report = evaluate(vlm, [two_image_record()], image_folder=folder)
    # each turn sees only the images attached so far; the reference turn is answered from the latest (wrong)
    assert sorted(vlm.seen) == [
        (1, "<image>\nWhat colour is it?"),
        (1, "Is it round?"),
        (2, "<image>\nWhat colour is it?"),
        (2, "In the first image, what colour is it?"),
    ]
    assert [(p.turn, p.kind, p.score) for p in report.predictions] == [
        (1, "first", 1.0), (2, "follow_up", 0.0), (3, "new_image", 1.0), (4, "reference", 0.0)]  # fmt: skip
    assert report.n == 4 and report.score == 0.5
    assert {k: v.score for k, v in report.kinds.items()} == {"first": 1.0, "follow_up": 0.0, "new_image": 1.0,
                                                             "reference": 0.0}  # fmt: skip
    data = report.to_dict()
    assert data["turns"] == {"1": {"score": 1.0, "n": 1}, "2": {"score": 0.0, "n": 1}, "3": {"score": 1.0, "n": 1},
                             "4": {"score": 0.0, "n": 1}}  # fmt: skip
    assert data["task_turns"]["colour"] == {"1": 1.0, "3": 1.0, "4": 0.0}
    assert data["tasks"]["colour"] == {"score": 2 / 3, "n": 3, "skipped": 0}


def test_last_turn_only_and_single_turn_reports_unchanged(folder):
    vlm = LatestImageVLM(text_answers={})
    report = evaluate(vlm, [two_image_record()], image_folder=folder, last_turn_only=True)
    assert [(p.turn, p.kind) for p in report.predictions] == [(4, "reference")] and vlm.seen == [
        (2, "In the first image, what colour is it?")]  # fmt: skip
    single = {"id": "s", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]}  # fmt: skip
    plain = evaluate(LatestImageVLM(text_answers={}), [single], image_folder=folder).to_dict()
    assert plain["score"] == 1.0 and "turns" not in plain and "kinds" not in plain


def test_bad_turn_labels_are_skipped_with_a_reason(folder):
    record = two_image_record() | {"turns": [{"task": "colour"}]}
    with pytest.raises(RecordError, match="'turns' must be a list of 4 objects"):
        to_items(record, index=0)
    report = evaluate(LatestImageVLM(text_answers={}), [record], image_folder=folder)
    assert report.n == 0 and "'turns'" in report.skipped_samples[0].reason


@pytest.mark.slow
def test_cli_synth_and_eval_conversations(folder, tmp_path):
    from vlmkit.cli.main import app

    runner = CliRunner()
    out = tmp_path / "conv"
    result = runner.invoke(app, ["synth", "--out", str(out), "--n", "6", "--seed", "3", "--conversations",
                                 "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["test"]["tasks"] == {"conversation": 1}
    bad = runner.invoke(app, ["synth", "--out", str(tmp_path / "x"), "--n", "4", "--conversations",
                              "--tasks", "multi_change"])  # fmt: skip
    assert bad.exit_code == 2 and "single-image task" in bad.output
    data = tmp_path / "c.json"
    data.write_text(json.dumps([two_image_record()]))
    # the default model answers every turn (its answers about these 8-pixel squares do not matter here)
    result = runner.invoke(app, ["eval", "--data", str(data), "--image-folder", str(folder), "--json",
                                 "--max-new-tokens", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 4 and set(report["kinds"]) == {"first", "follow_up", "new_image", "reference"}
    assert "by task and turn" in result.stderr
    last = runner.invoke(app, ["eval", "--data", str(data), "--image-folder", str(folder), "--json",
                               "--max-new-tokens", "4", "--turns", "last"])  # fmt: skip
    assert last.exit_code == 0 and json.loads(last.stdout)["n"] == 1
