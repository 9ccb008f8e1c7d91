# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD image processor (remote code): every model input from images alone, prompt included.

The stock image-classification pipeline passes only the image processor's output to the model, so this processor
also writes the tokenised classification prompt around the right number of image placeholder tokens. The prompt is
tokenised once, when the processor is built from the VLM's processor (`from_vlm_processor`), and stored as ids.
"""

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import BatchFeature
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

# Qwen2-VL's resizer rejects aspect ratios above 200; images are padded to stay below this.
MAX_ASPECT_RATIO = 100


def _describe(image) -> str:
    name = getattr(image, "filename", None)
    return repr(name) if name else f"<{type(image).__name__} {getattr(image, 'mode', '')} {getattr(image, 'size', '')}>"


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file; any failure is a `ValueError` that names the file."""
    path = str(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.copy() if image is not None else image
    except FileNotFoundError:
        raise ValueError(f"Image file not found: {path!r}") from None
    except Exception as error:  # PIL raises many types: UnidentifiedImageError, OSError (truncated), SyntaxError...
        size = os.path.getsize(path) if os.path.exists(path) else None
        reason = "the file is empty (0 bytes)" if size == 0 else f"{type(error).__name__}: {error}"
        raise ValueError(f"Could not read image {path!r}: {reason}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode (RGB, L, P, RGBA, LA, CMYK, I;16, I, F, ...) to 8-bit RGB.

    Transparent pixels are composited onto white; high-bit-depth and float images are rescaled to their own
    min-max range instead of being clipped at 255 (PIL's plain `convert` turns most 16-bit images white).
    """
    try:
        image.load()
    except Exception as error:
        raise ValueError(f"Could not decode image {_describe(image)}: {type(error).__name__}: {error}") from error
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(array.round().astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _limit_aspect_ratio(image: Image.Image) -> Image.Image:
    width, height = image.size
    if max(width, height) <= MAX_ASPECT_RATIO * min(width, height):
        return image
    target = (max(width, -(-height // MAX_ASPECT_RATIO)), max(height, -(-width // MAX_ASPECT_RATIO)))
    canvas = Image.new("RGB", target, (255, 255, 255))
    canvas.paste(image, ((target[0] - width) // 2, (target[1] - height) // 2))
    return canvas


class EmoVLMKDImageProcessor(Qwen2VLImageProcessor):
    r"""
    Image processor of EmoVLM-KD. Does what the Qwen2-VL image processor does (dynamic resolution, patchify) and also
    builds the prompt: `input_ids` (left-padded), `attention_mask` and `mm_token_type_ids` with one image placeholder
    per LM-ready image embedding.

    Args:
        prompt_prefix_ids (`list[int]`): prompt tokens before the image placeholders (chat template, vision start).
        prompt_suffix_ids (`list[int]`): prompt tokens after them (vision end, question, assistant turn header).
        image_token_id (`int`): the VLM's image placeholder token.
        pad_token_id (`int`): token used for left padding of batches.
        Other arguments are those of `Qwen2VLImageProcessor` (`size`, `patch_size`, `merge_size`, ...).

    Inputs may be PIL images of any mode and size, numpy arrays, tensors, or paths to image files.
    """

    model_input_names = ["pixel_values", "image_grid_thw", "input_ids", "attention_mask", "mm_token_type_ids"]

    def __init__(
        self,
        prompt_prefix_ids: list[int] | None = None,
        prompt_suffix_ids: list[int] | None = None,
        image_token_id: int | None = None,
        pad_token_id: int = 0,
        **kwargs,
    ):
        kwargs.pop("padding_value", None)
        kwargs.pop("padding_side", None)
        super().__init__(**kwargs)
        self.prompt_prefix_ids = list(prompt_prefix_ids or [])
        self.prompt_suffix_ids = list(prompt_suffix_ids or [])
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        # Read by the pipelines' batch collator: left-pad `input_ids` with the pad token.
        self.padding_value = pad_token_id
        self.padding_side = "left"

    @classmethod
    def from_vlm_processor(cls, vlm_processor, config, **kwargs) -> "EmoVLMKDImageProcessor":
        """Build from a VLM processor (e.g. `Qwen2VLProcessor`) and an `EmoVLMKDConfig`: the classification chat of
        `config.chat_messages` rendered with the processor's chat template and tokenised around the image."""
        if not hasattr(config, "prompt_token_ids"):
            raise TypeError(
                f"from_vlm_processor takes the model's EmoVLMKDConfig (it defines the whole chat), got {type(config)}"
            )
        tokenizer = vlm_processor.tokenizer
        prefix_ids, suffix_ids = config.prompt_token_ids("classification", vlm_processor)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        image_processor_config = vlm_processor.image_processor.to_dict()
        for key in ("image_processor_type", "processor_class", "auto_map", "_processor_class"):
            image_processor_config.pop(key, None)
        image_processor_config.update(kwargs)
        return cls(
            prompt_prefix_ids=prefix_ids,
            prompt_suffix_ids=suffix_ids,
            image_token_id=vlm_processor.image_token_id,
            pad_token_id=pad_token_id,
            **image_processor_config,
        )

    def to_dict(self):
        output = super().to_dict()
        # This processor alone produces every model input, so it is also what AutoProcessor should load.
        if "AutoImageProcessor" in output.get("auto_map", {}):
            output["auto_map"]["AutoProcessor"] = output["auto_map"]["AutoImageProcessor"]
        return output

    def _prepare_image(self, image):
        if isinstance(image, (str, os.PathLike, Path)):
            image = load_image(image)
        if isinstance(image, Image.Image):
            return _limit_aspect_ratio(to_rgb(image))
        if isinstance(image, (np.ndarray, torch.Tensor)):
            return image
        raise TypeError(f"Unsupported image input of type {type(image).__name__}; pass a PIL image, array or path")

    def preprocess(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("No images given")
        images = [self._prepare_image(image) for image in images]
        vision = super().preprocess(images, return_tensors="pt", **kwargs)
        num_image_tokens = (vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()
        text = self.build_prompt_ids(num_image_tokens)
        return BatchFeature(data={**vision, **text}, tensor_type=return_tensors)

    def build_prompt_ids(self, num_image_tokens: list[int]) -> dict[str, torch.Tensor]:
        """Left-padded prompt ids with `n` image placeholders for each `n` in `num_image_tokens`."""
        if self.image_token_id is None:
            raise ValueError("This image processor has no prompt; build it with `from_vlm_processor`.")
        sequences = [self.prompt_prefix_ids + [self.image_token_id] * n + self.prompt_suffix_ids for n in num_image_tokens]
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, length - len(sequence) :] = torch.tensor(sequence)
            attention_mask[row, length - len(sequence) :] = 1
        mm_token_type_ids = ((input_ids == self.image_token_id) & attention_mask.bool()).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}


EmoVLMKDImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["EmoVLMKDImageProcessor", "load_image", "to_rgb"]
