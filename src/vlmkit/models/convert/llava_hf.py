"""llava-hf checkpoints (``LlavaForConditionalGeneration`` directories) -> vlmkit models.

transformers loads the checkpoint itself (it knows every key layout it has written over the years); its vision
tower, projector weights and language model + ``lm_head`` then move into a ``VisionLanguageModel``. Nothing is
re-implemented, so the result computes exactly what ``LlavaForConditionalGeneration`` computes.

The checkpoint's own preprocessing (``preprocessor_config.json`` or the ``image_processor`` section of
``processor_config.json``), chat template, feature layer / selection and image token are carried over.
"""

from __future__ import annotations

import copy
import json
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import LanguageConfig, ProjectorConfig, PromptConfig, VisionConfig, VLMConfig
from vlmkit.models.io import ModelDirError, check_no_pickle_only, config_errors
from vlmkit.models.language.protocols import LanguageModel
from vlmkit.models.parts import add_image_token, hf_config_dict, load_tokenizer, read_json
from vlmkit.models.vision import VisionEncoder
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.tokenizer_protocol import Tokenizer

# llava-hf's "default" drops exactly one leading token (CLS); "full" keeps them all
STRATEGY_TO_SELECT = {"default": "patch", "full": "full"}
BICUBIC = 3
# marks a checkpoint template wrapped by ``plain_text_chat_template`` (so it is never wrapped twice)
PARTS_MARKER = "{# vlmkit: plain-string content -> content parts #}"


def unsupported_reasons(raw: dict[str, Any]) -> list[str]:
    """What in a llava-hf config.json vlmkit cannot represent (empty when it can load it exactly)."""
    reasons = []
    layer = raw.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        reasons.append(f"vision_feature_layer={layer} (features concatenated from several layers)")
    act = raw.get("projector_hidden_act", "gelu")
    if act != "gelu":
        reasons.append(f"projector_hidden_act={act!r} (vlmkit's MLP projector uses exact GELU)")
    if raw.get("multimodal_projector_bias", True) is False:
        reasons.append("multimodal_projector_bias=false (vlmkit's projector layers have biases)")
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in STRATEGY_TO_SELECT:
        reasons.append(f"vision_feature_select_strategy={strategy!r}")
    return reasons


def load_llava_hf(directory: Path, *, raw: dict[str, Any], dtype: torch.dtype | None) -> tuple[Any, Any]:
    """A llava-hf directory -> (VisionLanguageModel, tokenizer), computing what transformers computes."""
    reasons = unsupported_reasons(raw)
    if reasons:
        raise ModelDirError(f"{directory}: this llava-hf checkpoint is not supported: {'; '.join(reasons)}")
    llava = _load_transformers_llava(directory, dtype=dtype)
    processor = processor_settings(directory)
    tower = llava.model.vision_tower
    vision_cfg = VisionConfig(
        hf_config=hf_config_dict(tower.config),
        feature_layer=llava.config.vision_feature_layer,
        select=STRATEGY_TO_SELECT[llava.config.vision_feature_select_strategy],
        source=str(directory),
        **image_settings(processor.get("image_processor", {}), directory=directory),
    )
    vision = llava_vision(tower, config=vision_cfg, directory=directory)
    model, tokenizer = llava_model(llava, vision=vision, processor=processor, directory=directory)
    return model.to(model.language_model.dtype), tokenizer


def llava_vision(tower: Any, *, config: VisionConfig, directory: Path) -> VisionEncoder:
    """A llava-hf tower as vlmkit's encoder; refused where the 'default' strategy would drop a patch."""
    vision = VisionEncoder(config=config, model=tower)
    if config.select == "patch" and vision.num_prefix != 1:
        raise ModelDirError(
            f"{directory}: vision_feature_select_strategy 'default' drops one leading token, but this "
            f"{vision.model_type} tower has {vision.num_prefix} non-patch tokens, so it would drop a patch"
        )
    return vision


def llava_model(
    hf: Any, *, vision: VisionEncoder, processor: dict[str, Any], directory: Path
) -> tuple[VisionLanguageModel, Tokenizer]:
    """A transformers Llava-family model's LM, tokenizer, prompt and mlp2x projector joined to ``vision``
    (shared by the llava, llava_next and llava_onevision importers)."""
    tokenizer, prompt = checkpoint_prompt(
        directory,
        image_token=processor.get("image_token", "<image>"),
        image_token_id=hf.config.image_token_id,
    )
    language_model = causal_lm_from_llava(hf, source=directory)
    config = VLMConfig(
        vision=vision.config,
        projector=ProjectorConfig(type="mlp", depth=2),
        language=LanguageConfig(hf_config=hf_config_dict(language_model.config), source=str(directory)),
        prompt=prompt,
    )
    model = VisionLanguageModel(config=config, vision=vision, language_model=language_model)
    model.projector.load_state_dict(hf.model.multi_modal_projector.state_dict())  # linear_1/linear_2 both
    return model, tokenizer


