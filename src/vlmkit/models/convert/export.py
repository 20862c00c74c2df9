"""Export a vlmkit model as a llava-hf directory (``LlavaForConditionalGeneration`` + ``LlavaProcessor``).

The weights are not renamed by hand: a ``LlavaForConditionalGeneration`` is assembled from our own modules
(vision tower, projector layers, LM base + ``lm_head``) and saved with ``save_pretrained``, so the file uses
whatever key layout the installed transformers reads and writes. Compositions llava-hf cannot express are
refused up front with every reason listed.

Preprocessing maps onto transformers' processors, bit-identically: ``crop`` -> ``CLIPImageProcessor``
(shortest edge + centre crop), ``resize`` -> ``SiglipImageProcessor`` (squash), ``pad`` ->
``LlavaImageProcessor(do_pad=True)`` (LLaVA's expand2square with the mean colour, then crop).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vlmkit.config import PromptConfig, VisionConfig
from vlmkit.models.convert.llava_hf import BICUBIC, jinja_literal
from vlmkit.models.io import ModelDirError
from vlmkit.models.language.protocols import LanguageModel
from vlmkit.processing.prompting import BUILTIN_TEMPLATES, TOKENIZER_TEMPLATE, ChatTemplate, resolve_template
from vlmkit.processing.tokenizer_protocol import Tokenizer

FORMATS = ("hf-llava", "hf-llava-next", "hf-llava-onevision")  # the last two: export_anyres.py
_TOWERS = ("clip_vision_model", "siglip_vision_model")
# config fields with which a *ForCausalLM rescales its logits; llava-hf applies a bare lm_head
_LOGIT_SCALES = ("final_logit_softcapping", "logit_scale", "logits_scaling")
PROBE = "vlmkit probe text"


def export_hf_llava(vlm: Any, *, out: str | Path) -> Path:
    """Write ``vlm`` (anything with ``.model`` and ``.tokenizer``, e.g. a ``VLM``) as a llava-hf directory.

    ``out`` must not exist or be empty; the directory is written aside and moved into place when complete.
    Raises ValueError listing every reason when the composition has no llava-hf equivalent.
    """
    model, tokenizer = vlm.model, vlm.tokenizer
    reasons = unrepresentable_reasons(model)
    if reasons:
        raise ValueError("cannot export to hf-llava: " + "; ".join(reasons))

    def write(staging: Path) -> None:
        assemble_llava(model, tokenizer=tokenizer).save_pretrained(staging)
        processor = llava_processor(model, tokenizer=tokenizer)
        processor.save_pretrained(staging)
        # transformers 5 nests this in processor_config.json; the separate file is what every version reads
        processor.image_processor.save_pretrained(staging)

    return write_export(out, write=write)


def write_export(out: str | Path, *, write: Callable[[Path], None]) -> Path:
    """Run ``write(staging)`` in a new directory beside ``out``, then move it into place: an export never
    overwrites anything and never leaves half a directory behind."""
    target = check_export_target(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        if target.exists():
            target.rmdir()  # empty, checked above
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def check_export_target(out: str | Path) -> Path:
    """The export directory: absent or empty (an export never overwrites anything)."""
    target = Path(out).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ModelDirError(f"refusing to export into {target}: it exists and is not an empty directory")
    return target


# ----------------------------------------------------------------------------------------------- checks


def unrepresentable_reasons(model: Any) -> list[str]:
    """Every way ``model`` (a VisionLanguageModel) differs from what llava-hf can express; empty if none."""
    config = model.config
    reasons = []
    if config.projector.type != "mlp":
        reasons.append(
            f"projector {config.projector.type!r} (llava-hf has only a 2-layer GELU MLP projector)"
        )
    elif config.projector.depth != 2:
        reasons.append(f"mlp projector depth {config.projector.depth} (llava-hf's MLP has exactly 2 layers)")
    vision = model.vision
    if vision.model_type not in _TOWERS:
        reasons.append(f"vision tower {vision.model_type!r} (export supports CLIP and SigLIP towers)")
    elif config.vision.image_size != vision.native_size:
        reasons.append(
            f"image size {config.vision.image_size} differs from the tower's {vision.native_size} "
            "(llava-hf does not interpolate position embeddings)"
        )
    if config.vision.tiling is not None:
        reasons.append("AnyRes tiling (export as hf-llava-next or hf-llava-onevision)")
    if config.vision.conv_stem:
        reasons.append(
            "a convolutional stem on the vision tower (llava-hf towers embed patches with one convolution)"
        )
    if config.prompt.image_token_id is None:
        reasons.append("no image token in the tokenizer")
    if config.quantization is not None:  # llava-hf's layout has no place for vlmkit's codes and scales
        reasons.append(
            f"a quantized language model ({config.quantization.scheme}; export the unquantized one)"
        )
    wrapped = [name for name, part in (("language model", model.language_model), ("vision tower", vision.model))
               if hasattr(part, "peft_config")]  # fmt: skip
    if wrapped:  # their weight names are peft's; merging (vlmkit.training.lora.merge_lora) rewrites the model
        return [*reasons, f"unmerged LoRA adapters on the {' and '.join(wrapped)} (merge them first)"]
    return reasons + _language_reasons(model.language_model)


def _language_reasons(lm: LanguageModel) -> list[str]:
    """llava-hf computes ``lm_head(AutoModel(text_config)(...))``; the LM must be exactly that."""
    from transformers import AutoModel

    name = type(lm).__name__
    base, head = getattr(lm, lm.base_model_prefix, None), lm.get_output_embeddings()
    if base is None or not isinstance(head, nn.Linear):
        return [f"language model {name} (no base model + linear output head)"]
    reasons = [f"language model {name}: {field}={getattr(lm.config, field)} (llava-hf does not rescale logits)"
               for field in _LOGIT_SCALES if getattr(lm.config, field, None) not in (None, 1, 1.0)]  # fmt: skip
    if head.bias is not None:
        reasons.append(f"language model {name}: output head has a bias (llava-hf's lm_head has none)")
    with torch.device("meta"):
        expected = type(AutoModel.from_config(lm.config, trust_remote_code=False))
    if type(base) is not expected:
        reasons.append(
            f"language model {name}: its base is {type(base).__name__}, llava-hf builds {expected.__name__}"
        )
    owned = {id(p) for p in chain(base.parameters(), head.parameters())}
    extra = [n for n, p in lm.named_parameters() if id(p) not in owned]
    if extra:
        reasons.append(f"language model {name}: weights outside its base and head ({', '.join(extra[:3])})")
    return reasons


# ------------------------------------------------------------------------------------------------ model


def assemble_llava(model: Any, *, tokenizer: Tokenizer) -> Any:
    """A ``LlavaForConditionalGeneration`` whose modules are ``model``'s own (shared, not copied)."""
    from transformers import LlavaForConditionalGeneration

    lm = _lm_with_image_token(model, tokenizer=tokenizer)
    config = llava_config(model, lm=lm)
    with torch.device("meta"):  # only the shell: every module with weights is replaced below
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower = model.vision.model
    llava.model.multi_modal_projector.linear_1 = model.projector.linear_1
    llava.model.multi_modal_projector.linear_2 = model.projector.linear_2
    llava.model.language_model = getattr(lm, lm.base_model_prefix)
    llava.lm_head = lm.get_output_embeddings()
    if lm.generation_config is not None:  # a causal LM always has one
        llava.generation_config = copy.deepcopy(lm.generation_config)
    leftover = [n for n, t in chain(llava.named_parameters(), llava.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"llava-hf export left tensors unset: {', '.join(leftover[:3])}")
    return llava


def llava_config(model: Any, *, lm: LanguageModel) -> Any:
    from transformers import LlavaConfig

    head = lm.get_output_embeddings()  # a linear head (export_reasons checked)
    tied = head is not None and head.weight is lm.get_input_embeddings().weight
    text_config = lm.config.to_dict() | {"tie_word_embeddings": tied}
    return LlavaConfig(
        vision_config=model.vision.model.config.to_dict(),
        text_config=text_config,
        image_token_index=model.config.prompt.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=model.config.vision.feature_layer,
        vision_feature_select_strategy=feature_select_strategy(model),
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )


def feature_select_strategy(model: Any) -> Literal["default", "full"]:
    """llava-hf's "default" drops exactly one leading token; a tower without a CLS token keeps all ("full")."""
    return "default" if model.config.vision.select == "patch" and model.vision.num_prefix == 1 else "full"


def _lm_with_image_token(model: Any, *, tokenizer: Tokenizer) -> LanguageModel:
    """The LM, grown (as a copy) when the image token id lies past its vocabulary.

    llava-hf looks up ``input_ids`` in the embedding before replacing the image positions, so the id must be
    a row. New rows are the mean of the old ones: their logit is the mean logit, never the greedy choice.
    """
    lm = model.language_model
    image_id = model.config.prompt.image_token_id
    vocab = lm.get_input_embeddings().weight.shape[0]
    if image_id < vocab:
        return lm
    lm = copy.deepcopy(lm)
    lm.resize_token_embeddings(max(len(tokenizer), image_id + 1), mean_resizing=False)
    with torch.no_grad():
        for matrix in {lm.get_input_embeddings().weight, lm.get_output_embeddings().weight}:
            matrix[vocab:] = matrix[:vocab].mean(0)
    return lm


# -------------------------------------------------------------------------------------------- processor


def llava_processor(model: Any, *, tokenizer: Tokenizer) -> Any:
    """A ``LlavaProcessor`` that expands and preprocesses exactly as vlmkit does for ``model``."""
    from transformers import LlavaProcessor

    prompt = model.config.prompt
    template = llava_chat_template(prompt=prompt, tokenizer=tokenizer)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template  # AutoTokenizer users get the same conversation format
    return LlavaProcessor(
        image_processor=image_processor_for(model.config.vision),
        tokenizer=tokenizer,
        patch_size=model.vision.patch_size,
        vision_feature_select_strategy=feature_select_strategy(model),
        chat_template=template,
        image_token=prompt.image_token,
        num_additional_image_tokens=model.vision.num_prefix,
    )


def image_processor_for(vision: VisionConfig) -> Any:
    """transformers' image processor for vlmkit's resize mode (the PIL backend where both exist)."""
    import transformers

    side = vision.image_size
    settings: dict[str, Any] = {
        "image_mean": list(vision.image_mean), "image_std": list(vision.image_std), "resample": BICUBIC,
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True,
    }  # fmt: skip
    if vision.resize_mode == "resize":
        name = "SiglipImageProcessor"
        settings["size"] = {"height": side, "width": side}
    else:
        name = "LlavaImageProcessor" if vision.resize_mode == "pad" else "CLIPImageProcessor"
        settings |= {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side},
                     "do_center_crop": True}  # fmt: skip
        if vision.resize_mode == "pad":
            settings["do_pad"] = True
    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    return cls(**settings)


