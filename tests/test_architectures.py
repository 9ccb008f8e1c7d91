"""Architecture presets: the published Qwen2-VL shapes, counted on the meta device, and a materialised model."""

import numpy as np
import pytest
import torch
from PIL import Image

from emovlm_kd import EmoVLMKDForImageClassification, EmoVLMKDImageProcessor
from emovlm_kd.architectures import (
    ARCHITECTURES,
    QWEN2_VL_IMAGE_LIMITS,
    architecture_config,
    build_architecture_vlm,
    count_architecture_parameters,
    get_architecture,
)
from emovlm_kd.tiny import build_tiny_vlm_processor

# Published sizes: Qwen2-VL-2B's model.safetensors.index.json holds 4,417,971,200 bytes of bfloat16 weights
# (= 2,208,985,600 parameters; the Hub shows "2.21B params"); the Hub shows "8.29B params" for Qwen2-VL-7B.
PUBLISHED = {"qwen2-vl-2b": 4_417_971_200 // 2, "qwen2-vl-7b": 8.29e9}


@pytest.fixture(scope="module")
def processor():
    return build_tiny_vlm_processor(**QWEN2_VL_IMAGE_LIMITS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_sizes_on_the_meta_device(name, processor):
    counted = count_architecture_parameters(name, processor)
    assert abs(counted / PUBLISHED[name] - 1) < 0.01, (name, counted)
    assert ARCHITECTURES[name].published_parameters == pytest.approx(PUBLISHED[name], rel=1e-3)
    vlm = build_architecture_vlm(name, processor, device="meta")
    assert all(parameter.is_meta for parameter in vlm.parameters())  # nothing was allocated


def test_presets_hold_the_published_configs(processor):
    small, large = ARCHITECTURES["qwen2-vl-2b"], ARCHITECTURES["qwen2-vl-7b"]
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads, small.num_key_value_heads) == (
        1536,
        28,
        12,
        2,
    )
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads, large.num_key_value_heads) == (
        3584,
        28,
        28,
        4,
    )
    assert (small.intermediate_size, large.intermediate_size) == (8960, 18944)
    assert (small.vocab_size, large.vocab_size) == (151936, 152064)
    assert small.tie_word_embeddings and not large.tie_word_embeddings
    for architecture in (small, large):
        config = architecture_config(architecture, processor.tokenizer)
        text, vision = config.text_config, config.vision_config
        head_dim = text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2 == 64
        assert text.rope_parameters["rope_theta"] == 1e6
        assert (vision.depth, vision.embed_dim, vision.num_heads, vision.mlp_ratio) == (32, 1280, 16, 4)
        assert vision.hidden_size == text.hidden_size  # the merger projects to the text width
        assert config.image_token_id == processor.image_token_id  # text ids come from the given tokenizer
    tied = build_architecture_vlm("qwen2-vl-2b", processor, device="meta")
    untied = build_architecture_vlm("qwen2-vl-7b", processor, device="meta")
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight
    assert tied.lm_head.weight.shape == (151936, 1536) and untied.lm_head.weight.shape == (152064, 3584)


def test_materialised_model_scores_over_the_full_vocabulary(processor):
    # The 2B preset's vocabulary and vision layout with narrow widths, so that the weights fit a fast test.
    narrow = get_architecture(
        "qwen2-vl-2b",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(2, 3, 3),
        vision_depth=1,
        vision_embed_dim=32,
        vision_num_heads=2,
    )
    vlm = build_architecture_vlm(narrow, processor, dtype=torch.float32, seed=0)
    again = build_architecture_vlm(narrow, processor, dtype=torch.float32, seed=0)
    assert torch.equal(vlm.lm_head.weight, again.lm_head.weight)  # seeded random init
    assert float(vlm.lm_head.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    labels = ["amusement", "anger", "awe"]
    model = EmoVLMKDForImageClassification.from_vlm(vlm, processor, labels).eval()
    image_processor = EmoVLMKDImageProcessor.from_vlm_processor(processor, model.config)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    inputs = image_processor([image])
    with torch.no_grad():
        output = model(**inputs)
        logits = vlm(
            **{
                key: inputs[key]
                for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
            }
        )
    assert logits.logits.shape[-1] == 151936
    assert output.vlm_log_likelihoods.shape == (1, 3) and torch.isfinite(output.vlm_log_likelihoods).all()


def test_unknown_preset_and_oversized_tokenizer_are_clear_errors(processor):
    with pytest.raises(ValueError, match="Unknown architecture preset 'qwen2-vl-72b'"):
        get_architecture("qwen2-vl-72b")
    with pytest.raises(ValueError, match="more than the 100 of Qwen/Qwen2-VL-2B-Instruct's vocabulary"):
        architecture_config(get_architecture("qwen2-vl-2b", vocab_size=100), processor.tokenizer)


# Qwen3-VL totals (`sum(p.numel())` of the released checkpoints; the Hub API's safetensors total, e.g. Qwen3-VL-8B's
# model.safetensors.index.json: 17,534,247,392 bytes of bfloat16); the Hub pages round them to 2.13B / 4.44B / 8.77B.
PUBLISHED_QWEN3_VL = {"qwen3-vl-2b": 2_127_532_032, "qwen3-vl-4b": 4_437_815_808, "qwen3-vl-8b": 17_534_247_392 // 2}


@pytest.mark.parametrize("name", sorted(PUBLISHED_QWEN3_VL))
def test_qwen3_vl_presets_count_the_published_parameters_on_the_meta_device(name):
    architecture = get_architecture(name)
    processor = build_tiny_vlm_processor(family=architecture.family, **architecture.image_limits)
    counted = count_architecture_parameters(name, processor)
    assert abs(counted / PUBLISHED_QWEN3_VL[name] - 1) < 0.001, (name, counted)
    assert architecture.published_parameters == PUBLISHED_QWEN3_VL[name]
    vlm = build_architecture_vlm(name, processor, device="meta")
    assert type(vlm).__name__ == "Qwen3VLForConditionalGeneration" and all(p.is_meta for p in vlm.parameters())
    assert processor.image_processor.patch_size == 16 and processor.image_processor.size["shortest_edge"] == 65536


def test_qwen3_vl_8b_preset_holds_the_published_config():
    architecture = get_architecture("qwen3-vl-8b")
    config = architecture_config(architecture, build_tiny_vlm_processor(family="qwen3_vl").tokenizer)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        4096,
        36,
        32,
        8,
    )
    assert (text.head_dim, text.intermediate_size, text.vocab_size, config.tie_word_embeddings) == (
        128,
        12288,
        151936,
        False,
    )
    assert text.rope_parameters["mrope_section"] == [24, 20, 20] and text.rope_parameters["rope_theta"] == 5e6
    assert (vision.hidden_size, vision.depth, list(vision.deepstack_visual_indexes)) == (1152, 27, [8, 16, 24])
    assert get_architecture("qwen3-vl-2b").tie_word_embeddings and "deepstack" in architecture.summary()
