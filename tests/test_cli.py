"""The ``vlmkit`` command line: ask, chat, build, info, and the one-line error contract.

A tiny CLIP + MLP + Llama model is built once for the module with ``vlmkit build`` itself; most cases run
through typer's CliRunner, and two go through the installed console script in a real subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import tiny
from vlmkit.cli.main import app

GEN = ["--max-new-tokens", "6"]


def run(*args: str | Path, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def assert_user_error(result, *, contains: str = "") -> str:
    """Exit 2, exactly one stderr line starting 'error:', no traceback anywhere."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert contains in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-parts")
    return {
        "vision": tiny.save_vision(root / "clip", "clip"),
        "language": tiny.save_language(root / "llama", "llama"),
    }


@pytest.fixture(scope="module")
def model_dir(parts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-model") / "tiny"
    result = run("build", "--vision", parts["vision"], "--language", parts["language"], "--projector", "mlp",
                 "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-images")
    files = {"red": root / "red.png", "blue": root / "blue.jpg", "corrupt": root / "corrupt.png"}
    Image.new("RGB", (40, 30), (220, 20, 20)).save(files["red"])
    Image.new("RGB", (24, 48), (20, 20, 220)).save(files["blue"])
    files["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return files


# ----------------------------------------------------------------------------------------------- commands


def test_help_is_fast_and_lazy():
    code = "import sys, vlmkit.cli.main; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL
    ).stdout
    assert out.split() == ["False", "False"]
    result = run("--help")
    assert result.exit_code == 0
    assert all(name in result.stdout for name in ("ask", "chat", "build", "info", "export", "eval", "synth"))


def test_ask_prints_answer(model_dir, pictures):
    result = run("ask", pictures["red"], "--prompt", "What colour is it?", "--model", model_dir, *GEN)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n") and result.stderr == ""


def test_ask_json_stream_and_plain_agree(model_dir, pictures):
    common = ["ask", pictures["red"], "-p", "Describe the image.", "-m", model_dir, *GEN]
    plain = run(*common).stdout
    streamed = run(*common, "--stream")
    data = json.loads(run(*common, "--json").stdout)
    assert streamed.exit_code == 0 and streamed.stdout == plain  # greedy: stream joins to the same text
    assert data["answer"] + "\n" == plain
    assert data["images"] == [str(pictures["red"])] and data["generation"] == {"max_new_tokens": 6}


def test_ask_two_images_with_placeholders(model_dir, pictures):
    result = run("ask", pictures["red"], pictures["blue"], "-p", "<image> vs <image>: which is red?",
                 "-m", model_dir, "--stop", ".", "--num-beams", "2", *GEN)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "." not in result.stdout


def test_build_writes_loadable_dir(parts, tmp_path):
    from vlmkit.api import VLM

    out = tmp_path / "resampler"
    result = run("build", "--vision", parts["vision"], "--language", parts["language"], "--projector", "resampler",
                 "--out", out, "--select", "full", "--image-size", "48", "--resize-mode", "pad")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "saved" in result.stderr and result.stdout == ""
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    info = VLM.from_pretrained(out).info()
    assert (info["projector"], info["image_size"]) == ("resampler", 48)


def test_info_table_and_json(model_dir):
    table = run("info", "--model", model_dir)
    assert table.exit_code == 0, table.output
    assert "image tokens" in table.stdout and "mlp" in table.stdout and "parameters: total" in table.stdout
    data = json.loads(run("info", "--model", model_dir, "--json").stdout)
    assert data["image_tokens"] == 16 and data["projector"] == "mlp" and data["vision"].startswith("clip")
    assert data["parameters"]["total"] == sum(v for k, v in data["parameters"].items() if k != "total")


def test_chat_keeps_history_and_images(model_dir, pictures):
    from vlmkit.api import VLM

    script = f"/image {pictures['red']}\nWhat colour is it?\n/image missing.png\nAre you sure?\n"
    result = run("chat", "--model", model_dir, *GEN, input=script)
    assert result.exit_code == 0, result.output
    assert (
        result.stderr.count("error: ") == 1 and "missing.png" in result.stderr
    )  # bad /image: reported, chat goes on

    vlm = VLM.from_pretrained(model_dir)
    red = Image.open(pictures["red"]).convert("RGB")
    history = [{"role": "user", "content": [{"type": "image", "image": red},
                                            {"type": "text", "text": "What colour is it?"}]}]  # fmt: skip
    first = vlm.chat(history, max_new_tokens=6)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "Are you sure?"}]
    second = vlm.chat(history, max_new_tokens=6)
    assert result.stdout == f"{first}\n{second}\n"


