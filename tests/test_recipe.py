"""Recipe tiny-scratch: a VLM trained from nothing learns a simple task well above chance (fixed steps)."""

import json

import pytest

from vlmkit.api import VLM
from vlmkit.data.synth import generate_dataset
from vlmkit.evaluation.runner import evaluate
from vlmkit.training.recipes.tiny_scratch import Recipe, run_recipe


def test_unknown_recipe_lists_known():
    with pytest.raises(ValueError, match="unknown recipe 'nope'; known: .*tiny-scratch"):
        Recipe.load("nope")


def test_recipe_learns_colours_well_above_chance(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, n=500, seed=3, tasks=["vqa_colour"], test_fraction=0.2)
    recipe = Recipe.load("tiny-scratch")
    recipe.stage2["lr"] = 3e-3  # a 150-step schedule needs a hotter LR than the recipe's 15-minute one
    # the path users' own data takes (no scene labels); scene-label pre-training has its own tests
    recipe.stage1["objective"] = "answers"
    result = run_recipe(recipe=recipe, data=data / "train.json", image_folder=data, out=tmp_path / "model",
                        stage1_steps=40, stage2_steps=150, progress=False)  # fmt: skip
    assert result.stage1["last_loss"] < result.stage1["first_loss"] * 0.7
    vlm = VLM.from_pretrained(tmp_path / "model")
    records = json.loads((data / "test.json").read_text())
    report = evaluate(vlm, records, image_folder=data, metric="exact_match", batch_size=32, max_new_tokens=4)
    # six colours: chance is about 0.17
    assert report.score >= 0.5, report


@pytest.mark.parametrize(
    ("objective", "message"),
    [("pixels", "stage1.objective must be auto, scene or answers"), ("scene", "needs a scenes.jsonl")],
)
def test_recipe_stage1_objective_errors(tmp_path, objective, message):
    data = tmp_path / "data"
    generate_dataset(data, n=30, seed=3, tasks=["vqa_colour"])
    (data / "scenes.jsonl").unlink()
    recipe = Recipe.load("tiny-scratch")
    recipe.stage1["objective"] = objective
    with pytest.raises(ValueError, match=message):
        run_recipe(recipe=recipe, data=data / "train.json", image_folder=data, out=tmp_path / "model",
                   stage1_steps=1, stage2_steps=1, progress=False)  # fmt: skip
    assert not (tmp_path / "model").exists()
