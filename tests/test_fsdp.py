"""FSDP (PyTorch FSDP2 via ``--fsdp``) with 2 gloo processes on CPU against 1 process with the same global batch.

One ``torchrun`` runs every FSDP scenario (process start-up and imports dominate the time); the 1-process
references run here. Each scenario compares the saved model and the gathered checkpoint tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlmkit.api import VLM
from vlmkit.training.checkpoint import FINAL_STATE
from vlmkit.training.config import TrainConfig
from vlmkit.training.session import train
from vlmkit.training.stages import StageConfig

pytestmark = pytest.mark.slow  # every test here takes more than a few seconds

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}

# name -> (stage options, train options). FSDP: 2 processes x batch 2 (or as given) against 1 process with the
# same batch and twice the accumulation: the same global batch of 4
SCENARIOS: dict[str, tuple[dict, dict]] = {
    "full": ({"stage": "full", "lr": 3e-3}, {"save_every": 2, "eval_data": "eval.jsonl"}),
    "lora": ({"stage": "lora", "lr": 1e-2, "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0}, {}),
    "projector": ({"stage": "projector", "lr": 1e-2}, {"batch_size": 1, "grad_accum": 2}),  # FSDP no_sync
    # a sharded tower; text-only and skipped records (blank-image path), eval shares of unequal length
    "vision": (
        {"stage": "full", "freeze_vision": False, "lr": 1e-3},
        {"data": "mixed.jsonl", "eval_data": "eval.jsonl"},
    ),
}

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from vlmkit.api import VLM
    from vlmkit.training.config import TrainConfig
    from vlmkit.training.session import train
    from vlmkit.training.stages import StageConfig

    vision, language, root, out, scenarios = sys.argv[1:6]
    scenarios = json.loads(scenarios)

    class Interrupt(Exception):
        pass

    def run(name, stage, options, on_step=None, **extra):
        options = dict(options)
        data = Path(root) / options.pop("data", "train.jsonl")
        if "eval_data" in options:
            options["eval_data"] = Path(root) / options["eval_data"]
        options = {"batch_size": 2, **options}
        config = TrainConfig(data=data, out=Path(out) / name, stage=StageConfig(**stage),
                             max_steps=3, warmup_ratio=0.0, progress=False, plot=False, fsdp=True,
                             **options, **extra)
        train(VLM.build(vision=vision, language=language, projector="mlp"), config, on_step=on_step)

    for name, (stage, options) in scenarios.items():
        run(name, stage, options)

    # interrupted after step 2 and resumed from its checkpoint: the same weights as the uninterrupted run
    def crash(step):
        if step == 2:
            raise Interrupt

    try:
        run("resumed", *scenarios["full"], on_step=crash)
    except Interrupt:
        pass
    run("resumed", *scenarios["full"], resume=True)
""")


def records(n: int, *, prefix: str = "") -> list[dict]:
    names = list(COLOURS)
    return [{"id": f"{prefix}{i}", "image": f"{names[i % 4]}.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat colour is the image?"},
                               {"from": "gpt", "value": names[i % 4]}]}
            for i in range(n)]  # fmt: skip


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(root / f"{name}.png")
    write(root / "train.jsonl", records(16))
    write(root / "eval.jsonl", records(5, prefix="eval-"))  # 3 + 2 records: unequal shares
    mixed = records(8)
    mixed[2]["image"] = "missing.png"
    mixed[5] = {
        "id": "text",
        "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}],
    }
    write(root / "mixed.jsonl", mixed)
    return root


def one_process(parts: dict, root: Path, out: Path, *, stage: dict, options: dict) -> None:
    options = dict(options)
    data = root / options.pop("data", "train.jsonl")
    if "eval_data" in options:
        options["eval_data"] = root / options["eval_data"]
    options["batch_size"] = options.get("batch_size", 2)
    options["grad_accum"] = 2 * options.get("grad_accum", 1)
    vlm = VLM.build(vision=parts["clip"], language=parts["llama"], projector="mlp")
    train(vlm, TrainConfig(data=data, out=out, stage=StageConfig(**stage), max_steps=3,
                           warmup_ratio=0.0, progress=False, plot=False, **options))  # fmt: skip


def assert_close(a_file: Path, b_file: Path, *, atol: float, only_missing_zero: bool = False) -> None:
    """Same names and values within ``atol``. ``only_missing_zero``: ``a`` may lack entries that are all zero
    in ``b`` (AdamW state of a parameter that never had a gradient: none under FSDP, zero gradients from
    ``TokenLoss``'s zero-weight link for text-only batches in one process)."""
    a, b = load_file(a_file), load_file(b_file)
    missing = b.keys() - a.keys() if only_missing_zero else set()
    assert a.keys() == b.keys() - missing, sorted(a.keys() ^ b.keys())[:4]
    assert all(not b[k].any() for k in missing if not k.endswith(".step")), sorted(missing)[:4]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a) if a else 0.0
    assert worst <= atol, f"{a_file.name}: max |difference| {worst:.2e} > {atol:.0e}"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fsdp_two_gloo_processes_match_one_process(parts, data, tmp_path):
    script = tmp_path / "fsdp.py"
    script.write_text(SCRIPT)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(script), str(parts["clip"]), str(parts["llama"]), str(data),
               str(tmp_path / "fsdp"), json.dumps(SCENARIOS)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 process(es), FSDP" in done.stderr
    for name, (stage, options) in SCENARIOS.items():
        one_process(parts, data, tmp_path / "one" / name, stage=stage, options=options)
        fsdp_out, one_out = tmp_path / "fsdp" / name, tmp_path / "one" / name
        assert_close(fsdp_out / "model.safetensors", one_out / "model.safetensors", atol=1e-5)
        # full tensors gathered on the main process, under the same names
        fsdp_state, one_state = fsdp_out / FINAL_STATE, one_out / FINAL_STATE
        assert_close(fsdp_state / "trainable.safetensors", one_state / "trainable.safetensors", atol=1e-5)
        # the tower's last layer and final norm feed nothing (features come from the layer before): no
        # gradient, so no AdamW state under FSDP
        assert_close(fsdp_state / "optimizer.safetensors", one_state / "optimizer.safetensors", atol=1e-5,
                     only_missing_zero=name == "vision")  # fmt: skip
        groups = [json.loads((out / FINAL_STATE / "optimizer.json").read_text())["param_groups"]
                  for out in (fsdp_out, one_out)]  # fmt: skip
        assert groups[0] == groups[1]
        if "eval_data" in options:  # unequal shares of the eval set: padded with placeholders under FSDP
            rows = [
                json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
                for out in (fsdp_out, one_out)
            ]
            assert rows[0]["eval_loss"] == pytest.approx(rows[1]["eval_loss"], rel=1e-5)
    assert (tmp_path / "fsdp" / "lora" / "adapter" / "language" / "adapter_config.json").is_file()
    assert (tmp_path / "fsdp" / "full" / "checkpoints" / "step-00000002" / "trainer.json").is_file()
    resumed = tmp_path / "fsdp" / "resumed"
    assert_close(resumed / "model.safetensors", tmp_path / "fsdp" / "full" / "model.safetensors", atol=1e-6)
    assert VLM.from_pretrained(tmp_path / "fsdp" / "full").ask(
        "What colour is the image?", images=[data / "red.png"], max_new_tokens=2
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