# -------------------------------------------------------------------------------------------- templates


def llava_chat_template(*, prompt: PromptConfig, tokenizer: Tokenizer) -> str:
    """vlmkit's conversation format as a template that llava-hf's processor (content parts) and a tokenizer
    (plain strings) both render exactly as vlmkit does."""
    name = resolve_template(prompt.template, tokenizer)
    if name == TOKENIZER_TEMPLATE:
        template = tokenizer.chat_template
        if not isinstance(template, str):
            raise ValueError("cannot export a tokenizer with several named chat templates; pick one first")
        if prompt.system is None and renders_parts(
            template, tokenizer=tokenizer, image_token=prompt.image_token
        ):
            return template
    else:
        eos = getattr(tokenizer, "eos_token", None) or "</s>"
        template = builtin_template_jinja(BUILTIN_TEMPLATES[name], eos=eos, system=prompt.system)
    system = prompt.system if name == TOKENIZER_TEMPLATE else None  # built-ins have it inlined already
    return _parts_to_plain_prelude(prompt.image_token, system=system) + template


def renders_parts(template: str, *, tokenizer: Tokenizer, image_token: str) -> bool:
    """Whether ``template`` renders content parts as vlmkit would render the same message as a string."""
    parts = [{"type": "image"}, {"type": "text", "text": PROBE}]
    try:
        as_parts = tokenizer.apply_chat_template([{"role": "user", "content": parts}], chat_template=template,
                                                 tokenize=False, add_generation_prompt=True)  # fmt: skip
        as_text = tokenizer.apply_chat_template([{"role": "user", "content": f"{image_token}\n{PROBE}"}],
                                                chat_template=template, tokenize=False, add_generation_prompt=True)  # fmt: skip
    except Exception:  # any rendering failure means "not for content parts"
        return False
    return as_parts == as_text


