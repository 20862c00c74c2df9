"""Hostile model directories and training data (issue 22): each is refused with one clear error, in bounded
time and memory, before anything runs or is built.

Classes: code shipped in a model directory (``auto_map``), configs describing absurd sizes, JSON files that
are FIFOs / devices / huge / deeply nested, corrupt or escaping weights, config values transformers chokes on,
training records that are too long / unrenderable / all skipped, image paths outside ``--image-folder``.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from vlmkit.api import VLM
from vlmkit.cli.main import app
from vlmkit.config import ConfigError, json_depth, parse_json, read_json
from vlmkit.data.dataset import ConversationDataset, DataError, Example, Skipped, parse_record, read_records
from vlmkit.models.budget import MEMORY_LIMIT_ENV, config_parts, estimate
from vlmkit.models.io import ModelDirError, read_weights
from vlmkit.processing.prompting import IGNORE_INDEX
from vlmkit.training.config import StageConfig, TrainConfig
from vlmkit.training.session import train

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmkit"
# the evil module writes this marker when imported: its existence means code from the model dir ran
EVIL_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("code from the model directory ran")
from transformers import PreTrainedTokenizerFast, LlamaForCausalLM


class EvilTokenizer(PreTrainedTokenizerFast):
    pass


class EvilModel(LlamaForCausalLM):
    pass
"""


def run_cli(*args: str | Path, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def run_subprocess(*args: str | Path, stdin: str = "y\n", timeout: float = 120, env: dict | None = None):
    """The real console entry point, with piped stdin that would answer "y" to any prompt."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "vlmkit", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)  # fmt: skip


def copy_dir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def plant_code(directory: Path, *, marker: Path, file: str) -> None:
    """An ``auto_map`` in ``file`` pointing at a module that writes ``marker`` when imported."""
    (directory / "evil_code.py").write_text(EVIL_CODE.format(marker=str(marker)))
    key = {"tokenizer_config.json": "AutoTokenizer", "config.json": "AutoModelForCausalLM"}[file]
    value = [None, "evil_code.EvilTokenizer"] if key == "AutoTokenizer" else "evil_code.EvilModel"
    edit_json(directory / file, lambda d: d.update(auto_map={key: value}))


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pictures") / "red.png"
    Image.new("RGB", (40, 30), (220, 20, 20)).save(path)
    return path


# --------------------------------------------------------------------------------- 1. code in a model dir


@pytest.mark.slow
@pytest.mark.parametrize("command", ["ask", "chat", "build"])
def test_auto_map_never_runs_and_never_prompts(command, tiny_vlm_dir, parts, picture, tmp_path):
    marker = tmp_path / "MARKER"
    if command == "build":
        evil = copy_dir(parts["llama"], tmp_path / "evil-lm")
        plant_code(evil, marker=marker, file="config.json")
        args = [
            "build",
            "--vision",
            parts["clip"],
            "--language",
            evil,
            "--projector",
            "mlp",
            "--out",
            tmp_path / "o",
        ]
    else:
        evil = copy_dir(tiny_vlm_dir, tmp_path / "evil-vlm")
        plant_code(evil, marker=marker, file="tokenizer_config.json")
        args = (
            ["ask", picture, "--prompt", "hi", "--model", evil]
            if command == "ask"
            else ["chat", "--model", evil]
        )
    result = run_subprocess(*args, stdin="y\ny\ny\n")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "auto_map" in errors[0] and "evil_code.py" in errors[0], output
    assert ("tokenizer_config.json" if command != "build" else "config.json") in errors[0]
    assert "custom code" not in output and "[y/N]" not in output  # transformers' prompt never appeared
    assert not marker.exists()


def test_auto_map_refused_by_the_python_api(tiny_vlm_dir, parts, tmp_path):
    marker = tmp_path / "MARKER"
    evil = copy_dir(tiny_vlm_dir, tmp_path / "evil-vlm")
    plant_code(evil, marker=marker, file="tokenizer_config.json")
    with pytest.raises(ModelDirError, match=r"tokenizer_config\.json.*auto_map.*evil_code\.py"):
        VLM.from_pretrained(evil)
    lm = copy_dir(parts["llama"], tmp_path / "evil-lm")
    plant_code(lm, marker=marker, file="config.json")
    with pytest.raises(ModelDirError, match=r"config\.json.*auto_map"):
        VLM.build(vision=parts["clip"], language=lm)
    nested = copy_dir(tiny_vlm_dir, tmp_path / "nested")  # hidden inside the vlmkit config's hf_config
    edit_json(
        nested / "config.json", lambda d: d["language"]["hf_config"].update(auto_map={"AutoModel": "x.Y"})
    )
    with pytest.raises(ModelDirError, match=r"auto_map.*x\.py"):
        VLM.from_pretrained(nested)
    assert not marker.exists()


def _loader_calls() -> list[str]:
    """Every ``X.from_pretrained(...)`` / ``X.from_config(...)`` in src that is not vlmkit's own, without
    ``trust_remote_code=False``: each of them could reach transformers' remote-code prompt."""
    own = {"VLM", "cls", "PeftModel", "LoraConfig", "TilingConfig", "VLMConfig", "Recipe"}  # not transformers
    missing = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("from_pretrained", "from_config"):
                continue
            receiver = node.func.value
            if isinstance(receiver, ast.Name) and receiver.id in own:
                continue
            safe = any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
                       for k in node.keywords)  # fmt: skip
            if not safe:
                missing.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return missing


