"""Shared by bench_cpu.py and bench_gpu.py: a random-weight llava-hf checkpoint, loaded once by vlmkit
(``VLM.from_pretrained``) and once by transformers (``LlavaForConditionalGeneration.from_pretrained``), and the
measurements that compare them in the same process.

Two transformers baselines. *Generate only (pixels given)*: vlmkit's processor output (its preprocessing is
bit-identical to CLIPImageProcessor) is handed to ``LlavaForConditionalGeneration.generate``, whose time excludes
preprocessing and detokenizing; vlmkit's ``ask`` time includes them (image hashing, decoding, resizing,
tokenizing, decoding the answer), so those ratios are conservative. *End to end (processor + generate)*, where a
caller passes the processor (``measure_single(..., processor=...)``): what ``ask`` does, from the same image
bytes and prompt string to the answer string - PIL decode, chat template, transformers' own ``LlavaProcessor``
(loaded from the same llava-hf directory), ``generate``, ``batch_decode``. Every timing is a median over repeats.
Greedy token ids of both sides are compared and reported.

Random weights: transformers' default init, with ``lm_head`` scaled up so the next-token distribution is peaked
(greedy answers then do not hinge on float rounding, as with a trained model); timing is unaffected.
"""

from __future__ import annotations

import io
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# llava-hf's llava-1.5 processor chat template: a turn's images first, then its text
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QUESTIONS = [
    "What is shown in this image?",
    "Describe the colours and the shapes you can see in this picture in detail.",
    "How many objects are there?",
    "Is there a red circle on the left side of the image?",
    "What is the brightest region of the picture and what is next to it?",
    "Write a short caption.",
    "Which object is the largest one and where is it?",
    "What colour is the background?",
]
LM_HEAD_SCALE = 30.0


@dataclass
class Spec:
    """What to build and how hard to measure."""

    name: str
    device: str
    dtype: str  # "float32" | "bfloat16"
    vision: dict[str, Any]  # CLIPVisionConfig kwargs
    text: dict[str, Any]  # LlamaConfig kwargs (vocab_size comes from the fields below)
    max_new_tokens: int
    batches: tuple[int, ...]
    encode_batch: int
    repeats: int
    compile: bool | dict[str, Any] = False
    short_answer_tokens: int = 8  # VQA-style answers: first-token time matters more
    image_size_px: tuple[int, int] = (640, 480)
    words: int = 32000  # tokenizer words (<unk> <s> </s> first); then <image> = words, <pad> = words + 1
    vocab_size: int = 32064  # the LM's vocabulary (>= words + 2; llava-1.5 pads 32002 to 32064)
    vision_feature_layer: int = -2  # llava-1.5's; -1 for a tower trained with the LM (vlmkit's tiny recipe)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]


# ------------------------------------------------------------------------------------------------ checkpoint


def build_tokenizer(size: int = 32000) -> Any:
    """A Llama-shaped word-level tokenizer: ``size`` ids (<unk> <s> </s> first), then <image>, then <pad>."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for q in QUESTIONS + ["USER: ASSISTANT:"] for w in q.replace("?", " ? ").split()})
    vocab = ["<unk>", "<s>", "</s>", "?", ":", ".", ","] + [w for w in words if w not in "?:.,"]
    vocab += [f"w{i}" for i in range(size - len(vocab))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    fast.add_special_tokens({"pad_token": "<pad>"})
    return fast


def build_checkpoint(directory: Path, spec: Spec) -> Path:
    """Random-weight LlavaForConditionalGeneration + LlavaProcessor saved as a llava-hf directory."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer(spec.words)
    vision = CLIPVisionConfig(**spec.vision)
    text = LlamaConfig(vocab_size=spec.vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=spec.words + 1,
                       **spec.text)  # fmt: skip
    tokens = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=spec.words, image_seq_length=tokens,
                         vision_feature_layer=spec.vision_feature_layer,
                         tie_word_embeddings=text.tie_word_embeddings)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(spec.device):  # initialise where it runs: a 7B init on CPU takes minutes
        model = LlavaForConditionalGeneration(config).to(spec.torch_dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.save_pretrained(directory)
    del model
    side = vision.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        ),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15_TEMPLATE,
    )
    processor.save_pretrained(directory)
    return directory


