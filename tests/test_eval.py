"""The evaluation runner and ``vlmkit eval``: record parsing, skipping, batching, scoring, JSON schema.

Runner logic is checked with a scripted stand-in model (answers looked up by question); the command runs
end to end on the tiny CLIP + Llama model from conftest over a small synthetic set.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from vlmkit.data.synth import generate_dataset
from vlmkit.evaluation import compute_metric, evaluate, read_records
from vlmkit.evaluation.records import RecordError, to_item

REPORT_KEYS = {"metric", "score", "n", "skipped", "tasks", "skipped_samples", "model", "data", "seconds",
               "samples_per_second", "batch_size", "max_new_tokens"}  # fmt: skip


class ScriptedVLM:
    """Answers from a dict keyed by the last user message; records every generate call."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.config = SimpleNamespace(prompt=SimpleNamespace(image_token="<image>"))
        self.calls: list[dict] = []

    def generate(self, samples, **generation):
        self.calls.append({"samples": list(samples), "generation": generation})
        questions = [[m for m in s.messages if m["role"] == "user"][-1]["content"] for s in samples]
        return SimpleNamespace(
            texts=[f" {self.answers.get(q.split(chr(10))[-1], 'no idea')} " for q in questions]
        )


def record(rid: str, task: str, question: str, answer, image: str | list[str] | None = "red.png") -> dict:
    data = {"id": rid, "task": task}
    if image is not None:
        data["image"] = image
    human = question if image is None or "<image>" in question else f"<image>\n{question}"
    return data | {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}


@pytest.fixture
def folder(tmp_path) -> Path:
    Image.new("RGB", (16, 16), (220, 20, 20)).save(tmp_path / "red.png")
    Image.new("RGB", (16, 16), (20, 20, 220)).save(tmp_path / "blue.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return tmp_path


# ----------------------------------------------------------------------------------------- runner + records


def test_scores_per_task_in_file_order_with_batches(folder):
    records = [
        record("q1", "colour", "What colour is it?", "red"),
        record("q2", "colour", "Which colour is the square?", "blue", image="blue.png"),
        record("q3", "count", "How many shapes are there?", "2"),
        record("q4", "count", "How many circles?", "3"),
        record("q5", "text", "Say hi.", "hi", image=None),
    ]
    vlm = ScriptedVLM({"What colour is it?": "Red.", "Which colour is the square?": "green",
                       "How many shapes are there?": "2", "How many circles?": "3", "Say hi.": "hi"})  # fmt: skip
    report = evaluate(vlm, records, image_folder=folder, metric="exact_match", batch_size=2, max_new_tokens=5)
    assert [p.id for p in report.predictions] == ["q1", "q2", "q3", "q4", "q5"]
    assert [p.score for p in report.predictions] == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert report.predictions[0].prediction == "Red."  # stripped, not normalised
    assert report.score == pytest.approx(0.8)
    assert {name: (t.score, t.n) for name, t in report.tasks.items()} == {
        "colour": (0.5, 2), "count": (1.0, 2), "text": (1.0, 1)}  # fmt: skip
    assert all(len(call["samples"]) <= 2 for call in vlm.calls) and len(vlm.calls) == 3
    assert all(call["generation"] == {"max_new_tokens": 5, "temperature": 0.0} for call in vlm.calls)
    assert all(len(s.images) == (0 if s.messages[0]["content"] == "Say hi." else 1)
               for call in vlm.calls for s in call["samples"])  # fmt: skip


def test_missing_corrupt_and_malformed_records_are_skipped(folder):
    records = [
        record("ok", "a", "What colour is it?", "red"),
        record("gone", "a", "What colour is it?", "red", image="missing.png"),
        record("bad", "b", "What colour is it?", "red", image="corrupt.png"),
        {"id": "noref", "task": "b", "image": "red.png", "conversations": [{"from": "human", "value": "hi"}]},
        record("mismatch", "b", "<image> and <image>?", "x", image="red.png"),
    ]
    report = evaluate(ScriptedVLM({"What colour is it?": "red"}), records, image_folder=folder, batch_size=8)
    assert (report.n, report.skipped, report.score) == (1, 4, 1.0)
    reasons = {s.id: s.reason for s in report.skipped_samples}
    assert [s.id for s in report.skipped_samples] == ["gone", "bad", "noref", "mismatch"]  # file order
    assert "file not found" in reasons["gone"] and "corrupt" in reasons["bad"]
    assert (
        "no gpt turn" in reasons["noref"] and "2 <image> placeholder(s) but 1 image(s)" in reasons["mismatch"]
    )
    assert report.tasks["b"].score is None and report.tasks["b"].skipped == 3
    assert report.to_dict()["tasks"]["a"] == {"score": 1.0, "n": 1, "skipped": 1}


def test_all_skipped_gives_null_score(folder):
    report = evaluate(
        ScriptedVLM({}), [record("x", "t", "q?", "a", image="missing.png")], image_folder=folder
    )
    assert report.score is None and report.n == 0 and report.to_dict()["score"] is None


def test_multi_turn_history_and_multi_reference(folder):
    rec = {"id": "m", "image": ["red.png", "blue.png"], "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Image 1: <image>\nImage 2: <image>\nWhich is red?"},
        {"from": "gpt", "value": "image 1"},
        {"from": "human", "value": "And how many dogs?"},
        {"from": "gpt", "value": ["two", "2", "2", "3"]},
    ]}  # fmt: skip
    item = to_item(rec, index=0)
    assert [m["role"] for m in item.messages] == ["system", "user", "assistant", "user"]
    assert item.references == ("two", "2", "2", "3") and item.task == "default"
    report = evaluate(ScriptedVLM({"And how many dogs?": "Two."}), [rec], image_folder=folder, metric="vqa",
                      last_turn_only=True)  # fmt: skip
    assert report.score == 1.0  # 3 of 4 references match after VQA normalisation
    # by default every gpt turn is scored, the earlier ones with their own history (here: none answered)
    both = evaluate(ScriptedVLM({"And how many dogs?": "Two."}), [rec], image_folder=folder, metric="vqa")
    assert [(p.turn, p.score) for p in both.predictions] == [(1, 0.0), (2, 1.0)] and both.score == 0.5
    # no placeholder at all: images go before the first human turn, LLaVA style
    bare = to_item(record("b", "t", "Describe.", "x", image=None) | {"image": "red.png"}, index=1)
    assert bare.messages[0]["content"] == "<image>\nDescribe."
    with pytest.raises(RecordError, match="unknown speaker"):
        to_item({"image": "red.png", "conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}]},
                index=0)  # fmt: skip


def test_limit_and_metric_names(folder):
    records = [record(f"r{i}", "t", "What colour is it?", "red") for i in range(5)]
    report = evaluate(ScriptedVLM({"What colour is it?": "red"}), records, image_folder=folder, limit=2)
    assert report.n == 2
    for metric in ("vqa", "anls", "bleu", "cider"):
        assert evaluate(ScriptedVLM({}), records[:2], image_folder=folder, metric=metric).metric == metric
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(ScriptedVLM({}), records, image_folder=folder, metric="rouge")


def test_corpus_metrics_per_task(folder):
    records = [record("c1", "cap", "Q1?", "a red circle"), record("c2", "cap", "Q2?", "a blue square"),
               record("s1", "scn", "Q3?", "two shapes on a white background")]  # fmt: skip
    vlm = ScriptedVLM({"Q1?": "a red circle", "Q2?": "a blue circle", "Q3?": "two shapes"})
    cider = evaluate(vlm, records, image_folder=folder, metric="cider")
    per_sample = {p.id: p.score for p in cider.predictions}
    # CIDEr: idf from the whole set, so the one-sample task still scores; overall = mean of all samples
    assert cider.tasks["scn"].score == pytest.approx(per_sample["s1"]) and per_sample["s1"] > 0
    assert cider.score == pytest.approx(sum(per_sample.values()) / 3)
    # BLEU: a corpus statistic, recomputed on the task's own samples
    bleu = evaluate(vlm, records, image_folder=folder, metric="bleu")
    expected = compute_metric("bleu", predictions=["a red circle", "a blue circle"],
                              references=[["a red circle"], ["a blue square"]])  # fmt: skip
    assert bleu.tasks["cap"].score == pytest.approx(expected.score)


def test_read_records_json_and_jsonl(tmp_path):
    rows = [record("1", "t", "q", "a"), record("2", "t", "q", ["a", "b"])]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_records(tmp_path / "a.json") == read_records(tmp_path / "a.jsonl") == rows
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="record 0 is a int"):
        read_records(tmp_path / "list.json")


