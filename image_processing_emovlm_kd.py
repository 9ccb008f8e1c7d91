# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD image processor (remote code): every model input from images alone, prompt included.

The stock image-classification pipeline passes only the image processor's output to the model, so this processor
also writes the tokenised classification prompt around the right number of image placeholder tokens. The prompt is
tokenised once, when the processor is built from the VLM's processor (`from_vlm_processor`), and stored as ids.

This file is also the one place that decides how an image is decoded and prepared, for training and inference
alike (the pipeline, the Endpoint handler and the Space app reach it through the loaded processor's methods):
`open_image` decodes raster formats only (`RASTER_FORMATS`; never PostScript or PDF, which PIL would hand to
Ghostscript) after checking the pixel count from the header, and `prepare_image` turns any accepted input into what
the VLM is shown.
"""

import base64
import binascii
import contextlib
import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import BatchFeature
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

# Qwen2-VL's resizer rejects aspect ratios above 200; images are padded to stay below this.
MAX_ASPECT_RATIO = 100
# Raster formats only: PIL's EPS plugin runs Ghostscript (an interpreter) on the file's bytes, so no decode here
# ever lets PIL pick a plugin by itself.
RASTER_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "PPM", "TIFF", "WEBP")
# Read from the header before decoding; 40 megapixels (e.g. 8000 x 5000) keep one image's decode and conversion
# within a few hundred MB, where PIL's own limit (89M pixels, an error only above 179M) lets one image cost gigabytes.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# The reference implementation caps the VLM's images at 1024 px on the longest side (LANCZOS) before its processor.
DEFAULT_MAX_IMAGE_SIDE = 1024
PIXEL_LIMIT_HINT = (
    "raise the `max_image_pixels` setting (the image processor's, in preprocessor_config.json; the Endpoint handler "
    "and the Space app also read $EMOVLM_KD_MAX_IMAGE_PIXELS)"
)
# Signatures of the documents most often disguised as images, for an error that says what the file is.
_NON_RASTER_SIGNATURES = {b"%!PS": "PostScript/EPS", b"\xc5\xd0\xd3\xc6": "EPS", b"%PDF": "PDF", b"<svg": "SVG"}


def _describe(image) -> str:
    name = getattr(image, "filename", None)
    if name:
        return repr(name)
    return f"<{type(image).__name__} {getattr(image, 'mode', '')} {getattr(image, 'size', '')}>"


def _source_name(source, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    file_name = getattr(source, "name", None)
    return repr(file_name) if isinstance(file_name, str) else f"<{type(source).__name__}>"


def _check_size(size: tuple[int, int], name: str, max_pixels: int | None):
    width, height = size
    if max_pixels and width * height > max_pixels:
        raise ValueError(
            f"Image {name} is {width} x {height} = {width * height:,} pixels, more than the limit of {max_pixels:,} "
            f"(a guard against decompression bombs); to accept it, {PIXEL_LIMIT_HINT}"
        )


@contextlib.contextmanager
def _binary_file(source, name: str):
    """A binary file object over a path, bytes or file object; files are closed on exit, the decoded image stays."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ValueError(f"Could not read image {name}: the data is empty (0 bytes)")
        yield io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        try:
            file = open(source, "rb")
        except FileNotFoundError:
            if os.path.islink(source):
                raise ValueError(f"Image file {name} is a broken symbolic link (to {os.readlink(source)!r})") from None
            raise ValueError(f"Image file not found: {name}") from None
        except OSError as error:
            raise ValueError(f"Could not read image {name}: {type(error).__name__}: {error}") from None
        with file:
            if os.fstat(file.fileno()).st_size == 0:
                raise ValueError(f"Could not read image {name}: the file is empty (0 bytes)")
            yield file
    elif hasattr(source, "read"):
        yield source
    else:
        raise TypeError(f"Cannot open image {name} of type {type(source).__name__}: pass a path, bytes or a file")


def _open_header(file, name: str, max_pixels: int | None) -> Image.Image:
    """PIL's lazily opened image (only the header read) after the format and size checks."""
    try:
        image = Image.open(file, formats=RASTER_FORMATS)
    except Image.DecompressionBombError as error:  # PIL refuses sizes above twice its own limit while opening
        raise ValueError(
            f"Image {name} is too large: {error} To accept it, raise PIL.Image.MAX_IMAGE_PIXELS and {PIXEL_LIMIT_HINT}"
        ) from None
    except Exception as error:  # UnidentifiedImageError, OSError, SyntaxError...
        raise ValueError(f"Could not read image {name}: {_unreadable_reason(file, error)}") from error
    _check_size(image.size, name, max_pixels)
    return image


def _unreadable_reason(file, error: Exception) -> str:
    try:
        file.seek(0)
        head = file.read(16)
    except (OSError, ValueError):
        head = b""
    for signature, kind in _NON_RASTER_SIGNATURES.items():
        if head.lstrip().startswith(signature):
            return f"it is a {kind} document, not a raster image (accepted formats: {', '.join(RASTER_FORMATS)})"
    if isinstance(error, UnidentifiedImageError):
        return (
            f"cannot identify an image in an accepted format ({', '.join(RASTER_FORMATS)}) in data starting with "
            f"{head[:12]!r}"
        )
    return f"{type(error).__name__}: {error}"


def decode_base64_image(text: str, name: str = "image") -> bytes:
    """The bytes of an image sent as base64 text (a `data:<type>;base64,` URL is accepted, whitespace ignored).
    Nothing is decoded as an image here; a `ValueError` names the input when the text is not valid base64."""
    text = text.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise ValueError(f"{name} is a data URL without ';base64' ({header[:40]!r}): only base64 data URLs work")
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{name} is not valid base64 ({len(text)} characters from {text[:20]!r}): {error}") from None
    if not raw:
        raise ValueError(f"{name} decodes to 0 bytes: send a base64-encoded image")
    return raw


def check_image_header(
    source, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[str, tuple[int, int]]:
    """`(format, (width, height))` of an image given as a path, bytes or binary file object, from its header only.

    Raises a `ValueError` naming the input when it is not in `RASTER_FORMATS` or has more than `max_pixels` pixels
    (None or 0: no limit). No pixel is decoded, so this is cheap even for a decompression bomb.
    """
    name = _source_name(source, name)
    with _binary_file(source, name) as file:
        image = _open_header(file, name, max_pixels)
        return image.format, image.size


def open_image(source, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image given as a path, bytes or binary file object, in a format of `RASTER_FORMATS` only.

    The format and the size (at most `max_pixels` pixels; None or 0: no limit) are checked from the header before
    any pixel is decoded; the EXIF orientation is applied. Every failure is a `ValueError` that names the input
    (`name`, by default the path).
    """
    name = _source_name(source, name)
    with _binary_file(source, name) as file:
        return _decode(_open_header(file, name, max_pixels), name, max_pixels, apply_orientation=True)


def verify_image(source, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """Check that an image decodes completely (what `open_image` would accept), for the least memory: the header
    is checked first and JPEGs are decoded at 1/8 scale (their decoder still reads every byte). `ValueError` naming
    the input when it does not."""
    name = _source_name(source, name)
    with _binary_file(source, name) as file:
        image = _open_header(file, name, max_pixels)
        image.draft(image.mode, (1, 1))  # a no-op for formats without reduced decoding
        _decode(image, name, max_pixels=None)


def _decode(image: Image.Image, name: str, max_pixels: int | None, apply_orientation: bool = False) -> Image.Image:
    try:
        image.load()
        if apply_orientation:
            ImageOps.exif_transpose(image, in_place=True)
    except Exception as error:  # OSError (truncated), SyntaxError, struct.error... from the decoders
        raise ValueError(f"Could not read image {name}: {type(error).__name__}: {error}") from error
    _check_size(image.size, name, max_pixels)  # a few formats only learn their true size while decoding
    return image


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
        return _rescale_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if image.mode != "RGBA":
            image = image.convert("RGBA")
        # Pasting through the alpha band onto white: one RGB canvas, not the three RGBA copies of alpha_composite.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image)
        return background
    return image.convert("RGB")


def _rescale_to_rgb(image: Image.Image, rows_per_strip: int = 256) -> Image.Image:
    """A high-bit-depth or float image stretched over its own min-max range to 8 bits, strip by strip (a float64
    copy of a whole large image would cost 8 bytes a pixel)."""
    low, high = image.getextrema()
    gray = np.zeros((image.height, image.width), dtype=np.uint8)
    for top in range(0, image.height, rows_per_strip):
        bottom = min(top + rows_per_strip, image.height)
        strip = np.asarray(image.crop((0, top, image.width, bottom)), dtype=np.float64)
        if not np.isfinite(strip).all():
            raise ValueError(f"Image {_describe(image)} contains NaN or infinite values")
        if high > low:
            gray[top:bottom] = ((strip - low) / (high - low) * 255.0).round()
    return Image.fromarray(gray).convert("RGB")


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


def array_to_image(array, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A numpy array or tensor of pixels as a PIL image, validated: shape `(H, W)`, `(H, W, C)` or `(C, H, W)` with
    C in 1, 3 or 4 (channels last when both ends could be channels), finite values in [0, 255] or, for floats, in
    [0, 1] (rescaled to [0, 255], as transformers' processors take them)."""
    shape = tuple(array.shape)
    name = name or f"<{type(array).__name__} of shape {shape}>"
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(f"Image array {name} has shape {shape}: expected (H, W), (H, W, C) or (C, H, W)")
    if array.ndim == 3:
        if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
        elif array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"Image array {name} has shape {shape}: expected 1, 3 or 4 channels, first or last")
        if array.shape[-1] == 1:
            array = array[..., 0]
    if array.size == 0:
        raise ValueError(f"Image array {name} is empty (shape {shape})")
    _check_size((array.shape[1], array.shape[0]), name, max_pixels)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"Image array {name} has dtype {array.dtype}: expected integers, floats or booleans")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"Image array {name} contains NaN or infinite values")
    low, high = array.min().item(), array.max().item()
    if np.issubdtype(array.dtype, np.floating) and low >= 0 and high <= 1:
        array = array * 255.0
    elif low < 0 or high > 255:
        raise ValueError(f"Image array {name} has values in [{low}, {high}]: expected [0, 255], or floats in [0, 1]")
    if array.dtype != np.uint8:
        array = np.rint(array).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def _check_pil_image(image: Image.Image, name: str, max_pixels: int | None):
    # An image PIL opened lazily decodes on first use: its format must pass the same allow-list as a file's.
    # (PIL's JPEG opener returns the multi-picture JPEGs many cameras write as "MPO".)
    if image.format is not None and image.format not in (*RASTER_FORMATS, "MPO"):
        raise ValueError(
            f"Image {name} is in the {image.format} format, which is not accepted (accepted formats: "
            f"{', '.join(RASTER_FORMATS)}); to use an image you decoded yourself, pass `image.convert('RGB')`"
        )
    _check_size(image.size, name, max_pixels)


