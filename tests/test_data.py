"""LLaVA-format data: parsing (JSON / JSONL, roles, multi-image, text-only), errors, label masks, skipping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmkit.data.dataset import (
    ConversationDataset,
    DataError,
    Example,
    Skipped,
    collate,
    parse_record,
    read_records,
)
from vlmkit.processing.prompting import IGNORE_INDEX

MULTI = {
    "id": "multi",
    "image": ["a.png", "b.png"],
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\n<image>\nWhich is red?"},
        {"from": "gpt", "value": "the first"},
        {"from": "human", "value": "And the other?"},
        {"from": "gpt", "value": "blue"},
    ],
}
SINGLE = {"id": 7, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                       {"from": "gpt", "value": "red"}]}  # fmt: skip
TEXT = {
    "id": "text",
    "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}],
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (20, 16), (220, 20, 20)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 20), (20, 20, 220)).save(tmp_path / "b.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path


def test_json_array_and_jsonl_read_the_same(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([MULTI, SINGLE, TEXT]))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in (MULTI, SINGLE, TEXT)) + "\n\n")
    array, lines = read_records(tmp_path / "d.json"), read_records(tmp_path / "d.jsonl")
    assert array == lines
    multi, single, text = array
    assert multi.images == ("a.png", "b.png") and single.images == ("a.png",) and text.images == ()
    assert single.id == "7"
    assert [m["role"] for m in multi.messages] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "x", "conversations": []}, "record 'x': field 'conversations'"),
        ({"id": "x", "conversations": [{"from": "bot", "value": "hi"}]}, "record 'x', conversations[0]: field 'from'"),
        ({"id": "x", "conversations": [{"from": "gpt", "value": 3}]}, "record 'x', conversations[0]: field 'value'"),
        ({"id": "x", "conversations": [{"from": "human", "value": "hi"}]}, "record 'x': field 'conversations' has no 'gpt'"),
        ({"id": "x", "image": 5, "conversations": TEXT["conversations"]}, "record 'x': field 'image'"),
        ({"id": "x", "image": "a.png", "conversations": TEXT["conversations"]}, "record 'x': field 'image' lists 1"),
        ({"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}]},
         "may only appear in 'human'"),
        ([1, 2], "record 0: expected a JSON object"),
    ],
)  # fmt: skip
def test_malformed_record_names_id_and_field(tmp_path, record, message):
    (tmp_path / "d.json").write_text(json.dumps([record]))
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_records(tmp_path / "d.json")


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "missing.json")
    (tmp_path / "bad.jsonl").write_text(json.dumps(TEXT) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "dup.jsonl").write_text(json.dumps(TEXT) + "\n" + json.dumps(TEXT) + "\n")
    with pytest.raises(DataError, match="'text' appears twice"):
        read_records(tmp_path / "dup.jsonl")


def _spans(ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of labelled positions, as token-id lists."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids.tolist(), labels.tolist(), strict=True):
        inside = label != IGNORE_INDEX
        if inside:
            assert label == token
            runs[-1:] = [runs[-1] + [token]] if previous else [*runs, [token]]
        previous = inside
    return runs


def test_label_mask_multi_turn_multi_image(tiny_vlm, folder):
    """Only the two assistant replies (with their end-of-turn token) are learned; system, user, template and
    the 2 x 16 image tokens are all ignored."""
    tok = tiny_vlm.tokenizer
    dataset = ConversationDataset([parse_record(MULTI)], processor=tiny_vlm.processor, image_folder=folder)
    example = dataset[0]
    assert isinstance(example, Example) and example.pixel_values.shape == (2, 3, 32, 32)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # hand-computed: the chat template renders "<|im_start|>assistant\n{reply}<|im_end|>\n"; the label spans
    # are exactly the reply tokens followed by <|im_end|>
    expected = [tok("the first", add_special_tokens=False)["input_ids"] + [end],
                tok("blue", add_special_tokens=False)["input_ids"] + [end]]  # fmt: skip
    assert _spans(example.input_ids, example.labels) == expected
    image_id = tiny_vlm.config.prompt.image_token_id
    assert int((example.input_ids == image_id).sum()) == 2 * tiny_vlm.model.num_image_tokens
    assert sum(len(s) for s in expected) == int((example.labels != IGNORE_INDEX).sum())


def test_missing_and_corrupt_images_are_skipped_not_fatal(tiny_vlm, folder):
    records = [parse_record(SINGLE), parse_record({**SINGLE, "id": "gone", "image": "nope.png"}),
               parse_record({**SINGLE, "id": "bad", "image": "corrupt.png"}), parse_record(TEXT)]  # fmt: skip
    dataset = ConversationDataset(records, processor=tiny_vlm.processor, image_folder=folder)
    items = [dataset[i] for i in range(len(dataset))]
    assert [type(i) for i in items] == [Example, Skipped, Skipped, Example]
    assert "not found" in items[1].reason and "nope.png" in items[1].reason
    batch = collate(items, pad_token_id=tiny_vlm.processor.pad_token_id, image_size=32)
    assert batch.ids == ["7", "text"] and [s.id for s in batch.skipped] == ["gone", "bad"]
    assert batch.input_ids.shape[0] == 2 and batch.pixel_values.shape == (1, 3, 32, 32)
    # right padding: the shorter row ends in pad tokens with mask 0 and ignored labels
    short = int(batch.attention_mask.sum(1).argmin())
    assert batch.attention_mask[short, -1] == 0 and batch.labels[short, -1] == IGNORE_INDEX
    assert batch.num_target_tokens == int((batch.labels != IGNORE_INDEX).sum())


def test_over_long_sample_is_skipped(tiny_vlm, folder):
    dataset = ConversationDataset([parse_record(SINGLE)], processor=tiny_vlm.processor, image_folder=folder,
                                  max_length=10)  # fmt: skip
    item = dataset[0]
    assert isinstance(item, Skipped) and "max length 10" in item.reason