# ---------------------------------------------------------------------------------------------------- CLI


def cli_app() -> typer.Typer:
    """The real app once ``eval`` is registered there; until then the same group class around the command."""
    from vlmkit.cli.main import VlmkitGroup, app

    if any(command.name == "eval" for command in app.registered_commands):
        return app
    from vlmkit.cli.eval import eval_command

    local = typer.Typer(cls=VlmkitGroup, pretty_exceptions_enable=False)
    local.callback()(lambda: None)
    local.command("eval")(eval_command)
    return local


def run(*args) -> object:
    return CliRunner().invoke(cli_app(), ["eval", *map(str, args)])


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-synth") / "set"
    generate_dataset(out, n=20, seed=0, image_size=32, test_fraction=0.4)  # 8 test records, 8 tasks
    (out / "images/test/000002.png").unlink()  # a missing image: counted, not a crash
    return out


def test_cli_eval_json_on_tiny_model(tiny_vlm_dir, synth_set, tmp_path):
    predictions = tmp_path / "pred.jsonl"
    result = run("--model", tiny_vlm_dir, "--data", synth_set / "test.json", "--image-folder", synth_set,
                 "--json", "--batch-size", "3", "--max-new-tokens", "3", "--save-predictions", predictions)  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == REPORT_KEYS
    tasks = {r["task"] for r in json.loads((synth_set / "test.json").read_text())}
    assert set(data["tasks"]) == tasks and len(tasks) == 8
    assert (data["n"], data["skipped"], data["metric"]) == (7, 1, "exact_match")
    assert (
        data["skipped_samples"][0]["id"] == "test-000002"
        and "file not found" in data["skipped_samples"][0]["reason"]
    )
    assert sum(t["n"] for t in data["tasks"].values()) == 7 and 0.0 <= data["score"] <= 1.0
    assert data["seconds"] > 0 and data["samples_per_second"] > 0 and data["model"] == str(tiny_vlm_dir)
    assert len(predictions.read_text().splitlines()) == 7
    assert "overall" in result.stderr  # the per-task table goes to stderr


def test_cli_eval_plain_summary_and_default_image_folder(tiny_vlm_dir, synth_set):
    result = run("--model", tiny_vlm_dir, "--data", synth_set / "test.json", "--metric", "anls", "--limit", "2",
                 "--max-new-tokens", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("anls: ") and "(2 evaluated, 0 skipped)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metric", "bogus"], "--metric"),
        (["--data", "missing.json"], "no such file"),
        (["--data", "broken.json"], "invalid JSON"),
    ],
)
def test_cli_eval_user_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "data.json").write_text("[]")
    (tmp_path / "broken.json").write_text("[{")
    base = ["--model", tmp_path / "no-model", "--data", tmp_path / "data.json"]
    args = [tmp_path / a if a.endswith(".json") else a for a in args]
    result = run(*base, *args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
