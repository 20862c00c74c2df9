"""benchmarks/resolution_accuracy.py: the synthetic small-print documents say what they ask about, and the
benchmark runs end to end (dry run) into a result of the documented shape."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import resolution_accuracy as bench  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_answer_is_the_code_drawn_on_the_asked_line(tmp_path):
    records = bench.make_split(tmp_path, n=40, seed=3)
    assert len(set(bench.FONT.values())) == 10  # every glyph distinct, so reading is well defined
    for record in records:
        page = Image.open(tmp_path / record["image"])
        assert page.size == (bench.PAGE, bench.PAGE)
        question, answer = (turn["value"] for turn in record["conversations"])
        assert question.endswith(f"line {record['line']}?")
        drawn = [bench.read_code(page, x=bench.CODE_X, y=y) for y in bench.LINE_Y]
        assert "?" not in "".join(drawn) and drawn[record["line"] - 1] == answer
    assert len({r["line"] for r in records}) == bench.LINES
    assert json.loads((tmp_path / "data.json").read_text()) == records


def test_splits_from_different_seeds_differ(tmp_path):
    train = bench.make_split(tmp_path / "a", n=20, seed=0)
    test = bench.make_split(tmp_path / "b", n=20, seed=1)
    assert {r["conversations"][1]["value"] for r in train}.isdisjoint(
        {r["conversations"][1]["value"] for r in test}
    )


def test_small_print_is_lost_at_the_low_resolution():
    """The premise: at the page's size the code reads back exactly; downsampled to the low setting's tower
    input (and blown up again) it does not."""
    codes = ["1234", "5678", "9012"]
    page = bench.render_page(codes=codes, rng=random.Random(0))
    low = page.resize((bench.TILE, bench.TILE), Image.Resampling.BICUBIC).resize(
        page.size, Image.Resampling.NEAREST
    )
    for code, y in zip(codes, bench.LINE_Y, strict=True):
        assert bench.read_code(page, x=bench.CODE_X, y=y) == code
        assert bench.read_code(low, x=bench.CODE_X, y=y) != code


@pytest.mark.slow
def test_dry_run_writes_the_documented_result(tmp_path):
    out = tmp_path / "acc.json"
    result = bench.main(["--dry-run", "--settings", "low,anyres", "--out", str(out)])
    assert json.loads(out.read_text()) == result and result["dry_run"]
    assert set(result["settings"]) == {"low", "anyres"}
    assert {"versions", "device", "task", "recipe", "chance"} <= set(result)
    assert result["chance"]["exact_match"] == 10.0**-bench.CODE_DIGITS
    low, anyres = result["settings"]["low"], result["settings"]["anyres"]
    assert low["visual_tokens"] == (bench.TILE // bench.PATCH) ** 2
    # base view + a 2x2 grid of tiles (16 x 16 tokens) with a newline after every row
    assert anyres["visual_tokens"] == 64 + 16 * 17
    for row in (low, anyres):
        assert row["steps"] == result["recipe"]["steps"] == 2
        assert 0.0 <= row["exact_match"] <= row["digit_accuracy"] <= 1.0
    merged = bench.main(["--merge", str(out), str(out), "--out", str(tmp_path / "m.json")])
    assert merged["settings"] == result["settings"]
