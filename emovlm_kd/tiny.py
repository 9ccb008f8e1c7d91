"""Tiny random-init Qwen2-VL-family models with an offline tokenizer and processor (tests, quickstart, benchmarks)."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AddedToken,
    AutoModelForImageTextToText,
    Qwen2_5_VLConfig,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from configuration_emovlm_kd import (
    CLASSIFICATION_PROMPT,
    INFERENCE_PROMPT,
    OBSERVATION_PROMPT,
    SYSTEM_MESSAGE,
    EmoVLMKDConfig,
)
from image_processing_emovlm_kd import EmoVLMKDImageProcessor
from modeling_emovlm_kd import EmoVLMKDForImageClassification

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2-VL chat template (images, videos and text; system turn added when missing).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LM_HEAD_SCALE = 10.0

# The processor geometry of each family's released checkpoints (their preprocessor_config.json): Qwen2(.5)-VL cut
# 14 px patches normalised with the CLIP mean/std (the image processor's defaults); Qwen3-VL cuts 16 px patches
# normalised with mean = std = 0.5. Both merge 2 x 2 patches into one LM token.
PROCESSOR_GEOMETRY = {
    "qwen2_vl": {"patch_size": 14, "merge_size": 2},
    "qwen2_5_vl": {"patch_size": 14, "merge_size": 2},
    "qwen3_vl": {"patch_size": 16, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
}

_CORPUS = [
    "You are a helpful assistant.",
    "Which emotion does this image evoke? Choose one of the following emotions: amusement, anger, awe, contentment, "
    "disgust, excitement, fear, sadness. Answer in the format {'emotion': '<label>'}.",
    "{'emotion': 'amusement'} {'emotion': 'contentment'} {'emotion': 'sad'} {'emotion': 'sadness'}",
    "{'emotion': 'negative'} {'emotion': 'neutral'} {'emotion': 'positive'}",
    "positive negative neutral joy surprise happy calm angry scared",
    "Describe the key visual elements of this image. Explain the emotional reasoning behind the image.",
    "The image shows a person, a dark sky, bright colours, a smiling face, a storm, flowers, a quiet lake.",
    # the default prompts, so that they tokenise into about a hundred tokens rather than several hundred bytes
    SYSTEM_MESSAGE,
    OBSERVATION_PROMPT,
    INFERENCE_PROMPT,
    CLASSIFICATION_PROMPT,
    "['amusement', 'excitement', 'sadness', 'fear', 'contentment', 'anger', 'disgust', 'awe']",
]


def build_tiny_tokenizer(vocab_size: int = 800) -> Qwen2Tokenizer:
    """A small byte-level BPE trained offline, with the Qwen special tokens and the Qwen2-VL chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in _merges(bpe)]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS], special_tokens=True
    )
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tokenizer


def _merges(bpe: Tokenizer) -> list:
    import json

    return json.loads(bpe.to_str())["model"]["merges"]