def load_both(directory: Path, spec: Spec) -> tuple[Any, Any]:
    """(vlmkit VLM, transformers LlavaForConditionalGeneration) from the same directory, on spec.device."""
    from transformers import LlavaForConditionalGeneration

    from vlmkit import VLM

    vlm = VLM.from_pretrained(directory, dtype=spec.dtype, device=spec.device, compile=spec.compile)
    hf = (
        LlavaForConditionalGeneration.from_pretrained(directory, dtype=spec.torch_dtype)
        .to(spec.device)
        .eval()
    )
    return vlm, hf


def make_images(count: int, *, size: tuple[int, int], seed: int) -> list[bytes]:
    """JPEG bytes of smooth random pictures (what a server receives), all different."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


# ---------------------------------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(
    fn: Callable[[], Any], *, repeats: int, device: str, before: Callable[[], None] | None = None
) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (``before`` runs untimed ahead of each)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_inputs(vlm: Any, prompts: list[str], images: list[list[bytes]]) -> dict[str, torch.Tensor]:
    """vlmkit's processor output as LlavaForConditionalGeneration.generate takes it (left padded)."""
    from vlmkit.processing.processor import Sample

    samples = [Sample(messages=vlm.processor.user_prompt(p, num_images=len(i)), images=i)
               for p, i in zip(prompts, images, strict=True)]  # fmt: skip
    batch = vlm.processor(samples, padding_side="left")
    device, dtype = vlm.model.device, vlm.model.dtype
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "pixel_values": batch["pixel_values"].to(device, dtype)}  # fmt: skip


def hf_generate(hf: Any, inputs: dict[str, torch.Tensor], *, max_new_tokens: int) -> list[list[int]]:
    """Greedy ``generate``; new ids per row, cut at the first eos / pad (vlmkit's token_ids exclude eos)."""
    pad = hf.config.text_config.pad_token_id
    with torch.inference_mode():
        out = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2,
                          pad_token_id=pad)  # fmt: skip
    rows = out[:, inputs["input_ids"].shape[1] :].tolist()
    return [row[: next((i for i, t in enumerate(row) if t in (2, pad)), len(row))] for row in rows]


def load_hf_processor(directory: Path) -> Any:
    """transformers' own processor of a llava-hf directory (``LlavaProcessor``: CLIPImageProcessor + tokenizer)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(directory)


def hf_request_inputs(hf: Any, processor: Any, prompt: str, image: bytes) -> dict[str, torch.Tensor]:
    """One request the transformers way: decode the image bytes (PIL), render llava-hf's chat template, run
    ``LlavaProcessor``, move to the model's device (pixels in its dtype)."""
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    batch = processor(images=[picture], text=[text], return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(hf.device), "attention_mask": batch["attention_mask"].to(hf.device),
            "pixel_values": batch["pixel_values"].to(hf.device, hf.dtype)}  # fmt: skip


def hf_ask(
    hf: Any, processor: Any, prompt: str, image: bytes, *, max_new_tokens: int
) -> tuple[str, list[int]]:
    """transformers end to end, the counterpart of ``vlm.ask``: image bytes + prompt string -> (answer string,
    its token ids): ``hf_request_inputs`` + greedy ``generate`` + ``batch_decode``."""
    inputs = hf_request_inputs(hf, processor, prompt, image)
    ids = hf_generate(hf, inputs, max_new_tokens=max_new_tokens)
    return processor.batch_decode(ids, skip_special_tokens=True)[0], ids[0]


def vlm_generate(
    vlm: Any, prompts: list[str], images: list[list[bytes]], *, max_new_tokens: int
) -> list[list[int]]:
    from vlmkit.processing.processor import Sample

    samples = [Sample(messages=vlm.processor.user_prompt(p, num_images=len(i)), images=i)
               for p, i in zip(prompts, images, strict=True)]  # fmt: skip
    return vlm.generate(samples, max_new_tokens=max_new_tokens).token_ids


# ------------------------------------------------------------------------------------------------ measurements


