"""The composed model: loading real parts, the merge, save/load, and the user-facing API."""

import pytest
import torch

from conftest import make_image
from vlmkit.api import VLM
from vlmkit.models.io import ModelDirError
from vlmkit.processing.processor import Sample


@pytest.mark.parametrize(
    ("vision", "language", "projector"),
    [
        ("clip", "llama", "mlp"),
        ("siglip", "qwen2", "linear"),
        ("dinov2", "gpt2", "resampler"),
        ("siglip", "llama", "resampler"),
        ("dinov2", "qwen2", "mlp"),
        ("clip", "gpt2", "linear"),
    ],
)
def test_build_save_load_gives_identical_logits(parts, tmp_path, images, vision, language, projector):
    vlm = VLM.build(vision=parts[vision], language=parts[language], projector=projector)
    batch = vlm.processor([Sample(messages=vlm.processor.user_prompt("What colour?", num_images=1),
                                  images=[images[0]])])  # fmt: skip
    with torch.no_grad():
        before = vlm.model(**batch).logits
    loaded = VLM.from_pretrained(vlm.save_pretrained(tmp_path / "m"))
    assert loaded.config == vlm.config
    with torch.no_grad():
        after = loaded.model(**loaded.processor([Sample(messages=vlm.processor.user_prompt("What colour?",
                             num_images=1), images=[images[0]])])).logits  # fmt: skip
    assert torch.equal(before, after)
    assert isinstance(loaded.ask("What colour?", images=images[0], max_new_tokens=3), str)


def _rows(vlm):
    user = vlm.processor.user_prompt
    return [
        Sample(messages=user("<image> left, and right <image> which?", num_images=2), images=None),
        Sample(messages=user("no image here, just text", num_images=0), images=[]),
        Sample(messages=user("one <image>", num_images=1), images=None),
    ]


def test_image_features_land_exactly_on_their_placeholders(tiny_vlm, images):
    vlm = tiny_vlm
    rows = _rows(vlm)
    rows[0].images, rows[2].images = images[:2], images[2:]
    batch = vlm.processor(rows, padding_side="right")
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = vlm.model.embed(input_ids=ids, pixel_values=batch["pixel_values"])
        features = vlm.model.encode_images(batch["pixel_values"])  # [3 images, tokens, dim]
        text = vlm.model.language_model.get_input_embeddings()(
            ids.masked_fill(ids == vlm.model.image_token_id, 0)
        )
    n = vlm.model.num_image_tokens
    is_image = ids == vlm.model.image_token_id
    spans = [torch.nonzero(is_image[0]).flatten()[:n], torch.nonzero(is_image[0]).flatten()[n:],
             torch.nonzero(is_image[2]).flatten()]  # fmt: skip
    for k, (row, span) in enumerate(zip([0, 0, 2], spans, strict=True)):
        assert span.numel() == n and torch.equal(span, torch.arange(span[0], span[0] + n))  # contiguous span
        assert torch.equal(embeds[row, span], features[k]), f"image {k} not on its span"
    assert spans[0][-1] < spans[1][0]  # image order kept within a row
    assert torch.equal(embeds[~is_image], text[~is_image])  # every text position untouched
    assert not is_image[1].any() and torch.equal(embeds[1], text[1])  # text-only row unchanged