def test_every_transformers_loader_passes_trust_remote_code_false():
    assert _loader_calls() == []


# ----------------------------------------------------------------------------- 2. memory before validation


ABSURD = {
    "hidden": lambda c: c["language"]["hf_config"].update(hidden_size=10**9),
    "layers": lambda c: c["language"]["hf_config"].update(num_hidden_layers=10**9),
    "vocab": lambda c: c["language"]["hf_config"].update(vocab_size=10**9),
    "tower_positions": lambda c: c["vision"]["hf_config"].update(image_size=10**7, patch_size=1),
    "projector_depth": lambda c: c["projector"].update(depth=10**9),
}


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_absurd_sizes_are_refused_before_building(case, tiny_vlm_dir, tmp_path):
    hostile = copy_dir(tiny_vlm_dir, tmp_path / case)
    edit_json(hostile / "config.json", ABSURD[case])
    start = time.perf_counter()
    with pytest.raises(
        ModelDirError, match=r"config\.json: .* needing at least [\d,.]+ GB .* GB is available RAM"
    ):
        VLM.from_pretrained(hostile)
    assert time.perf_counter() - start < 5  # refused from the config: nothing was allocated or built


def test_absurd_parts_are_refused_by_build(parts, tmp_path):
    lm = copy_dir(parts["llama"], tmp_path / "lm")
    edit_json(lm / "config.json", lambda c: c.update(num_hidden_layers=10**8, hidden_size=4096))
    with pytest.raises(ModelDirError, match=r"num_hidden_layers|layers=100,000,000"):
        VLM.build(vision=parts["clip"], language=lm)
    tower = copy_dir(parts["clip"], tmp_path / "tower")
    edit_json(tower / "config.json", lambda c: c.update(hidden_size=10**8))
    with pytest.raises(ModelDirError, match=r"hidden_size=100,000,000"):
        VLM.build(vision=tower, language=parts["llama"])


