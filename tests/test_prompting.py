"""Prompt rendering, image-token expansion, label masking, padding and OpenAI-style message normalisation."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image
from tokenizers.processors import TemplateProcessing

from tiny import CHAT_TEMPLATE, build_tokenizer
from vlmkit.processing.prompting import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    EncodedPrompt,
    count_placeholders,
    encode,
    ensure_placeholders,
    expand_image_tokens,
    normalize_messages,
    pad_batch,
    render,
    resolve_template,
)

IMG = "<image>"
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TWO_TURNS = [
    {"role": "user", "content": "<image>\nWhat colour is the circle?"},
    {"role": "assistant", "content": "The circle is red."},
    {"role": "user", "content": "Describe the image."},
    {"role": "assistant", "content": "A blue square on the left."},
]


@pytest.fixture
def tok():
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMG]})
    return tokenizer


@pytest.fixture
def plain_tok():
    tokenizer = build_tokenizer(chat_template=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMG]})
    return tokenizer


def span_texts(rendered):
    return [rendered.text[s:e] for s, e in rendered.assistant_spans]


# ---------------------------------------------------------------- templates


def test_llava_v1_matches_llava_conversation_py(plain_tok):
    out = render(TWO_TURNS, tokenizer=plain_tok, template="llava-v1", add_generation_prompt=False)
    assert out.text == (
        SYSTEM + " USER: <image>\nWhat colour is the circle? ASSISTANT: The circle is red.</s>"
        "USER: Describe the image. ASSISTANT: A blue square on the left.</s>"
    )
    assert span_texts(out) == ["The circle is red.</s>", "A blue square on the left.</s>"]

    gen = render(TWO_TURNS[:3], tokenizer=plain_tok, template="llava-v1", add_generation_prompt=True)
    assert gen.text == (
        SYSTEM + " USER: <image>\nWhat colour is the circle? ASSISTANT: The circle is red.</s>"
        "USER: Describe the image. ASSISTANT:"
    )


def test_chatml_two_turns(plain_tok):
    out = render(
        TWO_TURNS, tokenizer=plain_tok, template="chatml", system="Be brief.", add_generation_prompt=False
    )
    assert out.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nThe circle is red.<|im_end|>\n"
        "<|im_start|>user\nDescribe the image.<|im_end|>\n"
        "<|im_start|>assistant\nA blue square on the left.<|im_end|>\n"
    )
    assert span_texts(out) == ["The circle is red.<|im_end|>", "A blue square on the left.<|im_end|>"]
    gen = render(TWO_TURNS[:1], tokenizer=plain_tok, template="chatml", add_generation_prompt=True)
    # no default system prompt for chatml
    assert (
        gen.text == "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_plain_is_llava_pretraining_format(plain_tok):
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": IMG},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": IMG},
        {"role": "assistant", "content": "A blue square."},
    ]
    out = render(messages, tokenizer=plain_tok, template="plain", add_generation_prompt=False)
    assert out.text == "<image>A red circle.\n<image>A blue square.\n"
    assert span_texts(out) == ["A red circle.\n", "A blue square.\n"]


def test_system_precedence(plain_tok):
    first = TWO_TURNS[:1]
    override = render(
        first, tokenizer=plain_tok, template="llava-v1", system="Sys.", add_generation_prompt=True
    )
    assert override.text == "Sys. USER: <image>\nWhat colour is the circle? ASSISTANT:"
    own = [{"role": "system", "content": "Mine."}, *first]
    kept = render(own, tokenizer=plain_tok, template="llava-v1", system="Sys.", add_generation_prompt=True)
    assert kept.text.startswith("Mine. USER:")
    with pytest.raises(ValueError, match="first message"):
        render(
            [*first, {"role": "system", "content": "x"}],
            tokenizer=plain_tok,
            template="chatml",
            add_generation_prompt=True,
        )


def test_resolve_template(tok, plain_tok):
    assert resolve_template("auto", tok) == "tokenizer"
    assert resolve_template("auto", plain_tok) == "llava-v1"
    assert resolve_template("chatml", plain_tok) == "chatml"
    with pytest.raises(ValueError, match="llava-v1.*chatml.*plain"):
        resolve_template("vicuna", tok)
    with pytest.raises(ValueError, match="no chat_template"):
        resolve_template("tokenizer", plain_tok)
    assert {"llava-v1", "chatml", "plain"} <= set(BUILTIN_TEMPLATES)


def test_tokenizer_template_spans(tok):
    messages = [{"role": "system", "content": "Be brief."}, *TWO_TURNS]
    out = render(messages, tokenizer=tok, template="tokenizer", add_generation_prompt=False)
    assert out.text == tok.apply_chat_template(messages, tokenize=False)
    assert span_texts(out) == ["The circle is red.<|im_end|>", "A blue square on the left.<|im_end|>"]
    inserted = render(TWO_TURNS[:1], tokenizer=tok, template="auto", system="S", add_generation_prompt=True)
    assert inserted.text.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n")


def test_tokenizer_template_not_prefix_stable(tok):
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="not prefix-stable.*built-in"):
        render(TWO_TURNS, tokenizer=tok, template="tokenizer", add_generation_prompt=False)


def test_render_rejects_unnormalised_messages(plain_tok):
    with pytest.raises(ValueError, match="message 0"):
        render(
            [{"role": "tool", "content": "x"}],
            tokenizer=plain_tok,
            template="chatml",
            add_generation_prompt=True,
        )
    with pytest.raises(ValueError, match="message 0: field 'content'"):
        render(
            [{"role": "user", "content": [{"type": "text"}]}],
            tokenizer=plain_tok,
            template="chatml",
            add_generation_prompt=True,
        )


# ---------------------------------------------------------------- placeholders


def test_count_and_expand():
    text = "<image>\nA <image> B"
    assert count_placeholders(text, image_token=IMG) == 2
    expanded = expand_image_tokens(text, image_token=IMG, num_tokens=4)
    assert count_placeholders(expanded, image_token=IMG) == 8
    assert expanded == IMG * 4 + "\nA " + IMG * 4 + " B"
    with pytest.raises(ValueError):
        expand_image_tokens(text, image_token=IMG, num_tokens=0)


def test_ensure_placeholders():
    assert ensure_placeholders("Describe.", num_images=2, image_token=IMG) == "<image>\n<image>\nDescribe."
    assert ensure_placeholders("Describe.", num_images=0, image_token=IMG) == "Describe."
    assert ensure_placeholders("<image> x", num_images=1, image_token=IMG) == "<image> x"
    with pytest.raises(ValueError, match="prompt has 2 <image> placeholders but 1 image was given"):
        ensure_placeholders("<image><image>", num_images=1, image_token=IMG)
    with pytest.raises(ValueError, match="prompt has 1 <image> placeholder but 0 images were given"):
        ensure_placeholders("<image>", num_images=0, image_token=IMG)


# ---------------------------------------------------------------- encode / labels


def labelled_runs(tokenizer, encoded):
    """Decode each maximal run of labelled tokens."""
    runs, current = [], []
    for label in [*encoded.labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


MULTI_IMAGE = [
    {"role": "user", "content": "<image>\n<image>\nWhich image has more circles?"},
    {"role": "assistant", "content": "The first one has two circles."},
    {"role": "user", "content": "What colour is the circle in <image>?"},
    {"role": "assistant", "content": "The circle is red."},
]


def test_labels_llava_v1_multi_turn_multi_image(tok):
    enc = encode(
        MULTI_IMAGE,
        tokenizer=tok,
        template="llava-v1",
        image_token=IMG,
        num_image_tokens=3,
        add_generation_prompt=False,
        with_labels=True,
    )
    image_id = tok.convert_tokens_to_ids(IMG)
    assert enc.num_images == 3
    assert enc.input_ids.count(image_id) == 9
    assert len(enc.labels) == len(enc.input_ids)
    # the tokenizer merges the space after "ASSISTANT:" into the first reply token, as Llama's does
    assert labelled_runs(tok, enc) == [" The first one has two circles.</s>", " The circle is red.</s>"]
    for token_id, label in zip(enc.input_ids, enc.labels, strict=True):
        assert label in (IGNORE_INDEX, token_id)
    unlabelled = tok.decode(
        [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab == IGNORE_INDEX]
    )
    assert unlabelled.startswith(SYSTEM + " USER: " + IMG * 3 + "\n" + IMG * 3 + "\nWhich image")
    assert "What colour is the circle in " + IMG * 3 + "? ASSISTANT:" in unlabelled
    assert image_id not in enc.labels


def test_labels_tokenizer_template(tok):
    enc = encode(
        [{"role": "system", "content": "Be brief."}, *MULTI_IMAGE],
        tokenizer=tok,
        template="auto",
        image_token=IMG,
        num_image_tokens=2,
        add_generation_prompt=False,
        with_labels=True,
    )
    assert enc.num_images == 3
    assert labelled_runs(tok, enc) == [
        "The first one has two circles.<|im_end|>",
        "The circle is red.<|im_end|>",
    ]


def test_encode_generation_prompt_without_labels(tok):
    enc = encode(
        MULTI_IMAGE[:1],
        tokenizer=tok,
        template="chatml",
        image_token=IMG,
        num_image_tokens=5,
        add_generation_prompt=True,
    )
    assert enc.labels is None
    assert tok.decode(enc.input_ids).endswith("<|im_start|>assistant\n")
    assert enc.input_ids.count(tok.convert_tokens_to_ids(IMG)) == 10


def test_bos_added_once(tok):
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    kwargs = dict(
        tokenizer=tok, image_token=IMG, num_image_tokens=1, add_generation_prompt=False, with_labels=True
    )
    builtin = encode(TWO_TURNS, template="llava-v1", **kwargs)
    assert builtin.input_ids[0] == bos and builtin.input_ids.count(bos) == 1
    assert builtin.labels[0] == IGNORE_INDEX
    tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    own = encode(TWO_TURNS, template="tokenizer", **kwargs)
    assert own.input_ids[0] == bos and own.input_ids.count(bos) == 1


def test_encode_requires_special_image_token(plain_tok):
    tokenizer = build_tokenizer(chat_template=False)
    with pytest.raises(ValueError, match="not a special token"):
        encode(
            TWO_TURNS,
            tokenizer=tokenizer,
            template="llava-v1",
            image_token=IMG,
            num_image_tokens=2,
            add_generation_prompt=False,
        )


# ---------------------------------------------------------------- padding


def test_pad_batch_left_and_right():
    rows = [EncodedPrompt([5, 6, 7], [-100, 6, 7], 0), EncodedPrompt([8], [8], 0)]
    right = pad_batch(rows, pad_token_id=0, side="right")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["input_ids"].dtype == right["attention_mask"].dtype == right["labels"].dtype == torch.long
    left = pad_batch(
        [EncodedPrompt([5, 6, 7], None, 1), EncodedPrompt([8], None, 0)], pad_token_id=3, side="left"
    )
    assert set(left) == {"input_ids", "attention_mask"}
    assert left["input_ids"].tolist() == [[5, 6, 7], [3, 3, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_batch_errors():
    with pytest.raises(ValueError, match="side"):
        pad_batch([EncodedPrompt([1], None, 0)], pad_token_id=0, side="middle")
    with pytest.raises(ValueError, match="labels"):
        pad_batch([EncodedPrompt([1], [1], 0), EncodedPrompt([1], None, 0)], pad_token_id=0, side="right")


# ---------------------------------------------------------------- normalize_messages


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def test_normalize_messages_parts():
    raw = png_bytes()
    pil = Image.new("RGB", (2, 2))
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(raw)}},
                {"type": "text", "text": "What is this?"},
                {"type": "text", "text": " And "},
                {"image_url": data_url(raw)},
                {"type": "image", "image": pil},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": "Plain <image> text"},
    ]
    plain, images = normalize_messages(messages, image_token=IMG)
    assert plain == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is this? And <image><image>"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Plain <image> text"},
    ]
    assert images[0] == raw and images[1] == raw and images[2] is pil
    assert Image.open(io.BytesIO(images[0])).size == (4, 3)


def test_normalize_then_encode(tok):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": b"x"}, {"type": "text", "text": "Hi"}]}
    ]
    plain, images = normalize_messages(messages, image_token=IMG)
    enc = encode(
        plain,
        tokenizer=tok,
        template="llava-v1",
        image_token=IMG,
        num_image_tokens=4,
        add_generation_prompt=True,
    )
    assert enc.num_images == len(images) == 1


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ("hello", "message 1: must be an object"),
        ({"content": "x"}, "message 1: missing field 'role'"),
        ({"role": "tool", "content": "x"}, "message 1: field 'role'"),
        ({"role": 3, "content": "x"}, "message 1: field 'role'"),
        ({"role": "user"}, "message 1: missing field 'content'"),
        ({"role": "user", "content": 5}, "message 1: field 'content'"),
        ({"role": "user", "content": ["x"]}, r"message 1, content\[0\]: must be an object"),
        ({"role": "user", "content": [{"type": "audio"}]}, r"message 1, content\[0\]: field 'type'"),
        ({"role": "user", "content": [{"type": "text", "text": 1}]}, r"content\[0\]: field 'text'"),
        ({"role": "user", "content": [{"type": "text"}]}, r"content\[0\]: missing field 'text'"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]},
            "message 1.*remote image URLs are not fetched here",
        ),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": "file:///tmp/a.png"}]},
            "remote image URLs are not fetched here",
        ),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,@@@"}]},
            r"message 1, content\[0\]: field 'image_url' has invalid base64",
        ),
        ({"role": "user", "content": [{"type": "image_url", "image_url": "data:,abc"}]}, "base64 data: URL"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"link": 1}}]}, "field 'image_url'"),
        ({"role": "user", "content": [{"type": "image", "image": 42}]}, r"content\[0\]: field 'image'"),
        ({"role": "assistant", "content": [{"type": "image", "image": b"x"}]}, "only allowed in user"),
    ],
)
def test_normalize_messages_errors(message, match):
    with pytest.raises(ValueError, match=match):
        normalize_messages([{"role": "user", "content": "ok"}, message], image_token=IMG)


def test_normalize_messages_requires_list():
    with pytest.raises(ValueError, match="must be a list"):
        normalize_messages({"role": "user"}, image_token=IMG)
