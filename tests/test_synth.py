"""The synthetic data generator: determinism, answers re-derived from the saved scenes, splits, CLI.

``oracle`` below answers every question from the scene JSON with its own parsing and geometry, independently of
the generator's code, so a wrong answer in the data (or a question that does not determine its answer) fails.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from vlmkit.data import synth
from vlmkit.data.synth import EXTRA_TASKS, TASKS, generate_dataset, load_scenes, render_scene
from vlmkit.data.synth_render import document_font
from vlmkit.data.synth_scene import DocumentScene, ShapeScene, sample_document, scene_from_dict

N = 45  # three records of every task
K = 6  # questions per train image of the grouped set
OUTPUT_FILES = ("train.json", "test.json", "scenes.jsonl", "synth.json")
POS = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "centre",
       (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}  # fmt: skip
WORDS = ["zero", "one", "two", "three", "four", "five"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    generate_dataset(out, n=N, seed=7, image_size=64, test_fraction=0.2)
    return out


@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "grouped"
    generate_dataset(out, n=300, seed=5, image_size=64, test_fraction=0.1, questions_per_image=K)
    return out


def records(out: Path, split: str) -> list[dict]:
    return json.loads((out / f"{split}.json").read_text())


def image_list(record: dict) -> list[str]:
    return record["image"] if isinstance(record["image"], list) else [record["image"]]


# ------------------------------------------------------------------------------------------- the oracle


def phrase(row: int, col: int) -> str:
    name = POS[row, col]
    return "in the centre" if name == "centre" else f"on the {name}" if row == 1 else f"at the {name}"


def find(scene: ShapeScene, ref: str):
    found = [s for s in scene.shapes if ref in (s.kind, f"{s.colour} {s.kind}")]
    assert len(found) == 1, f"{ref!r} does not name exactly one shape"
    return found[0]


def rel_holds(rel: str, a, b) -> bool:
    return {
        "left of": a.col < b.col,
        "right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[rel]


def count(scene: ShapeScene, what: str) -> int:
    if what == "shapes":
        return len(scene.shapes)
    if what.endswith(" shapes"):
        return sum(s.colour == what.split()[0] for s in scene.shapes)
    return sum(f"{s.kind}s" == what for s in scene.shapes)


def oracle_shapes(question: str, scene: ShapeScene) -> str:
    ordered = sorted(scene.shapes, key=lambda s: (s.row, s.col))
    if question == "Describe the image.":
        parts = [f"a {s.size} {s.colour} {s.kind} {phrase(s.row, s.col)}" for s in ordered]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if question == "Describe the scene in detail.":
        n = len(ordered)
        text = f"There are {WORDS[n]} shapes on a {scene.background} background."
        text += "".join(f" A {s.size} {s.colour} {s.kind} is {phrase(s.row, s.col)}." for s in ordered)
        a, b = ordered[:2]
        rel = (
            ("left of" if a.col < b.col else "right of")
            if a.col != b.col
            else "above"
            if a.row < b.row
            else "below"
        )
        return text + f" The {a.colour} {a.kind} is {rel} the {b.colour} {b.kind}."
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return find(scene, m[1]).colour
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (shape,) = [s for s in scene.shapes if s.colour == m[1]]
        return shape.kind
    if m := re.fullmatch(r"How many (.+) are there\?", question):
        return str(count(scene, m[1]))
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "yes" if any((s.colour, s.kind) == (m[1], m[2]) for s in scene.shapes) else "no"
    if m := re.fullmatch(r"Where is the (.+)\?", question):
        shape = find(scene, m[1])
        return POS[shape.row, shape.col]
    if m := re.fullmatch(r"Is the (.+) small or large\?", question):
        return find(scene, m[1]).size
    if m := re.fullmatch(r"Is the (.+?) (left of|right of|above|below) the (.+)\?", question):
        a, b = find(scene, m[1]), find(scene, m[3])
        assert rel_holds(m[2], a, b) or rel_holds(m[2], b, a), "undetermined relation"
        return "yes" if rel_holds(m[2], a, b) else "no"
    if m := re.fullmatch(r"What is (left of|right of|above|below) the (.+)\?", question):
        b = find(scene, m[2])
        (a,) = [s for s in scene.shapes if s is not b and rel_holds(m[1], s, b)]
        return f"{a.colour} {a.kind}"
    raise AssertionError(f"unknown question {question!r}")


def oracle_document(question: str, doc: DocumentScene) -> str:
    if doc.doc_type == "receipt":
        assert doc.total_cents == sum(cents for _, cents in doc.items)
    answer = {
        "Extract the date.": doc.date,
        "What is the total?": f"{doc.total_cents // 100}.{doc.total_cents % 100:02d}",
        "What is the invoice number?": doc.number,
        "What is the ID number?": doc.number,
        "Who is the invoice addressed to?": doc.name,
        "What is the store name?": doc.name,
        "What is the name on the form?": doc.name,
    }[question]
    assert answer and answer in " ".join(doc.lines()), "the answer must be visible in the rendered text"
    return answer


def oracle_multi(question: str, scenes: list[ShapeScene]) -> str:
    if m := re.fullmatch(r"Which image has (?:more|the most) (.+)\?", question):
        counts = [count(scene, m[1]) for scene in scenes]
        assert counts.count(max(counts)) == 1, "tie"
        return f"image {counts.index(max(counts)) + 1}"
    if m := re.fullmatch(r"How many (.+) are in image (\d)\?", question):
        return str(count(scenes[int(m[2]) - 1], m[1]))
    assert question == "What changed between the images?"
    first, second = scenes
    (old, new), *others = [(a, b) for a, b in zip(first.shapes, second.shapes, strict=True) if a != b]
    assert not others and first.background == second.background
    if old.colour != new.colour:
        assert (old.row, old.col) == (new.row, new.col)
        return f"the {old.colour} {old.kind} turned {new.colour}"
    return f"the {old.colour} {old.kind} moved to the {POS[new.row, new.col]}"


def oracle(question: str, scenes: list) -> str:
    if len(scenes) > 1:
        return oracle_multi(question, scenes)
    if isinstance(scenes[0], DocumentScene):
        return oracle_document(question, scenes[0])
    return oracle_shapes(question, scenes[0])


# -------------------------------------------------------------------------------------------------- tests


def check_answers(out: Path, split: str) -> set[str]:
    """Re-derive every answer of a split from scenes.jsonl; return the tasks seen."""
    scenes = load_scenes(out)
    for record in records(out, split):
        human, gpt = record["conversations"]
        question = human["value"].split("\n")[-1]
        expected = oracle(question, [scenes[path] for path in image_list(record)])
        assert gpt["value"] == expected, (record["id"], question)
    return {record["task"] for record in records(out, split)}


def json_digest(out: Path) -> str:
    return hashlib.sha256(b"".join((out / name).read_bytes() for name in OUTPUT_FILES)).hexdigest()


def test_answers_match_the_scene_descriptions(dataset):
    assert check_answers(dataset, "train") | check_answers(dataset, "test") == set(TASKS)


@pytest.mark.parametrize(
    ("kwargs", "digest"),
    [
        ({"n": N, "seed": 7, "image_size": 64, "test_fraction": 0.2},
         "aa99bcb8d5872a7b55b9db351b6d3560a34b345f2d80ff4dbac2e7146000a6ba"),
        ({"n": 40, "seed": 3, "image_size": 96, "test_fraction": 0.25,
          "tasks": ["multi_compare", "doc_total", "vqa_relation"], "questions_per_image": 1},
         "6ce42ed0c658658900fb38de7f33e58b0f2978fd075facc0bbab32dbe21113c7"),
    ],
)  # fmt: skip
def test_one_question_per_image_is_unchanged(tmp_path, kwargs, digest):
    """Hashes of the output written before ``questions_per_image`` existed: existing sets must not change.

    Pixels are a function of the scenes in scenes.jsonl (checked by test_scene_round_trip_and_rendering)."""
    generate_dataset(tmp_path / "set", **kwargs)
    assert json_digest(tmp_path / "set") == digest


def test_record_format_and_placeholders(dataset):
    train, test = records(dataset, "train"), records(dataset, "test")
    assert (len(train), len(test)) == (36, 9)
    ids = [r["id"] for r in train + test]
    assert len(set(ids)) == len(ids)
    for record in train + test:
        assert list(record) == ["id", "task", "image", "conversations"]
        human = record["conversations"][0]
        assert human["from"] == "human" and record["conversations"][1]["from"] == "gpt"
        assert human["value"].count("<image>") == len(image_list(record))
        if record["task"].startswith("multi_"):
            assert isinstance(record["image"], list) and len(record["image"]) in (2, 3)
        for path in image_list(record):
            with Image.open(dataset / path) as image:
                assert image.size == (64, 64) and image.mode == "RGB"


@pytest.mark.parametrize("name", ["dataset", "grouped"])
def test_splits_share_no_image(name, request):
    out = request.getfixturevalue(name)

    def hashes(split: str) -> set[str]:
        paths = [p for r in records(out, split) for p in image_list(r)]
        return {hashlib.sha1(np.asarray(Image.open(out / p)).tobytes()).hexdigest() for p in paths}

    assert not hashes("train") & hashes("test")


def test_test_images_equal_to_train_are_redrawn(tmp_path, monkeypatch):
    """Force a collision: the first test draw copies train record 0; the generator must draw again."""
    original = synth.draw_sample
    attempts = []

    def colliding(*, split: str, attempt: int = 0, **kwargs):
        attempts.append((split, attempt))
        if split == "test" and attempt == 0:
            return original(split="train", attempt=0, **kwargs | {"index": 0, "task": "caption"})
        return original(split=split, attempt=attempt, **kwargs)

    monkeypatch.setattr(synth, "draw_sample", colliding)
    generate_dataset(tmp_path / "out", n=4, seed=1, test_fraction=0.25, tasks=["caption"])
    assert ("test", 1) in attempts
    train = np.asarray(Image.open(tmp_path / "out/images/train/000000.png"))
    assert not np.array_equal(train, np.asarray(Image.open(tmp_path / "out/images/test/000000.png")))


def test_same_seed_same_bytes_different_seed_differs(dataset, tmp_path):
    again = tmp_path / "again"
    generate_dataset(again, n=N, seed=7, image_size=64, test_fraction=0.2)
    for name in OUTPUT_FILES:
        assert (again / name).read_bytes() == (dataset / name).read_bytes(), name
    for path in sorted((dataset / "images").rglob("*.png")):
        same = again / path.relative_to(dataset)
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(same))), path
    other = tmp_path / "other"
    generate_dataset(other, n=N, seed=8, image_size=64, test_fraction=0.2)
    assert (other / "train.json").read_bytes() != (dataset / "train.json").read_bytes()


@pytest.mark.parametrize("name", ["dataset", "grouped"])
def test_scene_round_trip_and_rendering(name, request):
    out = request.getfixturevalue(name)
    for path, scene in load_scenes(out).items():
        assert scene_from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
        assert np.array_equal(np.asarray(render_scene(scene)), np.asarray(Image.open(out / path)))


@pytest.mark.parametrize("size", [64, 96])
def test_document_text_fits_the_canvas(size):
    font = document_font(size)
    import random

    rng = random.Random(0)
    for _ in range(200):
        doc = sample_document(rng, size=size)
        widest = max(font.getbbox(line)[2] for line in doc.lines())
        assert widest <= size - 2, (doc.lines(), widest)


def test_image_size_option(tmp_path):
    counts = generate_dataset(tmp_path / "big", n=15, seed=0, image_size=96, test_fraction=0.0)
    assert counts["test"]["records"] == 0 and counts["train"]["records"] == 15
    with Image.open(tmp_path / "big/images/train/000008.png") as image:  # a document
        assert image.size == (96, 96)


def test_bad_settings_and_foreign_directories(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        generate_dataset(tmp_path / "a", n=0, seed=0)
    with pytest.raises(ValueError, match="image size"):
        generate_dataset(tmp_path / "a", n=5, seed=0, image_size=16)
    with pytest.raises(ValueError, match="unknown task"):
        generate_dataset(tmp_path / "a", n=5, seed=0, tasks=["vqa_colour", "juggling"])
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"questions per image must be >= 1, got {bad}"):
            generate_dataset(tmp_path / "a", n=5, seed=0, questions_per_image=bad)
    assert not (tmp_path / "a").exists()  # validated before anything is written
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not made by vlmkit synth"):
        generate_dataset(foreign, n=5, seed=0)
    assert (foreign / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    generate_dataset(ours, n=20, seed=0)
    generate_dataset(ours, n=5, seed=0, test_fraction=0.0)  # re-running replaces a previous output
    assert len(list((ours / "images/train").iterdir())) == 5 and not list((ours / "images/test").iterdir())


def test_opt_in_per_image_counts_match_the_scenes_and_stay_out_of_the_default(tmp_path):
    """``multi_count`` ("How many circles are in image 2?") is drawn only when named; it follows up comparisons."""
    assert "multi_count" in EXTRA_TASKS and "multi_count" not in TASKS
    out = tmp_path / "counts"
    generate_dataset(out, n=60, seed=4, test_fraction=0.2, tasks=["multi_compare", "multi_count"],
                     questions_per_image=4)  # fmt: skip
    assert check_answers(out, "train") == check_answers(out, "test") == {"multi_compare", "multi_count"}
    asked = {question(r).split("\n")[-1] for r in records(out, "train") if r["task"] == "multi_count"}
    assert any(" in image 3?" in q for q in asked) and any(q.startswith("How many circles") for q in asked)
    mixed = [g for g in by_image(records(out, "train")).values() if len({r["task"] for r in g}) == 2]
    assert mixed, "per-image counts should follow up comparisons of the same images"
    default = tmp_path / "default"
    generate_dataset(default, n=60, seed=4, test_fraction=0.2, questions_per_image=4)
    assert "multi_count" not in {r["task"] for r in records(default, "train") + records(default, "test")}


# ------------------------------------------------------------------------------ several questions per image


def by_image(recs: list[dict]) -> dict[tuple[str, ...], list[dict]]:
    groups: dict[tuple[str, ...], list[dict]] = {}
    for record in recs:
        groups.setdefault(tuple(image_list(record)), []).append(record)
    return groups


def question(record: dict) -> str:
    return record["conversations"][0]["value"]


def test_grouped_answers_match_the_scene_descriptions(grouped):
    assert check_answers(grouped, "train") == set(TASKS)  # every task still appears in train
    assert check_answers(grouped, "test") == set(TASKS)


def test_grouped_train_shares_images_test_does_not(grouped):
    train, test = records(grouped, "train"), records(grouped, "test")
    assert (len(train), len(test)) == (270, 30)
    assert [r["id"] for r in train] == [f"train-{i:06d}" for i in range(270)]
    groups = by_image(train)
    assert len(groups) <= 300 // 3  # packing: far fewer images than records
    for members in groups.values():
        assert len(members) <= K
        assert len({question(r) for r in members}) == len(members)  # never the same question twice
        family = {r["task"].split("_")[0] if r["task"].startswith(("doc_", "multi_")) else "shapes"
                  for r in members}  # fmt: skip
        assert len(family) == 1, members
        if members[0]["task"] == "multi_change":
            assert len(members) == 1
    assert max(len(members) for members in groups.values()) == K
    assert all(len(members) == 1 for members in by_image(test).values())  # test: one question per image
    assert all(not p.startswith("images/test/g") for r in test for p in image_list(r))


def test_grouped_images_are_written_once(grouped):
    train, test = records(grouped, "train"), records(grouped, "test")
    paths = {p for r in train + test for p in image_list(r)}
    lines = (grouped / "scenes.jsonl").read_text().splitlines()
    assert len(lines) == len(paths) == len({json.loads(line)["image"] for line in lines})
    on_disk = {str(p.relative_to(grouped)) for p in (grouped / "images").rglob("*.png")}
    assert on_disk == paths
    settings = json.loads((grouped / "synth.json").read_text())
    assert settings["questions_per_image"] == K
    for split, recs in (("train", train), ("test", test)):
        counts = settings["counts"][split]
        assert counts["records"] == len(recs)
        assert counts["images"] == len({p for r in recs for p in image_list(r)})
        assert sum(counts["tasks"].values()) == len(recs)


def test_grouped_is_deterministic_and_truncates_exactly(grouped, tmp_path):
    again = tmp_path / "again"
    generate_dataset(again, n=300, seed=5, image_size=64, test_fraction=0.1, questions_per_image=K)
    assert json_digest(again) == json_digest(grouped)
    for path in sorted((grouped / "images").rglob("*.png")):
        assert (again / path.relative_to(grouped)).read_bytes() == path.read_bytes(), path
    # a smaller n cuts the last group short: its records are a prefix of the larger set's
    short = tmp_path / "short"
    generate_dataset(short, n=100, seed=5, image_size=64, test_fraction=0.0, questions_per_image=K)
    assert records(short, "train") == records(grouped, "train")[:100]


def test_documents_get_their_other_fields(tmp_path):
    out = tmp_path / "docs"
    tasks = ["doc_date", "doc_total", "doc_number", "doc_name"]
    generate_dataset(out, n=80, seed=2, test_fraction=0.0, tasks=tasks, questions_per_image=K)
    check_answers(out, "train")  # the oracle rejects a number asked of a receipt or a total of a form
    scenes = load_scenes(out)
    fields = {"invoice": 4, "receipt": 3, "form": 3}
    groups = by_image(records(out, "train"))
    for (path,), members in list(groups.items())[:-1]:  # the last group may be cut short
        assert len(members) == fields[scenes[path].doc_type]


def test_grouped_collisions_are_redrawn(tmp_path, monkeypatch):
    """Train group 1 first copies group 0 and test record 0 copies it too: both must draw again."""
    original_group, original_sample = synth.draw_group, synth.draw_sample
    attempts = []

    def group_colliding(*, split: str, group: int, attempt: int = 0, **kwargs):
        attempts.append((split, group, attempt))
        if group == 1 and attempt == 0:
            return original_group(split=split, group=0, attempt=0, **kwargs)
        return original_group(split=split, group=group, attempt=attempt, **kwargs)

    def sample_colliding(*, seed: int, split: str, index: int, task: str, image_size: int, attempt: int = 0):
        attempts.append((split, index, attempt))
        if split == "test" and attempt == 0:
            first = original_group(seed=seed, split="train", group=0, tasks=["caption"], image_size=image_size,
                                   questions=1)  # fmt: skip
            return first[0]
        return original_sample(seed=seed, split=split, index=index, task=task, image_size=image_size,
                               attempt=attempt)  # fmt: skip

    monkeypatch.setattr(synth, "draw_group", group_colliding)
    monkeypatch.setattr(synth, "draw_sample", sample_colliding)
    out = tmp_path / "out"
    generate_dataset(
        out, n=8, seed=1, test_fraction=0.25, tasks=["caption", "vqa_size"], questions_per_image=3
    )
    assert ("train", 1, 1) in attempts and ("test", 0, 1) in attempts
    first = np.asarray(Image.open(out / "images/train/g000000.png"))
    for other in ("images/train/g000001.png", "images/test/000000.png"):
        assert not np.array_equal(first, np.asarray(Image.open(out / other))), other


# ---------------------------------------------------------------------------------------------------- CLI


def cli_app() -> typer.Typer:
    """The real app once ``synth`` is registered there; until then the same group class around the command."""
    from vlmkit.cli.main import VlmkitGroup, app

    if any(command.name == "synth" for command in app.registered_commands):
        return app
    from vlmkit.cli.synth import synth_command

    local = typer.Typer(cls=VlmkitGroup, pretty_exceptions_enable=False)
    local.callback()(lambda: None)
    local.command("synth")(synth_command)
    return local


def test_cli_synth(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli_app(), ["synth", "--out", str(out), "--n", "20", "--seed", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["train"]["records"] == 18 and data["test"]["records"] == 2
    assert len(records(out, "train")) == 18 and (out / "scenes.jsonl").is_file()
    plain = CliRunner().invoke(
        cli_app(), ["synth", "--out", str(out), "--n", "5", "--tasks", "vqa_count,doc_date"]
    )
    assert plain.exit_code == 0 and "wrote 4 train + 1 test records" in plain.stderr
    assert {r["task"] for r in records(out, "train")} == {"vqa_count", "doc_date"}


def test_cli_synth_user_error_is_one_line(tmp_path):
    result = CliRunner().invoke(
        cli_app(), ["synth", "--out", str(tmp_path / "x"), "--n", "5", "--tasks", "nope"]
    )
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: unknown task"), (
        result.output
    )


def test_cli_synth_questions_per_image(tmp_path):
    out = tmp_path / "packed"
    args = ["synth", "--out", str(out), "--n", "40", "--seed", "3", "--questions-per-image", "4", "--json"]
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["questions_per_image"] == 4 and data["train"]["records"] == 36
    assert data["train"]["images"] < 36 and data["test"]["images"] >= data["test"]["records"] == 4
    assert json.loads((out / "synth.json").read_text())["questions_per_image"] == 4
    bad = CliRunner().invoke(
        cli_app(), ["synth", "--out", str(out), "--n", "5", "--questions-per-image", "0"]
    )
    assert bad.exit_code == 2 and "--questions-per-image" in bad.output