@pytest.mark.parametrize("kind", ["open_clip", "timm"])
def test_absurd_library_towers_are_refused_before_the_library_builds_them(kind, parts, tmp_path):
    tower = tmp_path / kind
    tower.mkdir()
    if kind == "open_clip":
        cfg = {"model_cfg": {"embed_dim": 64, "vision_cfg": {"width": 10**8, "layers": 12, "image_size": 224,
                                                               "patch_size": 16}}}  # fmt: skip
        (tower / "open_clip_config.json").write_text(json.dumps(cfg))
    else:
        cfg = {"architecture": "vit_base_patch16_224", "model_args": {"embed_dim": 10**8, "depth": 12}}
        (tower / "config.json").write_text(json.dumps(cfg))
    save_file(
        {"w": torch.zeros(1)},
        str(tower / f"{kind}_model.safetensors" if kind == "open_clip" else tower / "model.safetensors"),
    )
    with pytest.raises(ModelDirError, match=r"hidden_size=100,000,000"):
        VLM.build(vision=f"{kind}:{tower}", language=parts["llama"])


def test_fused_and_library_sizes_in_a_vlmkit_config_are_counted():
    raw = {"vision": {"hf_config": {"model_type": "fused"}, "towers": [
        {"hf_config": {"model_type": "open_clip", "vision_cfg": {"width": 1024, "layers": 24, "patch_size": 14,
                                                                   "image_size": 336}}},
        {"hf_config": {"model_type": "timm", "model_args": {"embed_dim": 10**6, "depth": 10**3}}}]},
        "language": {"hf_config": {"model_type": "llama", "hidden_size": 64}}}  # fmt: skip
    parts = config_parts(raw)
    assert 0.9 * 303e6 < parts["vision tower 1"].parameters < 303.6e6  # CLIP-L/336's vision half
    assert parts["vision tower 2"].parameters > 10**15


def test_the_memory_limit_is_what_the_check_uses(tiny_vlm_dir, monkeypatch):
    """The tiny model fits anywhere; under a 100 KB limit the same check refuses it, naming both sizes."""
    assert VLM.from_pretrained(tiny_vlm_dir) is not None
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "100KB")
    with pytest.raises(ModelDirError, match=rf"0\.0 GB .* allowed by {MEMORY_LIMIT_ENV}=100KB"):
        VLM.from_pretrained(tiny_vlm_dir)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ModelDirError, match=MEMORY_LIMIT_ENV):
        VLM.from_pretrained(tiny_vlm_dir)