def _load_transformers_llava(directory: Path, *, dtype: torch.dtype | None, class_name: str = "") -> Any:
    """The checkpoint as transformers' ``class_name`` (default ``LlavaForConditionalGeneration``), all weights present."""
    import transformers

    check_no_pickle_only(directory)
    model_class = getattr(transformers, class_name or "LlavaForConditionalGeneration")
    with config_errors(directory / "config.json"):
        llava, info = model_class.from_pretrained(
            directory,
            dtype=dtype if dtype is not None else "auto",
            use_safetensors=True,
            local_files_only=True,
            output_loading_info=True,
            trust_remote_code=False,
        )
    # transformers only warns about these; a silently re-initialised tensor would be a wrong model
    missing = sorted(set(info.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k
                                                           for k in info.get("mismatched_keys", ())})  # fmt: skip
    if missing:
        raise ModelDirError(
            f"{directory}: {len(missing)} weights missing or mis-shaped (first: {missing[0]})"
        )
    return llava.eval()


def causal_lm_from_llava(llava: Any, *, source: Path) -> LanguageModel:
    """llava's language model + ``lm_head`` as one ``*ForCausalLM`` sharing the same tensors (no copy)."""
    from transformers import AutoModelForCausalLM

    base, head = llava.model.language_model, llava.lm_head
    text_config = copy.deepcopy(base.config)
    # tied in llava <=> tied here, so a vlmkit save/load round trip keeps (or keeps not) the tie
    text_config.tie_word_embeddings = head.weight is base.get_input_embeddings().weight
    with torch.device("meta"):  # only the shell: both of its parts are replaced by llava's below
        lm = AutoModelForCausalLM.from_config(text_config, trust_remote_code=False)
    prefix = lm.base_model_prefix
    if type(getattr(lm, prefix, None)) is not type(base):
        raise ModelDirError(
            f"{source}: {type(lm).__name__} does not wrap llava's {type(base).__name__}; cannot rebuild the LM"
        )
    assert base is not None  # llava's language model (the type check above widens it to Optional for mypy)
    base.config = text_config
    setattr(lm, prefix, base)
    lm.set_output_embeddings(head)
    lm.generation_config = copy.deepcopy(llava.generation_config)
    leftover = [name for name, t in chain(lm.named_parameters(), lm.named_buffers()) if t.is_meta]
    if leftover:
        raise ModelDirError(
            f"{source}: {type(lm).__name__} has parts llava lacks ({', '.join(leftover[:3])})"
        )
    return lm.eval()


# ------------------------------------------------------------------------------------------- preprocessing


def processor_settings(directory: Path) -> dict[str, Any]:
    """processor_config.json with its ``image_processor`` section filled from preprocessor_config.json.

    transformers 5 nests the image processor in processor_config.json; older versions (and the hub's llava-1.5
    repos) keep it in preprocessor_config.json. Either works.
    """
    settings: dict[str, Any] = {}
    if (directory / "processor_config.json").exists():
        settings = read_json(directory / "processor_config.json")
    if "image_processor" not in settings and (directory / "preprocessor_config.json").exists():
        settings["image_processor"] = read_json(directory / "preprocessor_config.json")
    if "image_processor" not in settings:
        raise ModelDirError(f"{directory}: no preprocessor_config.json (image processor settings) found")
    return settings


def image_settings(pre: dict[str, Any], *, directory: Path) -> dict[str, Any]:
    """A CLIP / SigLIP / Llava image processor's settings -> VisionConfig fields, or a clear refusal.

    vlmkit's modes are bit-identical to those processors: ``crop`` = shortest edge + centre crop to the same
    size, ``resize`` = squash to a square, ``pad`` = LlavaImageProcessor's ``do_pad`` letterbox then crop.
    """
    problems = unsupported_preprocessing(pre)
    if problems:
        raise ModelDirError(f"{directory}: image preprocessing not supported: {'; '.join(problems)}")
    size, crop = pre.get("size") or {}, pre.get("crop_size") or {}
    if pre.get("do_center_crop"):
        side = int(crop.get("height", 0))
        if side != crop.get("width") or size.get("shortest_edge") != side:
            raise ModelDirError(
                f"{directory}: image preprocessing not supported: resize to {size} then crop to {crop} "
                "(vlmkit crops at the resize size)"
            )
        mode = "pad" if pre.get("do_pad") else "crop"
    else:
        side = int(size.get("height", 0))
        if pre.get("do_pad") or not side or side != size.get("width"):
            raise ModelDirError(f"{directory}: image preprocessing not supported: size={size} without a crop")
        mode = "resize"
    return {"image_size": side, "resize_mode": mode, "image_mean": tuple(pre["image_mean"]),
            "image_std": tuple(pre["image_std"])}  # fmt: skip


