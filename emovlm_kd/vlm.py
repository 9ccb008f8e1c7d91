"""Building models from a VLM: a Hub checkpoint, a local folder (a stage-1 output), or the built-in tiny model."""

import os

TINY = "tiny"
# The built-in tiny VLMs by name (`--vlm tiny-qwen3-vl`) and their family (built by `emovlm_kd.tiny`, imported lazily).
TINY_VLM_FAMILIES = {
    "tiny": "qwen2_vl",
    "tiny-qwen2-vl": "qwen2_vl",
    "tiny-qwen2.5-vl": "qwen2_5_vl",
    "tiny-qwen3-vl": "qwen3_vl",
}


def is_tiny_vlm(name_or_path) -> bool:
    """Whether `name_or_path` names a built-in tiny VLM (`tiny`, `tiny-qwen3-vl`, ...) rather than a checkpoint."""
    return name_or_path in TINY_VLM_FAMILIES


def load_vlm_and_processor(name_or_path: str, dtype="auto", seed: int = 0, **model_kwargs):
    """Return `(vlm, vlm_processor)`.

    `name_or_path` is an `AutoModelForImageTextToText` checkpoint (e.g. `Qwen/Qwen2-VL-7B-Instruct`, the paper's VLM,
    `Qwen/Qwen3-VL-2B-Instruct`, or a folder written by a previous stage), or a built-in tiny random-init model with
    an offline tokenizer (seconds on CPU; used by the tests and the quickstart): `"tiny"` (Qwen2-VL architecture),
    `"tiny-qwen2.5-vl"`, `"tiny-qwen3-vl"`.
    """
    if is_tiny_vlm(name_or_path):
        from emovlm_kd.tiny import build_tiny_vlm, build_tiny_vlm_processor

        family = TINY_VLM_FAMILIES[name_or_path]
        processor = build_tiny_vlm_processor(family=family)
        return build_tiny_vlm(processor, seed=seed, family=family), processor

    from transformers import AutoModelForImageTextToText, AutoProcessor

    if os.path.isdir(name_or_path) and not os.path.exists(os.path.join(name_or_path, "config.json")):
        raise ValueError(f"{name_or_path!r} is a folder without config.json: not a saved VLM")
    processor = AutoProcessor.from_pretrained(name_or_path)
    vlm = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, **model_kwargs)
    return vlm, processor


def build_emovlm_kd(
    vlm: str, class_names: list[str], seed: int = 0, dtype="auto", max_image_side: int | None = None, **config_kwargs
):
    """Load a VLM (`"tiny"`, a Hub name or a folder) and wrap it with a fresh head and gate for `class_names`:
    `(model, image_processor, vlm_processor)`. `config_kwargs` are `EmoVLMKDConfig` fields; `max_image_side` is the
    image processor's cap on the longest side (None: its default, 0: no cap)."""
    from image_processing_emovlm_kd import EmoVLMKDImageProcessor
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    vlm_model, vlm_processor = load_vlm_and_processor(vlm, dtype=dtype, seed=seed)
    model = EmoVLMKDForImageClassification.from_vlm(vlm_model, vlm_processor, list(class_names), **config_kwargs)
    image_settings = {} if max_image_side is None else {"max_image_side": max_image_side}
    image_processor = EmoVLMKDImageProcessor.from_vlm_processor(vlm_processor, model.config, **image_settings)
    return model.eval(), image_processor, vlm_processor


__all__ = ["TINY", "TINY_VLM_FAMILIES", "build_emovlm_kd", "is_tiny_vlm", "load_vlm_and_processor"]
