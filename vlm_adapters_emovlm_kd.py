# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""What EmoVLM-KD needs to know about each VLM family (remote code: copied into every exported model repo).

The model scores class answers by calling the VLM's parts directly (visual encoder, rope index, language model), so
it depends on how a family wires them. This file is the one place that knows: one adapter per family, keyed by
`vlm_config.model_type`. Everything else (the model, the image processor, the stages, `explain`, the cache, the
benchmarks) asks the adapter. It imports only torch and transformers.

* `qwen2_vl`, `qwen2_5_vl`: LM-ready image features are `get_image_features(...).pooler_output`; the language model
  takes nothing else; the released processors cut 14 px patches, merged 2 x 2 (read from the processor).
* `qwen3_vl`: the same, plus `deepstack_features` (one per deepstack level), which the language model adds to the
  hidden states of its first layers at the image positions; 16 px patches merged 2 x 2, mean/std 0.5.

A language model whose attention does not honour the tree-shaped 4-D mask of the one-pass answer scoring (linear or
hybrid attention such as Qwen3.5, sliding windows shorter than the sequence, attention implementations that drop
custom masks) would give silently wrong scores: it is refused with an error that names the reason.
"""

from typing import Optional

import torch

# Attention implementations that apply a custom 4-D mask as given (boolean for SDPA, additive for eager).
MASK_HONOURING_ATTENTION = (None, "sdpa", "eager")
# Layer types whose attention is masked by the attention mask (full, or windowed when the window covers the input).
MASKED_LAYER_TYPES = ("full_attention", "sliding_attention")


class ImageEmbeds(tuple):
    """Per-image LM-ready image embeddings, `(tokens_i, hidden)` each, as a tuple.

    `deepstack` holds, for families that inject visual features inside the language model (Qwen3-VL), one
    `(levels, tokens_i, hidden)` tensor per image (None otherwise). Pass the object as it is to `explain` so that
    the reused image embeddings keep their deepstack features.
    """

    def __new__(cls, embeds, deepstack=None):
        self = super().__new__(cls, embeds)
        self.deepstack = None if deepstack is None else tuple(deepstack)
        return self

    def __reduce__(self):
        return (ImageEmbeds, (tuple(self), self.deepstack))


class QwenVLAdapter:
    """Qwen2-VL: the base of the Qwen VL adapters (3D M-RoPE index, merged LM-ready image embeddings)."""

    family = "qwen2_vl"
    no_split_modules = ("Qwen2VLDecoderLayer", "Qwen2VLVisionBlock")
    # LoRA of stage 1: the language model's attention projections (the paper's q, k, v, o).
    lora_target_modules = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
    has_deepstack = False

    def image_features(self, vlm, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> ImageEmbeds:
        """The single pass of the visual encoder: LM-ready embeddings, one `(tokens_i, hidden)` tensor per image."""
        return ImageEmbeds(vlm.model.get_image_features(pixel_values, image_grid_thw).pooler_output)

    def deepstack_levels(self, vlm_config) -> int:
        return 0

    def rope_index(self, vlm, input_ids, mm_token_type_ids, image_grid_thw, attention_mask) -> torch.Tensor:
        """The 3D rope positions `(3, batch, seq_len)` of left-padded prompts with one image each."""
        position_ids, _ = vlm.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
        )
        return position_ids

    def language_model(self, vlm):
        return vlm.model.language_model

    def run_language_model(
        self, vlm, inputs_embeds, attention_mask, position_ids, image_mask=None, image_embeds=None, cache=None
    ) -> torch.Tensor:
        """The language model's last hidden state. `image_mask` `(batch, seq_len)` marks the image positions of
        `inputs_embeds` whose embeddings are `image_embeds` (used by families with deepstack)."""
        return self.language_model(vlm)(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            **self.visual_inputs(inputs_embeds, image_mask, image_embeds),
        ).last_hidden_state

    def visual_inputs(self, inputs_embeds, image_mask, image_embeds) -> dict:
        """Extra language-model inputs at the image positions (none: the image is in `inputs_embeds` already)."""
        return {}

    def check_processor(self, vlm_config, image_processor) -> dict:
        """The processor's geometry, refused when it does not cut images the way the VLM's vision tower reads them
        (a processor of another family or checkpoint would silently feed it wrong patches)."""
        geometry = self.processor_geometry(image_processor)
        vision = vlm_config.vision_config
        expected = {
            "patch_size": vision.patch_size,
            "merge_size": vision.spatial_merge_size,
            "temporal_patch_size": vision.temporal_patch_size,
        }
        wrong = {name: (geometry[name], value) for name, value in expected.items() if geometry[name] != value}
        if wrong:
            details = ", ".join(f"{name} {got} (the VLM's: {want})" for name, (got, want) in wrong.items())
            raise ValueError(f"The image processor does not fit the {self.family} VLM: {details}")
        return geometry

    def processor_geometry(self, image_processor) -> dict:
        """How the VLM's image processor cuts images, read from it (never assumed): patch and merge sizes, the
        resize factor (pixels per LM token side), normalisation and the pixel limits."""
        size = getattr(image_processor, "size", None) or {}
        patch, merge = int(image_processor.patch_size), int(image_processor.merge_size)
        return {
            "patch_size": patch,
            "merge_size": merge,
            "temporal_patch_size": int(image_processor.temporal_patch_size),
            "resize_factor": patch * merge,
            "image_mean": list(image_processor.image_mean),
            "image_std": list(image_processor.image_std),
            "min_pixels": size.get("shortest_edge", getattr(image_processor, "min_pixels", None)),
            "max_pixels": size.get("longest_edge", getattr(image_processor, "max_pixels", None)),
        }


class Qwen2_5_VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: as Qwen2-VL (windowed attention inside the vision tower only)."""

    family = "qwen2_5_vl"
    no_split_modules = ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock")


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: the visual encoder also returns deepstack features (vision layers 8/16/24 of the 8B, 5/11/17 of the
    2B and 4B), which `Qwen3VLModel.forward` adds to the hidden states of the language model's first layers at the
    image positions. Only image positions receive them: text and answer tokens get no deepstack addition."""

    family = "qwen3_vl"
    no_split_modules = ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock")
    has_deepstack = True

    def image_features(self, vlm, pixel_values, image_grid_thw) -> ImageEmbeds:
        output = vlm.model.get_image_features(pixel_values, image_grid_thw)
        levels = output.deepstack_features  # levels x images
        deepstack = [torch.stack([level[image] for level in levels]) for image in range(len(output.pooler_output))]
        return ImageEmbeds(output.pooler_output, deepstack)

    def deepstack_levels(self, vlm_config) -> int:
        return len(vlm_config.vision_config.deepstack_visual_indexes)

    def visual_inputs(self, inputs_embeds, image_mask, image_embeds) -> dict:
        """The deepstack features, added to the first layers' hidden states at the image positions only."""
        if image_mask is None or not bool(image_mask.any()):
            return {"visual_pos_masks": None, "deepstack_visual_embeds": None}
        deepstack = deepstack_inputs(image_embeds, image_mask, inputs_embeds.dtype)
        return {"visual_pos_masks": image_mask, "deepstack_visual_embeds": deepstack}


