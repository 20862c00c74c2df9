"""benchmarks/gpu_all.py: the one GPU entry point. Its dry run checks the whole script on CPU; a skipped stage fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


@pytest.mark.slow
def test_gpu_entry_point_dry_run_writes_both_results(tmp_path) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_all.py"), "--dry-run", "--out-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    gpu = json.loads((tmp_path / "gpu.json").read_text())
    train = json.loads((tmp_path / "train_gpu.json").read_text())
    assert gpu["bandwidth"]["copy_gb_s"] > 0 and gpu["bandwidth"]["lm_weight_bytes"] > 0
    assert {"batch1_decode_share_of_roofline", "repeated_image_ttft_ms", "encode_img_s_batch64"} <= gpu[
        "targets"
    ].keys()
    assert {"projector_speed_over_transformers", "lora_speed_over_transformers"} <= train["targets"].keys()
    assert all(isinstance(t["met"], bool) for t in [*gpu["targets"].values(), *train["targets"].values()])


def test_a_skipped_stage_is_reported_not_hidden() -> None:
    import gpu_all

    result = {"single": {"skipped": "time budget: 3 s left"}, "decode_by_batch": {"1": {"vlmkit_tok_s": 9.0}}}
    assert gpu_all.incomplete(result) == ["single: time budget: 3 s left"]
    assert gpu_all.incomplete({"stages": {"lora": {"vlmkit": {}}}}) == []


def test_roofline_and_training_targets() -> None:
    import gpu_all

    assert gpu_all.decode_roofline(bandwidth_gb_s=3000, weight_bytes=13_500_000_000) == pytest.approx(
        222.2, 0.01
    )
    report = {"stages": {"lora": {"vlmkit": {"samples_per_s": 12.0, "peak_gb": 20.0, "plan_gb": 23.0},
                                  "transformers": {"samples_per_s": 9.8, "peak_gb": 22.2}}}}  # fmt: skip
    targets = gpu_all.training_targets(report)
    assert targets["lora_speed_over_transformers"]["met"] is True  # 1.22x
    assert targets["lora_peak_over_transformers"]["met"] is True
    assert targets["lora_plan_error"]["met"] is False  # 15% off
