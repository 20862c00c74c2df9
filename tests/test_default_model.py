"""The shipped default model: it loads offline with no path, answers the README's first question, and keeps
its held-out accuracy (a fixed slice of a seed never trained on), so a regression in any layer fails CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmkit.api import DEFAULT_MODEL_DIR, VLM
from vlmkit.data.synth import generate_dataset
from vlmkit.evaluation.runner import evaluate

pytestmark = pytest.mark.slow  # every test here takes more than a few seconds

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture(scope="module")
def default_vlm() -> VLM:
    return VLM.from_pretrained()


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("held-out") / "seed99"
    generate_dataset(out, n=3000, seed=99, test_fraction=0.1)  # the same 300-record slice as accuracy.json
    return out


def test_default_model_is_small_and_safetensors_only():
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()}
    assert "model.safetensors" in files and not any(n.endswith((".bin", ".pt", ".pkl")) for n in files)
    assert sum(files.values()) <= 25 * 2**20


def test_readme_first_question(default_vlm):
    record = {r["id"]: r for r in json.loads((EXAMPLES / "examples.json").read_text())}["vqa_colour"]
    question = record["conversations"][0]["value"].replace("<image>\n", "")
    answer = default_vlm.ask(question, images=[EXAMPLES / record["image"]], max_new_tokens=8)
    assert answer == record["conversations"][1]["value"]


def test_cli_ask_without_model_uses_the_default(monkeypatch):
    from typer.testing import CliRunner

    from vlmkit.cli.main import app

    monkeypatch.delenv("VLMKIT_MODEL", raising=False)
    result = CliRunner().invoke(
        app, ["ask", str(EXAMPLES / "vqa_size.png"), "-p", "Is the blue square small or large?"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "small"  # the example's reference answer


def test_held_out_accuracy_stays_at_the_shipped_level(default_vlm, held_out):
    # measured on this slice when the model was shipped, minus a margin for platform noise
    floors = json.loads((DEFAULT_MODEL_DIR / "accuracy.json").read_text())["regression_floors"]
    assert set(floors) >= {"overall", "vqa_colour", "doc_date", "multi_change", "caption"}
    records = json.loads((held_out / "test.json").read_text())
    report = evaluate(default_vlm, records, image_folder=held_out, metric="exact_match", batch_size=64,
                      max_new_tokens=96)  # fmt: skip
    scores = {name: task.score for name, task in report.tasks.items()} | {"overall": report.score}
    below = {
        name: (scores.get(name), floor) for name, floor in floors.items() if (scores.get(name) or 0) < floor
    }
    assert not below, f"held-out exact match fell below the shipped floors (score, floor): {below}"