def deepstack_inputs(image_embeds, image_mask, dtype) -> list[torch.Tensor]:
    """`deepstack_visual_embeds` of the language model: per level, the features of every image position in the
    order of `image_mask`'s True entries (row by row, one image per row)."""
    deepstack = getattr(image_embeds, "deepstack", None)
    if deepstack is None:
        raise ValueError(
            "This VLM adds deepstack features inside its language model, and the image embeddings given carry none: "
            "pass `pixel_values`, or a forward's `image_hidden_states` exactly as returned"
        )
    flat = torch.cat(list(deepstack), dim=1).to(dtype)  # (levels, total image tokens, hidden)
    if flat.shape[1] != int(image_mask.sum()):
        raise ValueError(f"{int(image_mask.sum())} image positions but {flat.shape[1]} deepstack features")
    return list(flat.unbind(0))


ADAPTERS = {adapter.family: adapter for adapter in (QwenVLAdapter(), Qwen2_5_VLAdapter(), Qwen3VLAdapter())}
SUPPORTED_VLM_FAMILIES = tuple(ADAPTERS)
NO_SPLIT_MODULES = [name for adapter in ADAPTERS.values() for name in adapter.no_split_modules]


def mask_unsafe_reason(vlm_config) -> Optional[str]:
    """Why the language model of `vlm_config` cannot score answers exactly in one pass with a tree-shaped 4-D
    mask, or None. Checked from the config alone (layer types), before any family lookup."""
    text_config = vlm_config.get_text_config() if hasattr(vlm_config, "get_text_config") else vlm_config
    layer_types = list(getattr(text_config, "layer_types", None) or [])
    unmasked = sorted({kind for kind in layer_types if kind not in MASKED_LAYER_TYPES})
    if unmasked:
        count = sum(kind not in MASKED_LAYER_TYPES for kind in layer_types)
        return (
            f"{count} of its {len(layer_types)} language-model layers are {unmasked} layers, which ignore the custom "
            "4-D attention mask of the one-pass answer scoring (a recurrent state runs through every token), so the "
            "class scores would be silently wrong"
        )
    return None


def get_adapter(vlm_config) -> QwenVLAdapter:
    """The adapter of `vlm_config`'s family; a clear error for a model that would be scored wrongly or that no
    adapter knows."""
    reason = mask_unsafe_reason(vlm_config)
    if reason is not None:
        raise ValueError(f"VLM family {vlm_config.model_type!r} cannot be scored exactly: {reason}.")
    if vlm_config.model_type not in ADAPTERS:
        raise ValueError(f"VLM family {vlm_config.model_type!r} is not supported; supported: {SUPPORTED_VLM_FAMILIES}")
    return ADAPTERS[vlm_config.model_type]


def check_attention_backend(language_model) -> None:
    """Refuse an attention implementation that would drop the scoring pass's custom 4-D mask."""
    backend = language_model.config._attn_implementation
    if backend not in MASK_HONOURING_ATTENTION:
        raise ValueError(
            f"The 'score' VLM branch needs a custom attention mask, which attn_implementation={backend!r} does not "
            "take; load the model with attn_implementation='sdpa' (default) or 'eager'."
        )


def check_sliding_window(language_model, sequence_length: int) -> None:
    """Refuse a scoring pass longer than the language model's sliding window: the 4-D mask replaces the window, so
    the pass would attend further back than the model does."""
    config = language_model.config
    window = getattr(config, "sliding_window", None)
    if window and "sliding_attention" in (getattr(config, "layer_types", None) or []) and sequence_length > window:
        raise ValueError(
            f"The scoring pass ({sequence_length} tokens: prompt + answer trie) is longer than the language model's "
            f"sliding window ({window} tokens), which the one-pass scoring mask does not reproduce; the scores "
            "would be silently wrong. Use smaller images (a lower max_pixels) or a model without sliding windows."
        )


__all__ = [
    "ADAPTERS",
    "NO_SPLIT_MODULES",
    "SUPPORTED_VLM_FAMILIES",
    "ImageEmbeds",
    "check_attention_backend",
    "check_sliding_window",
    "get_adapter",
    "mask_unsafe_reason",
]
