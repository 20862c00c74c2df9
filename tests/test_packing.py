"""Packing questions about the same image(s) into multi-turn conversations (recipe stage 2)."""

from __future__ import annotations

import pytest
import torch

from vlmkit.data.dataset import ConversationDataset, Record, read_records
from vlmkit.data.packing import pack_by_image, write_records
from vlmkit.processing.prompting import IGNORE_INDEX


def qa(id_: str, images: tuple[str, ...], question: str, answer: str) -> Record:
    return Record(id=id_, images=images,
                  messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}])  # fmt: skip


RECORDS = [
    qa("a1", ("a.png",), "<image>\nWhat colour is the square?", "red"),
    qa("b1", ("b.png",), "<image>\nHow many shapes?", "2"),
    qa("a2", ("a.png",), "<image>\nWhere is the square?", "top left"),
    qa(
        "m1",
        ("a.png", "b.png"),
        "Image 1: <image>\nImage 2: <image>\nWhich image has more shapes?",
        "image 2",
    ),
    qa("a3", ("a.png",), "<image>\nIs there a circle?", "no"),
    qa("m2", ("a.png", "b.png"), "Image 1: <image>\nImage 2: <image>\nWhich has more circles?", "image 1"),
    qa("inline", ("c.png",), "Describe <image> briefly.", "a dot"),
    qa("inline2", ("c.png",), "<image>\nWhat is it?", "a dot"),
    Record(
        id="text", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ),
]


def answers(record: Record) -> list[str]:
    return [m["content"] for m in record.messages if m["role"] == "assistant"]


def test_questions_about_one_image_become_one_conversation():
    packed = {r.images: r for r in pack_by_image(RECORDS, seed=0) if r.id.startswith("pack-")}
    single, multi = packed[("a.png",)], packed[("a.png", "b.png")]
    assert sorted(answers(single)) == ["no", "red", "top left"]
    assert sorted(answers(multi)) == ["image 1", "image 2"]
    for record, placeholders in ((single, 1), (multi, 2)):
        users = [m["content"] for m in record.messages if m["role"] == "user"]
        # the images appear once, in the first turn; later turns keep only the question
        assert users[0].count("<image>") == placeholders
        assert all("<image>" not in u and "Image 1" not in u for u in users[1:])
        assert all(u.strip().endswith("?") for u in users)


def test_every_answer_survives_and_unmergeable_records_pass_through():
    packed = pack_by_image(RECORDS, seed=0)
    assert sorted(a for r in packed for a in answers(r)) == sorted(a for r in RECORDS for a in answers(r))
    ids = {r.id for r in packed}
    assert {"text", "inline", "b1"} <= ids  # text-only, placeholder inside a sentence, a lone question
    assert not any(r.id.startswith("pack-") and r.images == ("c.png",) for r in packed)


def test_max_turns_and_seeded_order():
    many = [qa(f"q{i}", ("a.png",), f"<image>\nQuestion {i}?", str(i)) for i in range(7)]
    packed = pack_by_image(many, max_turns=3, seed=1)
    assert [len(answers(r)) for r in packed] == [3, 3, 1]
    assert pack_by_image(many, max_turns=3, seed=1) == packed
    orders = {
        tuple(a for r in pack_by_image(many, max_turns=7, seed=s) for a in answers(r)) for s in range(5)
    }
    assert len(orders) > 1  # the turn order is shuffled, so no task always sits next to the image
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        pack_by_image(many, max_turns=0)


def test_written_file_reads_back_and_every_answer_is_a_target(tiny_vlm, tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "a.png")
    packed = [r for r in pack_by_image(RECORDS[:5], seed=0) if r.images == ("a.png",)]
    write_records(packed, tmp_path / "packed.json")
    assert read_records(tmp_path / "packed.json") == packed
    example = ConversationDataset(packed, processor=tiny_vlm.processor, image_folder=tmp_path)[0]
    targets = tiny_vlm.tokenizer.decode(example.labels[example.labels != IGNORE_INDEX])
    for answer in ("red", "top left", "no"):
        assert answer in targets
    image_id = tiny_vlm.tokenizer.convert_tokens_to_ids("<image>")
    assert int((example.input_ids == image_id).sum()) == tiny_vlm.model.vision.num_tokens
    assert example.pixel_values.shape[0] == 1 and torch.isfinite(example.pixel_values).all()