def prepare_image(
    image,
    name: str | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
) -> Image.Image:
    """The image the VLM is shown, the same in training and inference: decoded under the raster-format allow-list
    and the pixel limit (`open_image`, `array_to_image`), converted to 8-bit RGB (`to_rgb`), shrunk to at most
    `max_image_side` on its longest side (`limit_longest_side`) and padded with white to an aspect ratio of at most
    100:1 (Qwen2-VL refuses 200:1).

    Args:
        image: a path, bytes, binary file object, PIL image of any mode, numpy array or tensor.
        name: how errors name the input (default: its path, or a description).
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(image, "read"):
        image = open_image(image, name, max_image_pixels)
    elif isinstance(image, Image.Image):
        _check_pil_image(image, name or _describe(image), max_image_pixels)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        image = array_to_image(image, name, max_image_pixels)
    else:
        raise TypeError(
            f"Unsupported image input {name or ''} of type {type(image).__name__}; pass a PIL image, array, "
            "path or bytes"
        )
    return _limit_aspect_ratio(limit_longest_side(to_rgb(image), max_image_side))


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
        image_processor_config = vlm_processor.image_processor.to_dict()
        for key in ("image_processor_type", "processor_class", "auto_map", "_processor_class"):
            image_processor_config.pop(key, None)
        image_processor_config.update(kwargs)
        return cls(
            prompt_prefix_ids=prefix_ids,
            prompt_suffix_ids=suffix_ids,
            image_token_id=vlm_processor.image_token_id,
            pad_token_id=padding_token_id(tokenizer),
            **image_processor_config,
        )

    def to_dict(self):
        output = super().to_dict()
        # This processor alone produces every model input, so it is also what AutoProcessor should load.
        if "AutoImageProcessor" in output.get("auto_map", {}):
            output["auto_map"]["AutoProcessor"] = output["auto_map"]["AutoImageProcessor"]
        return output

    def open_image(self, source, name: str | None = None) -> Image.Image:
        """`open_image` under this processor's pixel limit (raster formats only, checked before decoding)."""
        return open_image(source, name, self.max_image_pixels)

    def decode_base64(self, text: str, name: str = "image") -> bytes:
        """`decode_base64_image`: the bytes of a base64 image string or `data:` URL (not yet decoded as an image)."""
        return decode_base64_image(text, name)

    def check_image_header(self, source, name: str | None = None) -> tuple[str, tuple[int, int]]:
        """`check_image_header` under this processor's pixel limit: format and size, no pixel decoded."""
        return check_image_header(source, name, self.max_image_pixels)

    def prepare_image(self, image, name: str | None = None) -> Image.Image:
        """`prepare_image` with this processor's pixel limit and longest-side cap: what the VLM is shown."""
        return prepare_image(image, name, self.max_image_pixels, self.max_image_side)

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
