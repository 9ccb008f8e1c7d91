"""Published VLM architectures (Qwen2-VL, Qwen3-VL) as random-init presets: the real model's cost, without its weights.

A model's compute and memory depend on its architecture (widths, depths, heads, vocabulary), not on the values of its
weights, so a random-init model of the real shape measures what the real checkpoint costs. Presets hold the numbers
of the checkpoints' published `config.json`; `build_architecture_vlm(..., device="meta")` builds the model without
allocating anything (parameter counts, memory planning), any other device materialises it with random weights.

Text comes from any tokenizer (e.g. the offline `emovlm_kd.tiny` one): its ids only have to lie below the preset's
vocabulary, whose full size is kept for the embedding and the LM head, so that the cost of the LM head, a large part
of a scoring or decoding step, is the real one.

    from emovlm_kd.architectures import build_architecture_vlm
    from emovlm_kd.tiny import build_tiny_vlm_processor

    processor = build_tiny_vlm_processor(**QWEN2_VL_IMAGE_LIMITS)
    vlm = build_architecture_vlm("qwen2-vl-2b", processor, dtype=torch.bfloat16)  # 2.2B parameters, random init

    architecture = get_architecture("qwen3-vl-2b")  # Qwen3-VL: its own processor geometry and image limits
    processor = build_tiny_vlm_processor(family=architecture.family, **architecture.image_limits)
"""

from dataclasses import dataclass, field, replace

import torch
from transformers import AutoModelForImageTextToText, Qwen2VLConfig, Qwen3VLConfig

# The image limits of the Qwen2-VL-*-Instruct checkpoints' preprocessor_config.json (min_pixels, max_pixels): images
# keep their size, rounded to multiples of 28 px, unless they exceed 12.8 MP (one LM token per 28 x 28 pixels).
QWEN2_VL_IMAGE_LIMITS = {"min_pixels": 56 * 56, "max_pixels": 16384 * 28 * 28}
# The Qwen3-VL-*-Instruct checkpoints' preprocessor_config.json (size: shortest_edge, longest_edge): at least 256^2 px,
# at most 4096^2 px, rounded to multiples of 32 px (one LM token per 32 x 32 pixels).
QWEN3_VL_IMAGE_LIMITS = {"min_pixels": 65536, "max_pixels": 16777216}


@dataclass(frozen=True)
class Qwen2VLArchitecture:
    """The architecture numbers of a Qwen2-VL checkpoint (its `config.json`), and its published parameter count."""

    checkpoint: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    published_parameters: int
    published_parameters_source: str
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    vision_depth: int = 32
    vision_embed_dim: int = 1280
    vision_num_heads: int = 16
    vision_mlp_ratio: int = 4
    vision_patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    family: str = field(default="qwen2_vl")

    @property
    def image_limits(self) -> dict:
        """The checkpoint's image processor limits (`build_tiny_vlm_processor(family=..., **image_limits)`)."""
        return QWEN2_VL_IMAGE_LIMITS

    def summary(self) -> str:
        """One line naming every number that sets the cost."""
        tied = ", tied to the embedding" if self.tie_word_embeddings else ""
        return (
            f"{self.checkpoint} architecture: text {self.hidden_size} x {self.num_hidden_layers} layers (GQA "
            f"{self.num_attention_heads}/{self.num_key_value_heads} heads, MLP {self.intermediate_size}), vocabulary "
            f"{self.vocab_size:,} (LM head{tied}); vision {self.vision_embed_dim} x {self.vision_depth} blocks "
            f"({self.vision_num_heads} heads, MLP x{self.vision_mlp_ratio}), 2x2 merger to {self.hidden_size}"
        )


@dataclass(frozen=True)
class Qwen3VLArchitecture:
    """The architecture numbers of a Qwen3-VL checkpoint (its `config.json`), and its published parameter count."""

    checkpoint: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    deepstack_visual_indexes: tuple[int, ...]
    published_parameters: int
    published_parameters_source: str
    vocab_size: int = 151936
    head_dim: int = 128
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, ...] = (24, 20, 20)  # interleaved over the head dimension
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-6
    vision_num_heads: int = 16
    vision_patch_size: int = 16
    vision_num_position_embeddings: int = 2304
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    family: str = field(default="qwen3_vl")

    @property
    def image_limits(self) -> dict:
        return QWEN3_VL_IMAGE_LIMITS

    def summary(self) -> str:
        tied = ", tied to the embedding" if self.tie_word_embeddings else ""
        return (
            f"{self.checkpoint} architecture: text {self.hidden_size} x {self.num_hidden_layers} layers (GQA "
            f"{self.num_attention_heads}/{self.num_key_value_heads} heads of {self.head_dim}, MLP "
            f"{self.intermediate_size}), vocabulary {self.vocab_size:,} (LM head{tied}); vision "
            f"{self.vision_hidden_size} x {self.vision_depth} blocks (patch {self.vision_patch_size}, MLP "
            f"{self.vision_intermediate_size}), deepstack from blocks {list(self.deepstack_visual_indexes)}, 2x2 "
            f"merger to {self.hidden_size}"
        )