def test_placeholder_image_count_mismatch_names_both_counts(tiny_vlm, images):
    with pytest.raises(ValueError, match=r"2 <image> placeholders but 1 image"):
        tiny_vlm.ask("<image> and <image>", images=[images[0]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"mismatch.*1 placeholders but 2 images"):
        batch = tiny_vlm.processor([Sample(messages=tiny_vlm.processor.user_prompt("x", num_images=1),
                                           images=[images[0]])])  # fmt: skip
        tiny_vlm.model.embed(
            input_ids=batch["input_ids"], pixel_values=torch.cat([batch["pixel_values"]] * 2)
        )


def test_prompt_without_placeholder_gets_images_prepended(tiny_vlm, images):
    a = tiny_vlm.ask("What is shown?", images=images[:2], max_new_tokens=5)
    b = tiny_vlm.ask("<image>\n<image>\nWhat is shown?", images=images[:2], max_new_tokens=5)
    assert a == b


def test_image_inputs_paths_bytes_and_pil_agree(tiny_vlm, tmp_path, images):
    from conftest import png_bytes

    path = tmp_path / "a.png"
    images[0].save(path)
    answers = {tiny_vlm.ask("Describe.", images=src, max_new_tokens=6)
               for src in (path, str(path), png_bytes(images[0]), images[0])}  # fmt: skip
    assert len(answers) == 1


def test_left_padded_batch_equals_each_prompt_alone(tiny_vlm, images):
    prompts = ["Describe the image.", "What colour is the circle on the left of the square?", "Hi"]
    imgs = [[images[0]], [images[1], images[2]], []]
    batched = tiny_vlm.ask_batch(prompts, images=imgs, max_new_tokens=8)
    alone = [tiny_vlm.ask(p, images=i, max_new_tokens=8) for p, i in zip(prompts, imgs, strict=True)]
    assert batched == alone


def test_forward_with_labels_and_padding_invariance(tiny_vlm, images):
    vlm = tiny_vlm
    sample = Sample(messages=[{"role": "user", "content": "<image> colour?"}, {"role": "assistant", "content": "red"}],
                    images=[images[0]])  # fmt: skip
    short = Sample(messages=[{"role": "user", "content": "hi"}], images=[])
    batch = vlm.processor(
        [sample, short], padding_side="right", add_generation_prompt=False, with_labels=True
    )
    alone = vlm.processor([sample], padding_side="right", add_generation_prompt=False, with_labels=True)
    with torch.no_grad():
        out = vlm.model(**batch)
        ref = vlm.model(**alone)
    assert torch.isfinite(out.loss)
    n = alone["input_ids"].shape[1]
    torch.testing.assert_close(out.logits[0, :n], ref.logits[0], atol=1e-5, rtol=1e-5)
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert vlm.tokenizer.decode(labelled).startswith("red")


def test_stream_joins_to_ask(tiny_vlm, images):
    pieces = list(tiny_vlm.stream("Describe the image.", images=images[0], max_new_tokens=10))
    assert "".join(pieces) == tiny_vlm.ask("Describe the image.", images=images[0], max_new_tokens=10)


def test_chat_accepts_openai_messages_with_data_urls(tiny_vlm, images):
    import base64

    from conftest import png_bytes

    url = "data:image/png;base64," + base64.b64encode(png_bytes(images[0])).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Describe the image."}]}]  # fmt: skip
    assert tiny_vlm.chat(messages, max_new_tokens=6) == tiny_vlm.ask("Describe the image.", images=images[0],
                                                                     max_new_tokens=6)  # fmt: skip


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path, tiny_vlm_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_vlm_dir, bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(
        b"not even a pickle"
    )  # would explode if anything tried to load it
    with pytest.raises(ModelDirError, match="pickle format.*pytorch_model.bin.*safetensors only"):
        VLM.from_pretrained(bad)


def test_bad_model_dirs(tmp_path, parts):
    with pytest.raises(ModelDirError, match="not found"):
        VLM.from_pretrained(tmp_path / "missing")
    with pytest.raises(ModelDirError, match="transformers 'llama' checkpoint"):
        VLM.from_pretrained(parts["llama"])


def test_save_refuses_to_clobber_a_foreign_directory(tiny_vlm, tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(ModelDirError, match="refusing to overwrite"):
        tiny_vlm.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_resave_over_existing_model_dir(tiny_vlm, tmp_path):
    target = tiny_vlm.save_pretrained(tmp_path / "m")
    tiny_vlm.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert VLM.from_pretrained(target).config == tiny_vlm.config


def test_sharded_checkpoint_round_trip(tiny_vlm, tmp_path):
    from vlmkit.models.io import load_weights, read_weights, save_weights

    save_weights(tiny_vlm.model, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists() and len(
        list(tmp_path.glob("*.safetensors"))
    ) > 1
    state = read_weights(tmp_path)
    clone = type(tiny_vlm.model)(config=tiny_vlm.config)
    load_weights(clone, state, source=tmp_path)
    for (name, a), (_, b) in zip(
        tiny_vlm.model.state_dict().items(), clone.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_higher_resolution_multiplies_image_tokens(parts):
    low = VLM.build(vision=parts["clip"], language=parts["llama"])
    high = VLM.build(vision=parts["clip"], language=parts["llama"], image_size=64)
    assert high.model.num_image_tokens == 4 * low.model.num_image_tokens
    assert isinstance(high.ask("Describe.", images=make_image(seed=1), max_new_tokens=2), str)


def test_a_tied_group_with_no_stored_tensor_is_missing(parts):
    from vlmkit.models.io import load_weights, unique_state_dict

    vlm = VLM.build(vision=parts["clip"], language=parts["gpt2"])  # GPT-2 ties lm_head to wte
    state = unique_state_dict(vlm.model)
    assert "language_model.transformer.wte.weight" not in state  # stored once, under the other name
    load_weights(type(vlm.model)(config=vlm.config), dict(state), source="ok")  # the tie is restored
    del state["language_model.lm_head.weight"]
    with pytest.raises(ModelDirError, match="missing 2 tensors"):
        load_weights(type(vlm.model)(config=vlm.config), state, source="bad")


def test_left_padded_forward_equals_each_row_alone(tiny_vlm, images):
    vlm = tiny_vlm
    rows = [
        Sample(messages=vlm.processor.user_prompt("Describe the image in a few words.", num_images=1),
               images=[images[0]]),
        Sample(messages=vlm.processor.user_prompt("Hi", num_images=0), images=[]),
    ]  # fmt: skip
    batch = vlm.processor(rows, padding_side="left")
    with torch.no_grad():
        both = vlm.model(**batch).logits
        for i, row in enumerate(rows):
            alone = vlm.model(**vlm.processor([row], padding_side="left")).logits[0]
            torch.testing.assert_close(both[i, -alone.shape[0] :], alone, atol=1e-5, rtol=1e-5)