def builtin_template_jinja(tpl: ChatTemplate, *, eos: str, system: str | None) -> str:
    """A built-in template as Jinja over plain-string messages, rendering exactly what vlmkit renders."""
    cut = "\x00"  # splits each format string around its field, honouring str.format escapes

    def around(fmt: str, **field: str) -> tuple[str, str]:
        before, _, after = fmt.format(**{k: cut for k in field}).partition(cut)
        return jinja_literal(before), jinja_literal(after)

    default = system if system is not None else tpl.default_system
    user = around(tpl.user_format, content="")
    reply_end = jinja_literal(tpl.assistant_end.format(eos=eos) + tpl.turn_sep)
    parts = [
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set vlmkit_system = messages[0]['content'] -%}"
        "{%- set vlmkit_turns = messages[1:] -%}{%- else -%}"
        f"{{%- set vlmkit_system = {jinja_literal(default)} -%}}{{%- set vlmkit_turns = messages -%}}{{%- endif -%}}",
    ]
    if tpl.system_format:
        before, after = around(tpl.system_format, system="")
        parts.append(f"{{%- if vlmkit_system -%}}{{{{ {before} + vlmkit_system + {after} }}}}{{%- endif -%}}")
    parts += [
        "{%- for message in vlmkit_turns -%}{%- if message['role'] == 'system' -%}"
        "{{ raise_exception('a system message is only allowed as the first message') }}"
        f"{{%- elif message['role'] == 'user' -%}}{{{{ {user[0]} + message['content'] + {user[1]} }}}}"
        f"{{%- else -%}}{{{{ {jinja_literal(tpl.assistant_prefix)} + message['content'] + {reply_end} }}}}"
        "{%- endif -%}{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{ {jinja_literal(tpl.generation_prompt)} }}}}{{%- endif -%}}",
    ]
    return "".join(parts)


