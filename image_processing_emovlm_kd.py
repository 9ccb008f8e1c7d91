# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD image processor (remote code): every model input from images alone, prompt included.

The stock image-classification pipeline passes only the image processor's output to the model, so this processor
also writes the tokenised classification prompt around the right number of image placeholder tokens. The prompt is
tokenised once, when the processor is built from the VLM's processor (`from_vlm_processor`), and stored as ids.

Images are decoded by `image_decoding_emovlm_kd` (raster formats only, sizes and structure checked before decoding);
`prepare_image` here turns any accepted input into what the VLM is shown (RGB, longest side capped, aspect ratio
padded), for training and inference alike: the pipeline, the Endpoint handler and the Space app reach it through
the loaded processor's methods.
"""

import os

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

try:
    from .image_decoding_emovlm_kd import (
        DEFAULT_MAX_IMAGE_PIXELS,
        RASTER_FORMATS,
        array_to_image,
        check_image_header,
        check_pil_image,
        decode_base64_image,
        open_image,
        to_rgb,
        verify_image,
    )
except ImportError:  # imported from the installed package rather than from a model folder
    from image_decoding_emovlm_kd import (
        DEFAULT_MAX_IMAGE_PIXELS,
        RASTER_FORMATS,
        array_to_image,
        check_image_header,
        check_pil_image,
        decode_base64_image,
        open_image,
        to_rgb,
        verify_image,
    )

# Qwen2-VL's resizer rejects aspect ratios above 200; images are padded to stay below this.
MAX_ASPECT_RATIO = 100
# The reference implementation caps the VLM's images at 1024 px on the longest side (LANCZOS) before its processor.
DEFAULT_MAX_IMAGE_SIDE = 1024


def _limit_aspect_ratio(image: Image.Image) -> Image.Image:
    width, height = image.size
    if max(width, height) <= MAX_ASPECT_RATIO * min(width, height):
        return image
    target = (max(width, -(-height // MAX_ASPECT_RATIO)), max(height, -(-width // MAX_ASPECT_RATIO)))
    canvas = Image.new("RGB", target, (255, 255, 255))
    canvas.paste(image, ((target[0] - width) // 2, (target[1] - height) // 2))
    return canvas


def limit_longest_side(image: Image.Image, max_side: int | None = DEFAULT_MAX_IMAGE_SIDE) -> Image.Image:
    """Shrink `image` (LANCZOS, aspect ratio kept) so that its longest side is `max_side`, as the reference
    implementation does before its VLM processor; smaller images and `max_side` None or 0 leave it unchanged."""
    width, height = image.size
    if not max_side or max(width, height) <= max_side:
        return image
    if width > height:
        size = (max_side, max(1, int(max_side / width * height)))
    else:
        size = (max(1, int(max_side / height * width)), max_side)
    return image.resize(size, Image.Resampling.LANCZOS)


def prepare_image(
    image,
    name: str | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
    max_decode_seconds: float | None = None,
) -> Image.Image:
    """The image the VLM is shown, the same in training and inference: decoded under the raster-format allow-list,
    the pixel limit and the structure checks (`open_image`, `array_to_image`; within `max_decode_seconds` when
    given), converted to 8-bit RGB (`to_rgb`), shrunk to at most `max_image_side` on its longest side
    (`limit_longest_side`) and padded with white to an aspect ratio of at most 100:1 (Qwen2-VL refuses 200:1).

    Args:
        image: a path, bytes, binary file object, PIL image of any mode, numpy array or tensor.
        name: how errors name the input (default: its path, or a description).
    """
    if isinstance(image, (str, os.PathLike)):
        name = name or repr(os.fspath(image))  # errors after decoding (`to_rgb`) name the file too
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(image, "read"):
        image = open_image(image, name, max_image_pixels, max_decode_seconds)
    elif isinstance(image, Image.Image):
        check_pil_image(image, name, max_image_pixels)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        image = array_to_image(image, name, max_image_pixels)
    else:
        raise TypeError(
            f"Unsupported image input {name or ''} of type {type(image).__name__}; pass a PIL image, array, "
            "path or bytes"
        )
    return _limit_aspect_ratio(limit_longest_side(to_rgb(image, name), max_image_side))


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
        max_image_pixels (`int`, defaults to 40,000,000): larger images are refused, from their header, before
            decoding (a guard against decompression bombs); None or 0: no limit beyond PIL's own.
        max_image_side (`int`, defaults to 1024): images are first shrunk (LANCZOS) to at most this many pixels on
            their longest side, as the reference implementation does; None or 0: no cap.
        max_decode_seconds (`float`, *optional*): the time one image may take to decode (a `TimeoutError` naming
            it otherwise; the Endpoint handler sets one); None or 0: no budget.
        **kwargs: the arguments of `Qwen2VLImageProcessor` (`size`, `patch_size`, `merge_size`, ...).

    Inputs may be PIL images of any mode and size, numpy arrays, tensors, paths to image files or their bytes; each
    goes through `prepare_image` (also used by instruction tuning, so training and inference see the same pixels).
    """

    model_input_names = ["pixel_values", "image_grid_thw", "input_ids", "attention_mask", "mm_token_type_ids"]

    def __init__(
        self,
        prompt_prefix_ids: list[int] | None = None,
        prompt_suffix_ids: list[int] | None = None,
        image_token_id: int | None = None,
        pad_token_id: int = 0,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
        max_decode_seconds: float | None = None,
        **kwargs,
    ):
        kwargs.pop("padding_value", None)
        kwargs.pop("padding_side", None)
        super().__init__(**kwargs)
        self.prompt_prefix_ids = list(prompt_prefix_ids or [])
        self.prompt_suffix_ids = list(prompt_suffix_ids or [])
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.max_image_pixels = max_image_pixels
        self.max_image_side = max_image_side
        self.max_decode_seconds = max_decode_seconds
        # Read by the pipelines' batch collator: left-pad `input_ids` with the pad token.
        self.padding_value = pad_token_id
        self.padding_side = "left"

    @classmethod
    def from_vlm_processor(cls, vlm_processor, config, **kwargs) -> "EmoVLMKDImageProcessor":
        """The image processor of `EmoVLMKDProcessor.from_vlm_processor(vlm_processor, config, **kwargs)`, where the
        classification chat is rendered and tokenised around the image."""
        try:
            from .processing_emovlm_kd import EmoVLMKDProcessor
        except ImportError:  # imported from the installed package rather than from a model folder
            from processing_emovlm_kd import EmoVLMKDProcessor
        return EmoVLMKDProcessor.from_vlm_processor(vlm_processor, config, **kwargs).image_processor

    def open_image(self, source, name: str | None = None) -> Image.Image:
        """`open_image` under this processor's pixel limit (raster formats only, checked before decoding)."""
        return open_image(source, name, self.max_image_pixels, self.max_decode_seconds)

    def decode_base64(self, text: str, name: str = "image") -> bytes:
        """`decode_base64_image`: the bytes of a base64 image string or `data:` URL (not yet decoded as an image)."""
        return decode_base64_image(text, name)

    def check_image_header(self, source, name: str | None = None) -> tuple[str, tuple[int, int]]:
        """`check_image_header` under this processor's pixel limit: format and size, no pixel decoded."""
        return check_image_header(source, name, self.max_image_pixels)

    def prepare_image(self, image, name: str | None = None) -> Image.Image:
        """`prepare_image` with this processor's pixel limit and longest-side cap: what the VLM is shown."""
        return prepare_image(image, name, self.max_image_pixels, self.max_image_side, self.max_decode_seconds)

    def preprocess(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("No images given")
        images = [self.prepare_image(image) for image in images]
        vision = super().preprocess(images, return_tensors="pt", **kwargs)
        num_image_tokens = (vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()
        text = self.build_prompt_ids(num_image_tokens)
        return BatchFeature(data={**vision, **text}, tensor_type=return_tensors)

    def build_prompt_ids(self, num_image_tokens: list[int]) -> dict[str, torch.Tensor]:
        """Left-padded prompt ids with `n` image placeholders for each `n` in `num_image_tokens`."""
        if self.image_token_id is None:
            raise ValueError("This image processor has no prompt; build it with `from_vlm_processor`.")
        return left_padded_prompts(
            self.prompt_prefix_ids, self.prompt_suffix_ids, self.image_token_id, self.pad_token_id, num_image_tokens
        )


def padding_token_id(tokenizer) -> int:
    """The id prompts are left-padded with: the tokenizer's padding token, else its end of sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_padded_prompts(
    prefix_ids: list[int], suffix_ids: list[int], image_token_id: int, pad_token_id: int, num_image_tokens: list[int]
) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and `mm_token_type_ids` of the prompts `prefix + n image placeholders +
    suffix`, one per `n` in `num_image_tokens`, left-padded to the longest."""
    sequences = [prefix_ids + [image_token_id] * n + suffix_ids for n in num_image_tokens]
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, length - len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, length - len(sequence) :] = 1
    mm_token_type_ids = ((input_ids == image_token_id) & attention_mask.bool()).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}


EmoVLMKDImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_IMAGE_SIDE",
    "RASTER_FORMATS",
    "EmoVLMKDImageProcessor",
    "array_to_image",
    "check_image_header",
    "decode_base64_image",
    "left_padded_prompts",
    "limit_longest_side",
    "open_image",
    "padding_token_id",
    "prepare_image",
    "to_rgb",
    "verify_image",
]