# Qwen3-VL totals, as public code quotes them (the checkpoints themselves cannot be downloaded here): the Hub API's
# safetensors total (2B, 8B) or `sum(p.numel())` of the loaded checkpoint (4B); Qwen3-VL-8B's
# model.safetensors.index.json holds total_size 17,534,247,392 bytes of bfloat16 = 8,767,123,696. The Hub pages
# round them to 2.13B / 4.44B / 8.77B params.
_QWEN3_VL_SOURCE = "the parameter total of {} (bfloat16) as public code quotes it (Hub API / loaded checkpoint)"

ARCHITECTURES = {
    "qwen2-vl-2b": Qwen2VLArchitecture(
        checkpoint="Qwen/Qwen2-VL-2B-Instruct",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        published_parameters=2_208_985_600,
        published_parameters_source=(
            "the Qwen2-VL-2B checkpoints' model.safetensors.index.json: total_size 4,417,971,200 bytes of bfloat16 "
            "weights; the Hub model page shows 2.21B params"
        ),
    ),
    "qwen2-vl-7b": Qwen2VLArchitecture(
        checkpoint="Qwen/Qwen2-VL-7B-Instruct",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        published_parameters=8_290_000_000,
        published_parameters_source="the Hub model page of Qwen2-VL-7B checkpoints: 8.29B params (bfloat16)",
    ),
    "qwen3-vl-2b": Qwen3VLArchitecture(
        checkpoint="Qwen/Qwen3-VL-2B-Instruct",
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        vision_depth=24,
        vision_hidden_size=1024,
        vision_intermediate_size=4096,
        deepstack_visual_indexes=(5, 11, 17),
        published_parameters=2_127_532_032,
        published_parameters_source=_QWEN3_VL_SOURCE.format("Qwen/Qwen3-VL-2B-Instruct"),
    ),
    "qwen3-vl-4b": Qwen3VLArchitecture(
        checkpoint="Qwen/Qwen3-VL-4B-Instruct",
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        vision_depth=24,
        vision_hidden_size=1024,
        vision_intermediate_size=4096,
        deepstack_visual_indexes=(5, 11, 17),
        published_parameters=4_437_815_808,
        published_parameters_source=_QWEN3_VL_SOURCE.format("Qwen/Qwen3-VL-4B-Instruct"),
    ),
    "qwen3-vl-8b": Qwen3VLArchitecture(
        checkpoint="Qwen/Qwen3-VL-8B-Instruct",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        vision_depth=27,
        vision_hidden_size=1152,
        vision_intermediate_size=4304,
        deepstack_visual_indexes=(8, 16, 24),
        published_parameters=8_767_123_696,
        published_parameters_source=_QWEN3_VL_SOURCE.format("Qwen/Qwen3-VL-8B-Instruct")
        + "; model.safetensors.index.json: total_size 17,534,247,392 bytes",
    ),
}
VLMArchitecture = Qwen2VLArchitecture | Qwen3VLArchitecture