def _parts_to_plain_prelude(image_token: str, *, system: str | None) -> str:
    """Jinja that rebinds ``messages`` with content parts joined to strings exactly as vlmkit joins them
    (``normalize_messages``: an image becomes the image token, followed by "\\n" when text comes next), and
    with vlmkit's configured system prompt when the conversation has none. Outputs nothing."""
    token = jinja_literal(image_token)
    prelude = (
        "{%- set vlmkit_conv = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set vlmkit_conv.messages = vlmkit_conv.messages + [message] -%}"
        "{%- else -%}{%- set vlmkit_text = namespace(value='', image=false) -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}"
        "{%- set vlmkit_text.value = vlmkit_text.value + ('\\n' if vlmkit_text.image else '') + part['text'] -%}"
        "{%- set vlmkit_text.image = false -%}"
        "{%- else -%}{%- set vlmkit_text.value = vlmkit_text.value + " + token + " -%}"
        "{%- set vlmkit_text.image = true -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set vlmkit_conv.messages = vlmkit_conv.messages + "
        "[{'role': message['role'], 'content': vlmkit_text.value}] -%}"
        "{%- endif -%}{%- endfor -%}"
    )
    if system is not None:
        prelude += (
            "{%- if not (vlmkit_conv.messages | selectattr('role', 'equalto', 'system') | list) -%}"
            "{%- set vlmkit_conv.messages = [{'role': 'system', 'content': " + jinja_literal(system) + "}] + "
            "vlmkit_conv.messages -%}{%- endif -%}"
        )
    return prelude + "{%- set messages = vlmkit_conv.messages %}"  # no "-": keeps the template's whitespace