def alternating(
    runs: dict[str, tuple[Callable[[], Any], Callable[[], None] | None]], *, repeats: int, device: str
) -> dict[str, float]:
    """Median seconds per named run; the runs take turns inside each repeat (same background load for all)."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (fn, before) in runs.items():
            samples[name].append(timed(fn, repeats=1, device=device, before=before))
    return {name: statistics.median(times) for name, times in samples.items()}


def measure_single(
    vlm: Any, hf: Any, spec: Spec, images: list[bytes], *, processor: Any = None
) -> dict[str, Any]:
    """Batch-1 ``ask``: time to first token and whole answers, cold (caches emptied first) and for a repeated
    image (seen once before; every timed request asks a new question about it). transformers: ``generate`` on
    ready-made tensors, and, given its ``processor``, also end to end (``hf_ask``: same bytes and prompt string
    to the answer string)."""
    n, image, question = spec.max_new_tokens, images[0], QUESTIONS[0]
    inputs = hf_inputs(vlm, [question], [[image]])
    reference = vlm_generate(vlm, [question], [[image]], max_new_tokens=n)
    same = reference == hf_generate(hf, inputs, max_new_tokens=n)
    end_to_end: dict[str, Any] = {}
    if processor is not None:  # also the end-to-end path's warm-up
        theirs = hf_request_inputs(hf, processor, question, image)
        text, ids = hf_ask(hf, processor, question, image, max_new_tokens=n)
        vlm.clear_caches()
        end_to_end = {
            "transformers_image_processor": type(processor.image_processor).__name__,
            "same_tokens_end_to_end": [ids] == reference,
            "same_text_end_to_end": text == vlm.ask(question, images=[image], max_new_tokens=n),
            "end_to_end_inputs": {
                "same_input_ids": torch.equal(theirs["input_ids"].cpu(), inputs["input_ids"].cpu()),
                "pixel_values_max_abs_diff": float((theirs["pixel_values"].float()
                                                    - inputs["pixel_values"].float()).abs().max()),
            },
        }  # fmt: skip
    follow_ups = iter(f"{q} ({i})" for i in range(10**6) for q in QUESTIONS[1:])

    def seen_before() -> None:
        vlm.clear_caches()
        vlm.ask(question, images=[image], max_new_tokens=1)

    out: dict[str, Any] = {}
    for label, tokens in (("ttft_s", 1), ("short_answer_s", spec.short_answer_tokens), ("answer_s", n)):
        runs = {
            "vlmkit_cold": (lambda t=tokens: vlm.ask(question, images=[image], max_new_tokens=t), vlm.clear_caches),
            "vlmkit_repeated_image": (lambda t=tokens: vlm.ask(next(follow_ups), images=[image], max_new_tokens=t),
                                      seen_before),
            "transformers": (lambda t=tokens: hf_generate(hf, inputs, max_new_tokens=t), None),
        }  # fmt: skip
        if processor is not None:
            runs["transformers_end_to_end"] = (
                lambda t=tokens: hf_ask(hf, processor, question, image, max_new_tokens=t),
                None,
            )
        out[label] = alternating(runs, repeats=spec.repeats, device=spec.device)
    seen_before()
    follow = next(follow_ups)
    reused = vlm_generate(vlm, [follow], [[image]], max_new_tokens=n)
    fresh = hf_generate(hf, hf_inputs(vlm, [follow], [[image]]), max_new_tokens=n)
    out |= {"same_tokens_as_transformers": same, "same_tokens_with_prefix_reuse": reused == fresh,
            "tokens_generated": len(reused[0]), "prefix_cache": vlm.prefix_cache.stats(),
            "feature_cache": vlm.feature_cache.stats()}  # fmt: skip
    return out | end_to_end


def decode_seconds(runs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]], *, repeats: int, device: str,
                   before: Callable[[], None]) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per system: median time of a 1-token and an n-token run, and the median of their paired difference (the
    decode time). Systems alternate inside each repeat so that both see the same background load."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (first, whole) in runs.items():
            t1 = timed(first, repeats=1, device=device, before=before)
            tn = timed(whole, repeats=1, device=device, before=before)
            samples[name].append((t1, tn))
    return {name: {"first_s": statistics.median(t for t, _ in pairs), "total_s": statistics.median(t for _, t in pairs),
                   "decode_s": statistics.median(tn - t1 for t1, tn in pairs)}
            for name, pairs in samples.items()}  # fmt: skip


def measure_batch(vlm: Any, hf: Any, spec: Spec, images: list[bytes], *, batch: int) -> dict[str, Any]:
    """Decode tokens/s at one batch size: batch * (steps after the first) / (time(n tokens) - time(1 token))."""
    n = spec.max_new_tokens
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]  # different lengths: real left padding
    imgs = [[images[i % len(images)]] for i in range(batch)]
    inputs = hf_inputs(vlm, prompts, imgs)
    ours = vlm_generate(vlm, prompts, imgs, max_new_tokens=n)  # also the warm-up (and compile, if on)
    theirs = hf_generate(hf, inputs, max_new_tokens=n)
    steps = max(map(len, ours)) - 1
    times = decode_seconds(
        {
            "vlmkit": (lambda: vlm_generate(vlm, prompts, imgs, max_new_tokens=1),
                       lambda: vlm_generate(vlm, prompts, imgs, max_new_tokens=n)),
            "transformers": (lambda: hf_generate(hf, inputs, max_new_tokens=1),
                             lambda: hf_generate(hf, inputs, max_new_tokens=n)),
        },
        repeats=spec.repeats, device=spec.device, before=vlm.clear_caches,
    )  # fmt: skip
    rates = {name: batch * steps / max(t["decode_s"], 1e-9) for name, t in times.items()}
    return {
        "vlmkit_tok_s": rates["vlmkit"],
        "transformers_tok_s": rates["transformers"],
        "ratio": rates["vlmkit"] / rates["transformers"],
        "seconds": times,
        "decode_steps": steps,
        "same_tokens_as_transformers": ours == theirs,
    }


def measure_encode(vlm: Any, hf: Any, spec: Spec, images: list[bytes]) -> dict[str, Any]:
    """Image-encode throughput at spec.encode_batch (vision + projector, preprocessed pixels in), and what a
    feature-cache hit costs next to encoding one image."""
    r, dev, b = spec.repeats, spec.device, spec.encode_batch
    pixels = vlm.processor.image_processor([images[i % len(images)] for i in range(b)])
    pixels = pixels.to(dev, vlm.model.dtype)
    with (
        torch.inference_mode()
    ):  # preparer.encode: the path requests take (oneDNN's GEMM on a CPU, encode_mode)
        vlm.preparer.encode(pixels), hf.get_image_features(pixel_values=pixels)  # warm-up
        ours = timed(lambda: vlm.preparer.encode(pixels), repeats=r, device=dev)
        theirs = timed(lambda: hf.get_image_features(pixel_values=pixels), repeats=r, device=dev)
        one = pixels[:1]
        forward = timed(lambda: vlm.preparer.encode(one), repeats=r, device=dev)
    image = images[0]
    vlm.clear_caches()
    whole = timed(lambda: _features(vlm, image, cache=False), repeats=r, device=dev)
    _features(vlm, image, cache=True)  # now cached
    hit = timed(lambda: _features(vlm, image, cache=True), repeats=max(r, 20), device=dev)
    return {
        "batch": b,
        "vlmkit_img_s": b / ours,
        "transformers_img_s": b / theirs,
        "ratio": theirs / ours,
        "one_image_encode_ms": whole * 1e3,  # decode + preprocess + vision + projector
        "one_image_forward_ms": forward * 1e3,  # vision + projector only
        "cache_hit_ms": hit * 1e3,  # hash the bytes + key + LRU lookup
        "hit_over_encode": hit / whole,
        "hit_over_forward": hit / forward,
    }


def _features(vlm: Any, image: bytes, *, cache: bool) -> torch.Tensor:
    """What a request does for one image: hash + key (+ lookup), else decode + preprocess + encode."""
    with torch.inference_mode():
        refs, keys = vlm.preparer.image_keys([image], hashed=True)
        return vlm.preparer.image_features(refs, keys=keys, cache=cache)


def environment(spec: Spec) -> dict[str, Any]:
    import transformers

    import vlmkit

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vlmkit": getattr(vlmkit, "__version__", "?"),
        "git": _git_rev(),
        "device": spec.device,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
    }
    if spec.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "?"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def model_summary(vlm: Any, hf: Any, spec: Spec) -> dict[str, Any]:
    counts = vlm.info()["parameters"]
    lm_bytes = sum(p.numel() * p.element_size() for p in vlm.model.language_model.parameters())
    return {"spec": asdict(spec), "parameters": counts, "lm_bytes": lm_bytes, "image_tokens": vlm.model.num_image_tokens,
            "lm_attention": vlm.model.language_model.config._attn_implementation,
            "transformers_attention": hf.config.text_config._attn_implementation}  # fmt: skip


def emit(result: dict[str, Any], *, out: Path | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)


def target(value: float, *, at_most: float | None = None, at_least: float | None = None) -> dict[str, Any]:
    limit = at_most if at_most is not None else at_least
    met = value <= at_most if at_most is not None else value >= (at_least or 0)
    return {
        "value": value,
        "target": ("<= " if at_most is not None else ">= ") + f"{limit:g}",
        "met": bool(met),
    }