def get_architecture(name: str, **overrides) -> VLMArchitecture:
    """A preset by name; `overrides` replace fields (e.g. `num_hidden_layers=1` for a cheap test of the builder)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture preset {name!r}; available: {sorted(ARCHITECTURES)}")
    return replace(ARCHITECTURES[name], **overrides)


def _special_token_ids(architecture: VLMArchitecture, tokenizer) -> dict:
    if len(tokenizer) > architecture.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens, more than the {architecture.vocab_size} of "
            f"{architecture.checkpoint}'s vocabulary"
        )
    token_id = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": token_id("<|image_pad|>"),
        "video_token_id": token_id("<|video_pad|>"),
        "vision_start_token_id": token_id("<|vision_start|>"),
        "vision_end_token_id": token_id("<|vision_end|>"),
    }


def architecture_config(architecture: VLMArchitecture, tokenizer) -> Qwen2VLConfig | Qwen3VLConfig:
    """The checkpoint's config with the special-token ids of `tokenizer` (its ids must be below the vocabulary)."""
    special = _special_token_ids(architecture, tokenizer)
    if isinstance(architecture, Qwen3VLArchitecture):
        return _qwen3_vl_config(architecture, tokenizer, special)
    token_id = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config={
            "vocab_size": architecture.vocab_size,
            "hidden_size": architecture.hidden_size,
            "intermediate_size": architecture.intermediate_size,
            "num_hidden_layers": architecture.num_hidden_layers,
            "num_attention_heads": architecture.num_attention_heads,
            "num_key_value_heads": architecture.num_key_value_heads,
            "max_position_embeddings": architecture.max_position_embeddings,
            "rms_norm_eps": architecture.rms_norm_eps,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": architecture.rope_theta,
                "mrope_section": list(architecture.mrope_section),
            },
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": architecture.vision_depth,
            "embed_dim": architecture.vision_embed_dim,
            "num_heads": architecture.vision_num_heads,
            "mlp_ratio": architecture.vision_mlp_ratio,
            "hidden_size": architecture.hidden_size,  # the merger projects to the text width
            "patch_size": architecture.vision_patch_size,
            "spatial_merge_size": architecture.spatial_merge_size,
            "temporal_patch_size": architecture.temporal_patch_size,
        },
        **special,
        tie_word_embeddings=architecture.tie_word_embeddings,
    )


def _qwen3_vl_config(architecture: Qwen3VLArchitecture, tokenizer, special: dict) -> Qwen3VLConfig:
    token_id = tokenizer.convert_tokens_to_ids
    return Qwen3VLConfig(
        text_config={
            "vocab_size": architecture.vocab_size,
            "hidden_size": architecture.hidden_size,
            "intermediate_size": architecture.intermediate_size,
            "num_hidden_layers": architecture.num_hidden_layers,
            "num_attention_heads": architecture.num_attention_heads,
            "num_key_value_heads": architecture.num_key_value_heads,
            "head_dim": architecture.head_dim,
            "max_position_embeddings": architecture.max_position_embeddings,
            "rms_norm_eps": architecture.rms_norm_eps,
            "tie_word_embeddings": architecture.tie_word_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": architecture.rope_theta,
                "mrope_section": list(architecture.mrope_section),
                "mrope_interleaved": True,
            },
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": architecture.vision_depth,
            "hidden_size": architecture.vision_hidden_size,
            "intermediate_size": architecture.vision_intermediate_size,
            "num_heads": architecture.vision_num_heads,
            "out_hidden_size": architecture.hidden_size,  # the merger projects to the text width
            "patch_size": architecture.vision_patch_size,
            "spatial_merge_size": architecture.spatial_merge_size,
            "temporal_patch_size": architecture.temporal_patch_size,
            "num_position_embeddings": architecture.vision_num_position_embeddings,
            "deepstack_visual_indexes": list(architecture.deepstack_visual_indexes),
        },
        **special,
        tie_word_embeddings=architecture.tie_word_embeddings,
    )


def build_architecture_vlm(
    architecture: str | VLMArchitecture, processor, device="cpu", dtype=torch.float32, seed: int = 0
):
    """A model of a preset's architecture (Qwen2-VL or Qwen3-VL) for `processor`'s tokenizer.

    `device="meta"` allocates nothing (shapes only); any other device materialises random weights there directly
    (the VLM's own initialisation, seeded), in `dtype`.
    """
    if isinstance(architecture, str):
        architecture = get_architecture(architecture)
    config = architecture_config(architecture, processor.tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        vlm = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return vlm.eval()


def count_architecture_parameters(architecture: str | VLMArchitecture, processor) -> int:
    """Parameters of the preset's model, counted on the meta device (no memory; tied weights counted once)."""
    vlm = build_architecture_vlm(architecture, processor, device="meta")
    return sum(parameter.numel() for parameter in vlm.parameters())


__all__ = [
    "ARCHITECTURES",
    "QWEN2_VL_IMAGE_LIMITS",
    "QWEN3_VL_IMAGE_LIMITS",
    "Qwen2VLArchitecture",
    "Qwen3VLArchitecture",
    "VLMArchitecture",
    "architecture_config",
    "build_architecture_vlm",
    "count_architecture_parameters",
    "get_architecture",
]
