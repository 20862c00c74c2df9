"""Block expansion: a deeper LM that computes exactly what the original did, and can learn from there."""

import pytest
import torch

from vlmkit.api import VLM
from vlmkit.models.expand import expand_language_layers
from vlmkit.processing.processor import Sample


def logits(vlm: VLM, images) -> torch.Tensor:
    batch = vlm.processor([Sample(messages=vlm.processor.user_prompt("What colour is it?", num_images=1),
                                  images=[images[0]])])  # fmt: skip
    with torch.no_grad():
        return vlm.model.eval()(**batch).logits


@pytest.mark.slow
@pytest.mark.parametrize(("language", "after", "layers"), [("llama", None, 2), ("qwen2", [1], 1)])
def test_grown_model_gives_the_same_logits_and_answers(parts, images, tmp_path, language, after, layers):
    vlm = VLM.build(vision=parts["clip"], language=parts[language], projector="mlp")
    count = vlm.config.language.hf_config["num_hidden_layers"]
    grown = VLM(model=expand_language_layers(vlm.model, after=after), tokenizer=vlm.tokenizer)
    assert grown.config.language.hf_config["num_hidden_layers"] == count + (
        count if after is None else layers
    )
    assert (
        len(grown.model.language_model.model.layers) == grown.config.language.hf_config["num_hidden_layers"]
    )
    assert torch.equal(logits(grown, images), logits(vlm, images))
    loaded = VLM.from_pretrained(grown.save_pretrained(tmp_path / "grown"))
    assert torch.equal(logits(loaded, images), logits(vlm, images))
    question = "Describe the image."
    assert loaded.ask(question, images=[images[0]], max_new_tokens=6) == vlm.ask(
        question, images=[images[0]], max_new_tokens=6
    )


def test_the_new_layers_start_silent_and_receive_gradient(parts, images):
    vlm = VLM.build(vision=parts["clip"], language=parts["llama"], projector="mlp")
    grown = expand_language_layers(vlm.model, after=[0])
    new = grown.language_model.model.layers[1]
    assert not new.self_attn.o_proj.weight.any() and not new.mlp.down_proj.weight.any()
    assert torch.equal(
        new.self_attn.q_proj.weight, vlm.model.language_model.model.layers[0].self_attn.q_proj.weight
    )
    ids = torch.randint(10, 100, (2, 12))
    grown.train()(input_ids=ids, labels=ids).loss.backward()
    assert new.self_attn.o_proj.weight.grad.abs().sum() > 0 and new.mlp.down_proj.weight.grad.abs().sum() > 0


def test_bad_requests_are_refused(parts):
    vlm = VLM.build(vision=parts["clip"], language=parts["llama"], projector="mlp")
    count = vlm.config.language.hf_config["num_hidden_layers"]
    with pytest.raises(ValueError, match=f"0..{count - 1}"):
        expand_language_layers(vlm.model, after=[count])
    with pytest.raises(ValueError, match="0.."):
        expand_language_layers(vlm.model, after=[])
    gpt2 = VLM.build(vision=parts["clip"], language=parts["gpt2"], projector="mlp")
    with pytest.raises(ValueError, match="Llama-style"):
        expand_language_layers(gpt2.model)