def test_device_memory_is_checked_for_a_cuda_device(tiny_vlm_dir, monkeypatch):
    """``device="cuda"``: the free device memory is a second limit (faked here: this runs without a GPU)."""
    import vlmkit.models.budget as budget

    monkeypatch.setattr(budget.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(budget.torch.cuda, "mem_get_info", lambda device: (1000, 2000))
    assert [what for _, what in budget.memory_limits("cuda:0")] == ["available RAM", "free on cuda:0"]
    with pytest.raises(ModelDirError, match=r"GB is free on cuda:0"):
        VLM.from_pretrained(tiny_vlm_dir, device="cuda:0")


def test_plan_refuses_a_config_it_could_not_even_count(parts, tmp_path):
    lm = copy_dir(parts["llama"], tmp_path / "lm")
    edit_json(lm / "config.json", lambda c: c.update(num_hidden_layers=10**9))
    start = time.perf_counter()
    result = run_cli("plan", "--vision", parts["clip"], "--language", lm, "--stage", "projector")
    assert result.exit_code == 2 and "even on the meta device" in result.stderr, result.output
    assert time.perf_counter() - start < 10
    assert (
        run_cli(
            "plan", "--vision", parts["clip"], "--language", parts["llama"], "--stage", "projector"
        ).exit_code
        == 0
    )


def _exact_parameters(config) -> int:
    """What ``vlmkit plan`` counts: the model built on the meta device."""
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        model = (AutoModel if hasattr(config, "patch_size") else AutoModelForCausalLM).from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_the_estimate_is_a_tight_lower_bound_of_the_exact_count():
    """Real architectures at real sizes (Llama-2-7B, Qwen2-7B, Mistral, GPT-2, OPT, CLIP-L/336, SigLIP, DINOv2):
    the closed form never over-counts (it must not refuse a model that fits) and stays within 10%."""
    from transformers import (
        CLIPVisionConfig,
        Dinov2Config,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    configs = [LlamaConfig(), Qwen2Config(), MistralConfig(), GPT2Config(), OPTConfig(), SiglipVisionConfig(),
               Dinov2Config(), CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                num_attention_heads=16, image_size=336, patch_size=14)]  # fmt: skip
    for config in configs:
        exact = _exact_parameters(config)
        estimated = estimate(json.loads(config.to_json_string())).parameters
        assert 0.9 * exact <= estimated <= exact, (type(config).__name__, estimated, exact)


def test_estimate_survives_garbage_values():
    """Strings, bools, negatives, NaN and 400-digit numbers in a config never crash the estimate."""
    garbage = {"hidden_size": "big", "num_hidden_layers": True, "vocab_size": -5, "intermediate_size": float("nan"),
               "num_attention_heads": 0, "head_dim": 10**400}  # fmt: skip
    assert estimate(garbage).parameters >= 0
    assert (
        config_parts({"vision": [], "language": {"hf_config": "x"}, "projector": None})["language"].parameters
        == 0
    )


# ------------------------------------------------------------------------------------ bounded JSON reading


def test_json_reader_refuses_fifo_device_huge_and_deep(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="not a regular file"):
        read_json(fifo)  # never waits for a writer
    assert time.perf_counter() - start < 2
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_json(tmp_path / "zero.json")
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as handle:  # sparse: 65 MB on paper, nothing on disk
        handle.truncate(65 * 2**20)
    with pytest.raises(ConfigError, match="67,108,864 allowed"):
        read_json(huge)
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_json("[" * 200_000 + "]" * 200_000, where="deep")  # past the interpreter's recursion limit
    with pytest.raises(ConfigError, match="nested more than 64 levels"):
        parse_json('{"a":' * 100 + "1" + "}" * 100, where="deep")  # parses, but deeper than any real config
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_json("[" + "9" * 5000 + "]", where="digits")
    assert json_depth(parse_json('{"a": [1, {"b": 2}]}', where="ok"), limit=64) == 3


@pytest.mark.parametrize("kind", ["fifo", "device", "deep", "huge"])
def test_hostile_config_json_is_a_user_error(kind, tiny_vlm_dir, tmp_path, picture):
    hostile = copy_dir(tiny_vlm_dir, tmp_path / kind)
    target = hostile / "config.json"
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        target.symlink_to("/dev/urandom")
    elif kind == "deep":
        target.write_text('{"vision":' * 50_000 + "{}" + "}" * 50_000)
    else:
        with open(target, "wb") as handle:
            handle.truncate(100 * 2**20)
    start = time.perf_counter()
    result = run_cli("ask", picture, "--prompt", "hi", "--model", hostile)
    assert time.perf_counter() - start < 10
    assert result.exit_code == 2
    assert "config.json" in result.stderr and "internal error" not in result.stderr


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_hostile_tokenizer_files_are_refused(name, tiny_vlm_dir, tmp_path):
    hostile = copy_dir(tiny_vlm_dir, tmp_path / "tok")
    (hostile / name).unlink()
    os.mkfifo(hostile / name)
    with pytest.raises(ModelDirError, match=rf"{name}: not a regular file"):
        VLM.from_pretrained(hostile)


# ---------------------------------------------------------------------------------------- weights on disk


def _sharded(tmp_path: Path, index) -> Path:
    directory = tmp_path / "sharded"
    directory.mkdir()
    save_file({"w": torch.zeros(2)}, str(directory / "model-00001.safetensors"))
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ({"weight_map": {"w": "model-00002.safetensors"}}, "shard model-00002.safetensors is missing"),
        ({"weight_map": {"w": "../outside.safetensors"}}, "not a file name inside the model directory"),
        ({"weight_map": {"w": "/etc/passwd"}}, "not a file name inside the model directory"),
        ({"weight_map": {"w": 7}}, "not a file name inside"),
        ({"weight_map": ["model-00001.safetensors"]}, "must be a non-empty object"),
        ({"weights": {}}, "must be a non-empty object"),
        (["model-00001.safetensors"], "expected a JSON object"),
    ],
)
def test_bogus_shard_index_is_refused(index, message, tmp_path):
    (tmp_path / "outside.safetensors").write_bytes(b"")
    with pytest.raises(ModelDirError, match=message):
        read_weights(_sharded(tmp_path, index))


