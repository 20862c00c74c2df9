"""Tiny, offline model parts for tests: tokenizer, vision towers and language models saved by path.

Everything is built from configs with fixed seeds and ``save_pretrained`` into a directory, so tests
exercise the real loading path (no hub).
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What colour is the circle? The circle is red. Describe the image. A blue square on the left.",
    "USER: ASSISTANT: A chat between a curious human and an artificial intelligence assistant.",
    "Which image has more circles? The first one has two circles and the second has three.",
    "yes no left right top bottom green yellow purple orange triangle star 0 1 2 3 4 5 6 7 8 9",
    "The quick brown fox jumps over the lazy dog. system user assistant",
]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(*, chat_template: bool = True):
    """A byte-level BPE tokenizer (~400 tokens) trained on a few sentences, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(directory: Path, *, chat_template: bool = True) -> Path:
    build_tokenizer(chat_template=chat_template).save_pretrained(directory)
    return directory


def vision_config(kind: str, *, image_size: int = 32, patch_size: int = 8, hidden: int = 32):
    from transformers import CLIPVisionConfig, Dinov2Config, SiglipVisionConfig

    common = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    if kind == "clip":
        return CLIPVisionConfig(projection_dim=hidden, **common)
    if kind == "siglip":
        return SiglipVisionConfig(**common)
    if kind == "dinov2":
        return Dinov2Config(mlp_ratio=2, **{k: v for k, v in common.items() if k != "intermediate_size"})
    raise ValueError(kind)


def save_vision(directory: Path, kind: str = "clip", **kwargs) -> Path:
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(vision_config(kind, **kwargs))
    model.save_pretrained(directory)
    _save_image_processor(directory, kind=kind, image_size=model.config.image_size)
    return directory


def _save_image_processor(directory: Path, *, kind: str, image_size: int) -> None:
    import json

    mean, std = ([0.5] * 3, [0.5] * 3) if kind == "siglip" else ([0.481, 0.458, 0.408], [0.269, 0.261, 0.276])
    data = {
        "image_mean": mean,
        "image_std": std,
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": kind != "siglip",
    }
    (Path(directory) / "preprocessor_config.json").write_text(json.dumps(data))


def language_config(kind: str, *, vocab_size: int = 420, hidden: int = 48):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    if kind == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(kind)


def save_language(directory: Path, kind: str = "llama", *, chat_template: bool = True, **kwargs) -> Path:
    """A tiny causal LM plus the tiny tokenizer, saved together as transformers would."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(language_config(kind, **kwargs))
    model.save_pretrained(directory)
    save_tokenizer(directory, chat_template=chat_template)
    return directory


def left_padded_embeds(lm, tokenizer, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``inputs_embeds`` [batch, seq, dim] and ``attention_mask`` [batch, seq] for text prompts."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    padded = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in ids])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    with torch.no_grad():
        return lm.get_input_embeddings()(padded), mask


def sharp_llama(*, vocab_size: int):
    """A 2-layer GQA Llama (hidden 64, sdpa) with its matrices scaled up: sharper logits, as a trained model has,
    so greedy answers wander over the vocabulary and exact ties are unlikely."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(4.0)
    return model


class NumberTokenizer:
    """Just what ``generate`` needs from a tokenizer when eos ids are given and there are no stop strings."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids: list[int], **_) -> str:
        return " ".join(map(str, ids))