def unsupported_preprocessing(
    pre: dict[str, Any],
    *,
    kinds: tuple[str, ...] = ("CLIPImageProcessor", "SiglipImageProcessor", "LlavaImageProcessor"),
) -> list[str]:
    """What an image processor config asks that vlmkit's preprocessing does not reproduce (empty: nothing).
    ``kinds``: the processor classes accepted (the first is assumed when the config names none)."""
    problems = [f"{key}={pre.get(key)!r}" for key in ("do_resize", "do_rescale", "do_normalize")
                if pre.get(key, True) is not True]  # fmt: skip
    if abs(float(pre.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        problems.append(f"rescale_factor={pre['rescale_factor']}")
    if int(pre.get("resample", BICUBIC)) != BICUBIC:
        problems.append(f"resample={pre['resample']} (vlmkit resizes bicubic)")
    found = str(pre.get("image_processor_type", kinds[0]))
    if not found.startswith(kinds):
        problems.append(f"image_processor_type={found!r} (expected {' or '.join(kinds)})")
    if "image_mean" not in pre or "image_std" not in pre:
        problems.append("no image_mean / image_std")
    return problems


# ----------------------------------------------------------------------------------------- tokenizer, prompt


def checkpoint_prompt(directory: Path, *, image_token: str, image_token_id: int) -> tuple[Any, PromptConfig]:
    """The checkpoint's tokenizer with its chat template usable on vlmkit's plain-string messages."""
    tokenizer = load_tokenizer(directory)
    found = tokenizer.convert_tokens_to_ids(image_token)
    if found != image_token_id:
        raise ModelDirError(
            f"{directory}: the tokenizer maps {image_token!r} to {found}, but config.json says image_token_id="
            f"{image_token_id}"
        )

    prompt = PromptConfig(template="auto", image_token=image_token, image_token_id=image_token_id)
    add_image_token(tokenizer, prompt)  # already there; this only gives a pad token where there is none
    template = processor_chat_template(directory) or getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        tokenizer.chat_template = plain_text_chat_template(
            template, tokenizer=tokenizer, image_token=image_token
        )
        prompt.template = "tokenizer"
    return tokenizer, prompt


def processor_chat_template(directory: Path) -> str | None:
    """The processor-level chat template, in any of the files transformers has used for it."""
    if (directory / "chat_template.jinja").exists():
        return (directory / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json"):
        if (directory / name).exists():
            template = read_json(directory / name).get("chat_template")
            if isinstance(template, str) and template:
                return template
    return None


def plain_text_chat_template(template: str, *, tokenizer: Tokenizer, image_token: str) -> str:
    """A template that renders vlmkit's messages (string content with ``<image>`` inline).

    llava-hf templates read content *parts* (``{"type": "image"}``, ``{"type": "text", ...}``), as the
    processor passes them; given a string they silently drop the text. Such a template is wrapped so string
    content is first split into parts again: the exact inverse of how vlmkit joins parts (an image is
    followed by "\\n" when text comes next). Content that already is a list passes through unchanged, so the
    wrapped template still works as a llava-hf processor template.
    """
    if template.startswith(PARTS_MARKER) or renders_plain(
        template, tokenizer=tokenizer, image_token=image_token
    ):
        return template
    wrapped = PARTS_MARKER + _string_to_parts_prelude(image_token) + template
    if not renders_plain(wrapped, tokenizer=tokenizer, image_token=image_token):
        raise ModelDirError(
            "the checkpoint's chat template renders neither plain-text messages nor content parts"
        )
    return wrapped


def renders_plain(template: str, *, tokenizer: Tokenizer, image_token: str) -> bool:
    """Whether ``template`` keeps both the image token and the text of a plain-string user message."""
    probe = "vlmkit probe text"
    messages = [{"role": "user", "content": f"{image_token}\n{probe}"}]
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception:  # any rendering failure (undefined fields, type errors) means "not for plain strings"
        return False
    return isinstance(text, str) and probe in text and image_token in text


def _string_to_parts_prelude(image_token: str) -> str:
    """Jinja that rebinds ``messages`` with string content split into image / text parts (outputs nothing)."""
    token = jinja_literal(image_token)
    return (
        "{%- set vlmkit_conv = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set vlmkit_parts = namespace(items=[]) -%}"
        "{%- for chunk in message['content'].split(" + token + ") -%}"
        "{%- if not loop.first -%}{%- set vlmkit_parts.items = vlmkit_parts.items + [{'type': 'image'}] -%}"
        "{%- endif -%}"
        "{%- set text = chunk[1:] if (not loop.first and chunk.startswith('\\n')) else chunk -%}"
        "{%- if text -%}{%- set vlmkit_parts.items = vlmkit_parts.items + [{'type': 'text', 'text': text}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set vlmkit_conv.messages = vlmkit_conv.messages + "
        "[{'role': message['role'], 'content': vlmkit_parts.items}] -%}"
        "{%- else -%}{%- set vlmkit_conv.messages = vlmkit_conv.messages + [message] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = vlmkit_conv.messages %}"  # no "-": the wrapped template's own whitespace stays
    )


def jinja_literal(value: str | None) -> str:
    """A Python string as a Jinja expression (JSON escapes are valid Jinja string escapes)."""
    return "none" if value is None else json.dumps(value)
