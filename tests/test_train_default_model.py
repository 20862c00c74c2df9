"""scripts/train_default_model.py, the shipped model's reproduction, end to end at a tiny scale."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import train_default_model as script  # noqa: E402


@pytest.mark.slow
def test_reproduction_script_runs_every_step_and_resumes(tmp_path):
    args = ["--work", str(tmp_path), "--scale", "0.0003", "--stage1-steps", "2", "--stage2-steps", "2",
            "--continue-steps", "2"]  # fmt: skip
    assert script.main(args) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["metric"] == "exact_match" and result["n"] >= 1 and 0.0 <= result["score"] <= 1.0
    # the continued model speaks one token per digit, and its data mixes both sets, each image found
    tokenizer_json = json.loads((tmp_path / "continue2" / "tokenizer.json").read_text())
    assert "Digits" in json.dumps(tokenizer_json["pre_tokenizer"])
    packed = json.loads((tmp_path / "data" / "mix-continue1" / "packed.json").read_text())
    assert {r["id"].split("-")[0] for r in packed} == {"all", "weak"}
    second = json.loads((tmp_path / "data" / "mix-continue2" / "packed.json").read_text())
    assert {r["id"].split("-")[0] for r in second} == {"all2", "weak2"}
    assert all((tmp_path / "data" / "mix-continue1" / image).is_file() for r in packed for image in
               ([r["image"]] if isinstance(r["image"], str) else r["image"]))  # fmt: skip
    # the where phases train with the grid-cell objective on, logged beside the next-token loss
    rows = [json.loads(line) for line in (tmp_path / "where2" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["where_loss"] > 0 for r in rows)

    # "grow" doubles the LM's layers by block expansion, keeping the tokenizer; the phase after it keeps them
    def layers(name: str) -> int:
        return json.loads((tmp_path / name / "config.json").read_text())["language"]["hf_config"][
            "num_hidden_layers"
        ]

    last = list(script.PHASES)[-1]
    assert layers("grow") == 2 * layers("where2") and layers(last) == layers("grow")
    assert (tmp_path / last / "tokenizer.json").read_bytes() == (
        tmp_path / "where2" / "tokenizer.json"
    ).read_bytes()
    # a second run finds every output and only evaluates again
    stamp = (tmp_path / last / "model.safetensors").stat().st_mtime_ns
    assert script.main(args) == 0
    assert (tmp_path / last / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("option", [["--scale", "2"], ["--workers", "-1"]])
def test_reproduction_script_rejects_bad_options(tmp_path, option, capsys):
    with pytest.raises(SystemExit):
        script.main(["--work", str(tmp_path), *option])
    assert option[0] in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_chat_phase_data_keeps_conversations_whole(tmp_path):
    # conversations pass through packing whole (images arrive in later user turns) beside packed single turns
    packed = script.mixed_data(tmp_path, sets=script.CHAT_PHASE["data"], scale=0.0003, name="chat")
    chat = json.loads(packed.read_text())
    assert {r["id"].split("-")[0] for r in chat} == set(script.CHAT_DATA)
    later = [turn for r in chat if r["id"].startswith("convC") for turn in r["conversations"][2:]]
    assert any("<image>" in turn["value"] for turn in later)
    assert all((packed.parent / image).is_file() for r in chat for image in
               ([r["image"]] if isinstance(r["image"], str) else r["image"]))  # fmt: skip