def test_a_valid_shard_index_still_loads(tmp_path):
    state = read_weights(_sharded(tmp_path, {"weight_map": {"w": "model-00001.safetensors"}}))
    assert torch.equal(state["w"], torch.zeros(2))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header_too_large"])
def test_corrupt_safetensors_is_one_error_line(damage, tiny_vlm_dir, tmp_path, picture):
    hostile = copy_dir(tiny_vlm_dir, tmp_path / damage)
    weights = hostile / "model.safetensors"
    data = weights.read_bytes()
    if damage == "garbage":
        weights.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    result = run_cli("ask", picture, "--prompt", "hi", "--model", hostile)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "model.safetensors" in lines[0]
    assert "internal error" not in lines[0]


# ------------------------------------------------------------------------ config values transformers rejects


CONFIG_ERRORS = {
    "string_size": lambda c: c["language"]["hf_config"].update(hidden_size="wide"),
    "zero_heads": lambda c: c["language"]["hf_config"].update(num_attention_heads=0),
    "indivisible_heads": lambda c: c["language"]["hf_config"].update(num_attention_heads=5),
    "float_size": lambda c: c["language"]["hf_config"].update(hidden_size=48.5),
    "unknown_type": lambda c: c["language"]["hf_config"].update(model_type="not-a-model"),
    "bad_select": lambda c: c["vision"].update(select="everything"),
    "huge_image_size": lambda c: c["vision"].update(image_size=10**6),
    "schema_type": lambda c: c.update(vlmkit_version="one"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors_exit_2_with_one_line(case, tiny_vlm_dir, tmp_path, picture):
    hostile = copy_dir(tiny_vlm_dir, tmp_path / case)
    edit_json(hostile / "config.json", CONFIG_ERRORS[case])
    result = run_cli("ask", picture, "--prompt", "hi", "--model", hostile)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and "internal error" not in result.stderr


# ----------------------------------------------------------------------------- 3. training on bad records

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def record(
    rid: str, *, image: str | None = "red.png", question: str = "What colour is it?", answer: str = "red"
):
    human = f"<image>\n{question}" if image else question
    raw = {"id": rid, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}
    return raw | ({"image": image} if image else {})


def write_data(folder: Path, records: list[dict], name: str = "train.jsonl") -> Path:
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / name


@pytest.fixture
def pictures(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(folder / f"{name}.png")
    return folder


def train_config(data: Path, out: Path, **kwargs) -> TrainConfig:
    options = dict(
        batch_size=2, max_steps=2, warmup_ratio=0.0, progress=False, plot=False, image_folder=data.parent
    )
    return TrainConfig(data=data, out=out, stage=StageConfig(stage="projector"), **(options | kwargs))


def dataset(vlm, records: list[dict], folder: Path, **kwargs) -> ConversationDataset:
    parsed = [parse_record(r, position=str(i)) for i, r in enumerate(records)]
    return ConversationDataset(parsed, processor=vlm.processor, image_folder=folder, **kwargs)


def test_a_10mb_record_without_max_length_is_skipped_in_bounded_time(tiny_vlm_dir, pictures, tmp_path):
    """No --max-length: the default comes from the LM (512 positions); the 10 MB record is measured from its
    characters, never tokenized whole, skipped and counted, and the run trains on the rest."""
    huge = record("huge", answer="red blue " * (10 * 2**20 // 9))
    data = write_data(
        pictures, [record("a"), huge, record("b", image="blue.png", answer="blue"), record("c")]
    )
    start = time.perf_counter()
    result = train(VLM.from_pretrained(tiny_vlm_dir), train_config(data, tmp_path / "out"))
    assert time.perf_counter() - start < 60
    assert set(result.skipped) == {"huge"} and "more than 512 tokens" in result.skipped["huge"]
    assert result.steps == 2 and result.tokens > 0


def test_too_long_records_are_truncated_or_skipped_and_counted(tiny_vlm_dir, pictures):
    vlm = VLM.from_pretrained(tiny_vlm_dir)
    long_answer = record("long-answer", answer="red " * 300)  # cut: the answer's start stays
    late_image = record(
        "late-image", image="red.png", question="tell me " * 300
    )  # the cut would drop the image
    late_answer = {"id": "late-answer", "conversations": [{"from": "human", "value": "words " * 300},
                                                          {"from": "gpt", "value": "red"}]}  # fmt: skip
    late_image["conversations"][0]["value"] = "tell me " * 300 + "<image>"
    records = [record("short"), long_answer, late_image, late_answer]
    skip = dataset(vlm, records, pictures, max_length=48, too_long="skip")
    skip.validate()
    assert sorted(skip.skipped()) == ["late-answer", "late-image", "long-answer"] and skip.truncated == 0
    cut = dataset(vlm, records, pictures, max_length=48, too_long="truncate")
    cut.validate()
    assert sorted(cut.skipped()) == ["late-answer", "late-image"] and cut.truncated == 1
    assert "cut an image" in cut.skipped()["late-image"] and "no answer token" in cut.skipped()["late-answer"]
    example = cut[1]
    assert len(example.input_ids) == 48 and (example.labels[1:] != IGNORE_INDEX).any()
    assert len(cut[0].input_ids) < 48 and isinstance(cut[2], Skipped)


def test_truncated_and_skipped_records_are_in_the_cli_report(tiny_vlm_dir, pictures, tmp_path):
    data = write_data(pictures, [record("a"), record("long", answer="red " * 300), record("b")])
    args = ["train", "--data", data, "--image-folder", pictures, "--out", tmp_path / "o", "--model", tiny_vlm_dir,
            "--max-steps", "1", "--max-length", "48", "--too-long", "truncate", "--json"]  # fmt: skip
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["truncated"] == 1 and summary["skipped"] == 0
    assert "0 record(s) skipped, 1 truncated to 48 tokens" in result.stderr


def test_a_record_only_the_template_rejects_fails_before_step_one(tiny_vlm_dir, pictures, tmp_path):
    vlm = VLM.from_pretrained(tiny_vlm_dir)
    vlm.tokenizer.chat_template = (
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no forbidden words') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    records = [record(str(i)) for i in range(6)] + [record("bad", answer="a forbidden word")]
    data = write_data(pictures, records)
    with pytest.raises(DataError, match=r"record 'bad'.*no forbidden words"):
        train(vlm, train_config(data, tmp_path / "out", max_steps=20))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # found at validation: no step ran


def test_a_run_where_every_record_is_skipped_is_an_error(tiny_vlm_dir, pictures, tmp_path):
    (pictures / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    missing = write_data(pictures, [record(str(i), image="gone.png") for i in range(4)], name="missing.jsonl")
    with pytest.raises(DataError, match="all 4 records would be skipped.*image not found"):
        train(VLM.from_pretrained(tiny_vlm_dir), train_config(missing, tmp_path / "a"))
    corrupt = write_data(
        pictures, [record(str(i), image="broken.png") for i in range(4)], name="corrupt.jsonl"
    )
    args = ["train", "--data", corrupt, "--image-folder", pictures, "--out", tmp_path / "b", "--model", tiny_vlm_dir,
            "--max-steps", "2", "--batch-size", "2"]  # fmt: skip
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert "error: no record could be trained on" in result.stderr and "saved" not in result.output
    assert not (tmp_path / "b" / "model.safetensors").exists()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_images_outside_the_image_folder_are_refused_unless_allowed(kind, tiny_vlm_dir, pictures, tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(outside)
    name = {"dotdot": "../secret.png", "absolute": str(outside), "symlink": "link.png"}[kind]
    if kind == "symlink":
        (pictures / "link.png").symlink_to(outside)
    vlm = VLM.from_pretrained(tiny_vlm_dir)
    refused = dataset(vlm, [record("ok"), record("escape", image=name)], pictures)
    with pytest.raises(
        DataError, match=r"record 'escape': image .* outside the image folder .*allow-outside-images"
    ):
        refused.validate()
    allowed = dataset(vlm, [record("ok"), record("escape", image=name)], pictures, allow_outside_images=True)
    allowed.validate()
    assert isinstance(allowed[1], Example)


def test_recipe_stage_one_reads_no_image_outside_the_folder(tiny_vlm_dir, pictures, tmp_path):
    from vlmkit.training.recipes.vision_pretrain import build_triples

    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "secret.png")
    vlm = VLM.from_pretrained(tiny_vlm_dir)
    records = [parse_record(record("a")), parse_record(record("b", image="../secret.png"))]
    with pytest.raises(DataError, match="outside the image folder"):
        build_triples(records, image_folder=pictures, tokenizer=vlm.tokenizer,
                      processor=vlm.processor.image_processor, vocab=len(vlm.tokenizer))  # fmt: skip


def test_cli_refuses_an_escaping_image_with_one_line(tiny_vlm_dir, pictures, tmp_path):
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "secret.png")
    data = write_data(pictures, [record("a"), record("b", image="../secret.png")])
    base = ["train", "--data", data, "--image-folder", pictures, "--model", tiny_vlm_dir, "--max-steps", "1"]
    result = run_cli(*base, "--out", tmp_path / "o1")
    assert (
        result.exit_code == 2
        and result.stderr.count("error:") == 1
        and "--allow-outside-images" in result.stderr
    )
    assert run_cli(*base, "--out", tmp_path / "o2", "--allow-outside-images").exit_code == 0


def test_deeply_nested_training_data_is_a_data_error(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        read_records(tmp_path / "deep.json")
    (tmp_path / "deep.jsonl").write_text('{"id": 1}\n' + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match="line 2: JSON nested too deeply"):
        read_records(tmp_path / "deep.jsonl")


# ----------------------------------------------------------------------------------------------- 6. resume


def test_resume_after_a_kill_before_the_first_checkpoint_does_not_duplicate_metrics(
    tiny_vlm_dir, pictures, tmp_path
):
    data = write_data(pictures, [record(str(i)) for i in range(8)])
    out = tmp_path / "run"

    def killed(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt  # like a kill: no checkpoint was ever written (save_every=0)

    with pytest.raises(KeyboardInterrupt):
        train(VLM.from_pretrained(tiny_vlm_dir), train_config(data, out, max_steps=4), on_step=killed)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    train(VLM.from_pretrained(tiny_vlm_dir), train_config(data, out, max_steps=4, resume=True))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_library_errors_from_bad_files_map_to_user_errors_centrally(tiny_vlm_dir, tmp_path):
    """Readers that are not vlmkit's (eval's records, safetensors in any path) still end as one error line, rc 2."""
    from safetensors import SafetensorError

    from vlmkit.cli.common import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, report_exception

    assert report_exception(SafetensorError("header too large"), debug=False) == EXIT_USER_ERROR
    assert report_exception(RecursionError("maximum recursion depth exceeded while decoding a JSON array"),
                            debug=False) == EXIT_USER_ERROR  # fmt: skip
    assert report_exception(RecursionError("a bug"), debug=False) == EXIT_INTERNAL_ERROR  # not every one is
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    result = run_cli(
        "eval", "--model", tiny_vlm_dir, "--data", tmp_path / "deep.json", "--image-folder", tmp_path
    )
    assert result.exit_code == 2 and result.stderr.startswith("error:") and "internal" not in result.stderr
