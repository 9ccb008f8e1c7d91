"""transformers' conventions in the remote code: `forward` refuses unknown arguments, `_init_weights` defers to
transformers' defaults, only the attention backends the scoring path takes can be chosen, and the processor is a
`ProcessorMixin` loaded by `AutoProcessor`, while folders exported before it existed (76450c2's layout: an image
processor registered as `AutoProcessor`, tokenizer files next to it) still load and score identically."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModelForImageClassification, AutoProcessor, pipeline

from emovlm_kd.testing import make_images
from emovlm_kd.tiny import build_tiny_model
from modeling_emovlm_kd import EmoVLMKDForImageClassification
from processing_emovlm_kd import EmoVLMKDProcessor


def test_forward_refuses_unknown_arguments(tiny):
    model, image_processor, _ = tiny
    inputs = image_processor(make_images()[:1])
    with pytest.raises(TypeError, match=r"'label' \(did you mean 'labels'\?\)"):
        model(**inputs, label=torch.tensor([0]))
    with torch.no_grad():  # what the pipeline and Trainer pass still works, tuples too
        assert model(**inputs, labels=torch.tensor([0])).loss is not None
        assert isinstance(model(**inputs, return_dict=False), tuple)
    assert model.accepts_loss_kwargs is False  # Trainer passes no num_items_in_batch and scales the loss itself


def test_only_the_attention_backends_of_the_scoring_path_can_be_chosen(tiny_folder):
    assert EmoVLMKDForImageClassification._supports_attention_backend is False
    with pytest.raises(ValueError):
        EmoVLMKDForImageClassification.from_pretrained(tiny_folder, attn_implementation="flex_attention")


@pytest.mark.parametrize("gate_type", ["concat_linear", "bilinear"])
def test_init_weights_defers_to_transformers_and_keeps_the_weights(gate_type):
    """Head and gate weights as before on the same seed: N(0, initializer_range) weights drawn in module order,
    zero biases (transformers' default for Linear; nn.Bilinear, which it does not cover, the same)."""
    model, _, _ = build_tiny_model(seed=3, gate_type=gate_type)
    torch.manual_seed(3)
    for module in [*model.head.modules(), *model.gate.modules()]:
        if isinstance(module, (nn.Linear, nn.Bilinear)):
            expected = torch.empty_like(module.weight).normal_(0.0, model.config.initializer_range)
            assert torch.equal(module.weight, expected)
            assert module.bias is None or not module.bias.any()


REPO_ROOT = Path(__file__).resolve().parent.parent
PREVIOUS_FORMAT = "76450c2"  # the last commit whose exports had no processor_config.json
OLD_REMOTE_CODE = ("configuration_emovlm_kd", "modeling_emovlm_kd", "image_processing_emovlm_kd", "pipeline_emovlm_kd")


def old_format_folder(model, image_processor, folder, old_code: dict | None = None):
    """A folder as 76450c2's export wrote it: the model with its tokenizer, the image processor registered as
    `AutoProcessor` in preprocessor_config.json, no processor_config.json; with `old_code`, that commit's remote-code
    files too (else this code's, which still find what they need there)."""
    model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    config_file = folder / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {
        "AutoImageProcessor": "image_processing_emovlm_kd.EmoVLMKDImageProcessor",
        "AutoProcessor": "image_processing_emovlm_kd.EmoVLMKDImageProcessor",
    }
    config_file.write_text(json.dumps(config))
    (folder / "processor_config.json").unlink(missing_ok=True)
    if old_code:
        (folder / "processing_emovlm_kd.py").unlink()
        for name, text in old_code.items():
            (folder / f"{name}.py").write_text(text)
    return folder


def previous_remote_code() -> dict | None:
    """The remote-code files at `PREVIOUS_FORMAT`, from git (None outside a clone that has the commit)."""
    try:
        return {
            name: subprocess.run(
                ["git", "show", f"{PREVIOUS_FORMAT}:{name}.py"], cwd=REPO_ROOT, capture_output=True, check=True
            ).stdout.decode()
            for name in OLD_REMOTE_CODE
        }
    except (OSError, subprocess.CalledProcessError):
        return None


def test_exported_folders_load_the_processor_mixin(tiny_folder):
    processor = AutoProcessor.from_pretrained(tiny_folder, trust_remote_code=True)
    assert type(processor).__name__ == "EmoVLMKDProcessor" and "ProcessorMixin" in [
        base.__name__ for base in type(processor).__mro__
    ]
    assert type(processor.image_processor).__name__ == "EmoVLMKDImageProcessor"
    assert processor.tokenizer.chat_template is not None


def test_the_processor_renders_and_tokenises_the_chats(tiny):
    model, image_processor, vlm_processor = tiny
    processor = EmoVLMKDProcessor.from_vlm_processor(vlm_processor, model.config)
    image_ids = (processor.image_processor.prompt_prefix_ids, processor.image_processor.prompt_suffix_ids)
    assert image_ids == (image_processor.prompt_prefix_ids, image_processor.prompt_suffix_ids)
    assert processor.chat_token_ids(model.config, "classification") == image_ids
    text = processor.render_chat(model.config, "observation")
    assert model.config.observation_prompt in text and text.endswith("<|im_start|>assistant\n")
    inputs = processor(images=make_images())
    assert set(inputs) == set(image_processor.model_input_names)
    with pytest.raises(ValueError, match="pass images only"):
        processor(images=make_images(), text="another prompt")
    assert processor.batch_decode([[vlm_processor.tokenizer.eos_token_id]]) == [""]


@pytest.mark.parametrize("code", ["current", PREVIOUS_FORMAT])
def test_a_folder_of_the_previous_format_loads_and_scores_identically(tiny, tmp_path, code):
    model, image_processor, _ = tiny
    old_code = None
    if code == PREVIOUS_FORMAT:
        old_code = previous_remote_code()
        if old_code is None:
            pytest.skip(f"commit {PREVIOUS_FORMAT} is not in this checkout")
    folder = old_format_folder(model, image_processor, tmp_path / "old", old_code)
    images = make_images()
    inputs = image_processor(images)
    with torch.no_grad():
        expected = model(**inputs)
    # with this package's classes
    loaded = EmoVLMKDForImageClassification.from_pretrained(folder)
    processor = EmoVLMKDProcessor.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        got = loaded(**processor(images=images))
    for name in ("logits", "head_logits", "vlm_log_likelihoods"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0)
    assert loaded.explain(**inputs, max_new_tokens=3) == model.explain(**inputs, max_new_tokens=3)
    # through the Auto classes and the stock pipeline call
    auto_model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
    auto_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(auto_model(**auto_processor(images)).logits, expected.logits, rtol=0, atol=0)
    classifier = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    top = classifier(images[0], top_k=1)[0]
    assert top["label"] == model.config.id2label[int(expected.logits[0].argmax())]