def test_chat_reset_and_quit(model_dir):
    result = run("chat", "-m", model_dir, *GEN, input="/reset\n/bogus\n/quit\nnever asked\n")
    assert result.exit_code == 0 and result.stdout == ""
    assert "unknown command '/bogus'" in result.stderr


# ------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def pickle_only_dir(model_dir, tmp_path) -> Path:
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    return tmp_path


@pytest.mark.parametrize(
    ("case", "contains"),
    [
        ("missing image", "file not found"),
        ("corrupt image", "corrupt.png"),
        ("missing model dir", "model directory not found"),
        ("no default model", "no default model"),
        ("pickle-only weights", "pickle"),
        ("placeholder mismatch", "placeholder"),
        ("negative temperature", "--temperature"),
        ("beams with sampling", "num_beams"),
    ],
)
def test_user_errors_are_one_line(
    case, contains, model_dir, pictures, pickle_only_dir, tmp_path, monkeypatch
):
    red, model = str(pictures["red"]), str(model_dir)
    # an install without the bundled model (e.g. a trimmed wheel) must fail cleanly too
    monkeypatch.setattr("vlmkit.api.DEFAULT_MODEL_DIR", tmp_path / "no-bundled-model")
    monkeypatch.delenv("VLMKIT_MODEL", raising=False)
    args = {
        "missing image": ["ask", tmp_path / "nope.png", "-p", "hi", "-m", model],
        "corrupt image": ["ask", pictures["corrupt"], "-p", "hi", "-m", model],
        "missing model dir": ["ask", red, "-p", "hi", "-m", tmp_path / "no-such-model"],
        "no default model": ["info"],
        "pickle-only weights": ["info", "--model", pickle_only_dir],
        "placeholder mismatch": ["ask", red, "-p", "<image> and <image>?", "-m", model],
        "negative temperature": ["ask", red, "-p", "hi", "-m", model, "--temperature", "-1"],
        "beams with sampling": [
            "ask",
            red,
            "-p",
            "hi",
            "-m",
            model,
            "--num-beams",
            "2",
            "--temperature",
            "0.5",
        ],
    }[case]
    assert_user_error(run(*args), contains=contains)


def test_build_rejects_unknown_projector(parts, tmp_path):
    result = run("build", "--vision", parts["vision"], "--language", parts["language"], "--projector", "qformer",
                 "--out", tmp_path / "m")  # fmt: skip
    assert_user_error(result, contains="unknown projector 'qformer'")
    assert_user_error(run("ask", "-m", tmp_path), contains="--prompt")  # usage errors follow the same rule


def test_internal_error_exit_1_traceback_only_with_debug(model_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("vlmkit.cli.info.load_model", boom)
    quiet = run("info", "-m", model_dir)
    assert quiet.exit_code == 1 and quiet.stderr.strip().splitlines() == [
        "error: internal error: RuntimeError: boom (rerun with --debug for the traceback)"
    ]
    loud = run("--debug", "info", "-m", model_dir)
    assert loud.exit_code == 1 and "Traceback" in loud.stderr


# --------------------------------------------------------------------------------------- console script


@pytest.mark.slow
def test_console_script_subprocess(model_dir, pictures, tmp_path):
    script = shutil.which("vlmkit", path=str(Path(sys.executable).parent)) or shutil.which("vlmkit")
    assert script, "the vlmkit console script is not installed (pip install -e .)"
    ok = subprocess.run([script, "ask", str(pictures["red"]), "-p", "What colour?", "-m", str(model_dir), *GEN],
                        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.endswith("\n")
    assert ok.stderr == ""  # no library warnings, progress bars or load reports
    bad = subprocess.run([script, "ask", str(tmp_path / "gone.png"), "-p", "hi", "-m", str(model_dir)],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [f"error: {tmp_path / 'gone.png'}: file not found"]