def build_tiny_vlm_processor(
    max_pixels: int | None = None, min_pixels: int | None = None, family: str = "qwen2_vl"
) -> Qwen2VLProcessor:
    """The family's processor (Qwen2VLProcessor, or Qwen3VLProcessor for `qwen3_vl`) with the tiny tokenizer and
    the released checkpoints' patch geometry; images resized to at most `max_pixels` (default: 4 x 4 merged
    patches, 16 image tokens: 112^2 px with 14 px patches, 128^2 px with Qwen3-VL's 16 px ones)."""
    if family not in PROCESSOR_GEOMETRY:
        raise ValueError(f"Unknown tiny VLM family {family!r}; use one of {sorted(PROCESSOR_GEOMETRY)}")
    geometry = PROCESSOR_GEOMETRY[family]
    factor = geometry["patch_size"] * geometry["merge_size"]
    size = {"shortest_edge": min_pixels or (2 * factor) ** 2, "longest_edge": max_pixels or (4 * factor) ** 2}
    tokenizer = build_tiny_tokenizer()
    if family == "qwen3_vl":
        processor_class, video_processor = Qwen3VLProcessor, Qwen3VLVideoProcessor(size=size, **geometry)
    else:
        processor_class, video_processor = Qwen2VLProcessor, Qwen2VLVideoProcessor(size=size, **geometry)
    return processor_class(
        image_processor=Qwen2VLImageProcessor(size=size, **geometry),
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def _qwen2_vl_settings(hidden_size, vision_dim, vision_depth, head_dim):
    return {"embed_dim": vision_dim, "hidden_size": hidden_size, "mlp_ratio": 2}, {}, {}


def _qwen2_5_vl_settings(hidden_size, vision_dim, vision_depth, head_dim):
    vision = {
        "hidden_size": vision_dim,
        "intermediate_size": 2 * vision_dim,
        "out_hidden_size": hidden_size,
        "window_size": 56,
        "fullatt_block_indexes": [vision_depth - 1],
    }
    return vision, {}, {}


def _qwen3_vl_settings(hidden_size, vision_dim, vision_depth, head_dim):
    vision = {
        "hidden_size": vision_dim,
        "intermediate_size": 2 * vision_dim,
        "out_hidden_size": hidden_size,
        "num_position_embeddings": 64,  # an 8 x 8 learned grid, resampled to each image's
        "deepstack_visual_indexes": list(range(vision_depth)),  # deepstack features from every block
    }
    return vision, {"head_dim": head_dim}, {"mrope_interleaved": True}


# family -> (config class, its (vision config, text config, rope parameters) settings at a tiny size)
TINY_FAMILIES = {
    "qwen2_vl": (Qwen2VLConfig, _qwen2_vl_settings),
    "qwen2_5_vl": (Qwen2_5_VLConfig, _qwen2_5_vl_settings),
    "qwen3_vl": (Qwen3VLConfig, _qwen3_vl_settings),
}


def build_tiny_vlm(
    processor: Qwen2VLProcessor,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_dim: int = 32,
    vision_depth: int = 2,
    seed: int = 0,
    family: str = "qwen2_vl",
):
    """A random-init Qwen-VL-family model whose vocabulary matches `processor.tokenizer`.

    `family` is `"qwen2_vl"`, `"qwen2_5_vl"` (windowed-attention vision tower) or `"qwen3_vl"` (deepstack features
    from every vision block, interleaved M-RoPE; build its processor with `family="qwen3_vl"`). The patch geometry
    is the processor's.
    """
    import torch

    tokenizer = processor.tokenizer
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section}
    vision_config = {
        "depth": vision_depth,
        "num_heads": 2,
        "patch_size": processor.image_processor.patch_size,
        "spatial_merge_size": processor.image_processor.merge_size,
        "temporal_patch_size": processor.image_processor.temporal_patch_size,
    }
    if family not in TINY_FAMILIES:
        raise ValueError(f"Unknown tiny VLM family {family!r}; use one of {sorted(TINY_FAMILIES)}")
    config_class, family_settings = TINY_FAMILIES[family]
    vision_settings, text_config, rope_settings = family_settings(hidden_size, vision_dim, vision_depth, head_dim)
    vision_config.update(vision_settings)
    rope.update(rope_settings)
    config = config_class(
        text_config={
            **text_config,
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": rope,
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=vision_config,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    vlm = AutoModelForImageTextToText.from_config(config).eval()
    # With std-0.02 output weights at hidden size 64 no token can get more than ~1% probability, so multi-token
    # answers could never outscore one-token ones and stage 1 could not teach the VLM branch anything. A real
    # VLM's output layer is far more peaked; this brings the tiny one closer.
    with torch.no_grad():
        vlm.get_output_embeddings().weight.mul_(LM_HEAD_SCALE)
    return vlm


def build_tiny_model(labels=("negative", "neutral", "positive"), seed: int = 0, vlm_kwargs=None, **config_kwargs):
    """A complete tiny EmoVLM-KD in a few seconds on CPU: `(model, image_processor, vlm_processor)`.

    `config_kwargs` go to [`EmoVLMKDConfig`] (gate_type, head_hidden_sizes, vlm_branch_mode, ...); the head
    defaults to one hidden layer of 32 instead of 1024 to stay tiny.
    """
    import torch

    vlm_kwargs = vlm_kwargs or {}
    processor = build_tiny_vlm_processor(family=vlm_kwargs.get("family", "qwen2_vl"))
    vlm = build_tiny_vlm(processor, seed=seed, **vlm_kwargs)
    config_kwargs.setdefault("head_hidden_sizes", [32])
    torch.manual_seed(seed)
    model = EmoVLMKDForImageClassification.from_vlm(vlm, processor, list(labels), **config_kwargs)
    image_processor = EmoVLMKDImageProcessor.from_vlm_processor(processor, model.config)
    return model.eval(), image_processor, processor


def save_tiny_model_folder(folder, labels=("negative", "neutral", "positive"), **kwargs) -> str:
    """Build a tiny model (see `build_tiny_model`) and save it as a complete model folder: weights, remote code,
    processor (image processor and tokenizer), as an export writes it. Loads with
    `AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)`, `AutoProcessor` and
    `pipeline("image-classification", model=folder, trust_remote_code=True)`."""
    from processing_emovlm_kd import EmoVLMKDProcessor

    model, image_processor, _ = build_tiny_model(labels, **kwargs)
    model.save_pretrained(folder)
    EmoVLMKDProcessor(image_processor, model.tokenizer).save_pretrained(folder)
    return str(folder)


__all__ = [
    "build_tiny_model",
    "save_tiny_model_folder",
    "build_tiny_vlm",
    "build_tiny_vlm_processor",
    "build_tiny_tokenizer",
    "EmoVLMKDConfig",
]
