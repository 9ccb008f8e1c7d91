# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD image decoding (remote code): the one place that turns untrusted bytes into a PIL image.

Every door an image comes through (the image processor, hence the pipeline, the Endpoint handler and the Space app,
and the training stages' data loaders) decodes it here, under the same rules:

* raster formats only (`RASTER_FORMATS`): never PostScript or PDF, which PIL would hand to Ghostscript;
* regular files only: a named pipe or a device named `photo.png` is refused instead of blocking or reading forever;
* what the decoder will cost is bounded from the header, before any pixel is decoded: at most `max_pixels` pixels,
  at most `MAX_IMAGE_DIMENSION` pixels on a side (a 1 x 40,000,000 strip costs gigabytes to resize), a TIFF declares
  no more strips or tiles than its size needs (`tiff_block_problem`) and a JPEG has at most `MAX_JPEG_SCANS` scans;
* optionally a decode time budget (`max_seconds`), checked as the decoder reads its input;
* high-bit-depth and float images must hold finite values (`to_rgb`).

`image_processing_emovlm_kd` builds the model inputs (geometry and prompt) on top of this file.
"""

import base64
import binascii
import contextlib
import io
import math
import os
import stat
import struct
import time

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Raster formats only: PIL's EPS plugin runs Ghostscript (an interpreter) on the file's bytes, so no decode here
# ever lets PIL pick a plugin by itself.
RASTER_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "PPM", "TIFF", "WEBP")
# Read from the header before decoding; 40 megapixels (e.g. 8000 x 5000) keep one image's decode and conversion
# within a few hundred MB, where PIL's own limit (89M pixels, an error only above 179M) lets one image cost gigabytes.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
PIXEL_LIMIT_HINT = (
    "raise the `max_image_pixels` setting (the image processor's, in processor_config.json; the Endpoint handler "
    "and the Space app also read $EMOVLM_KD_MAX_IMAGE_PIXELS)"
)
# No side longer than this, whatever the pixel count: a 1 x 40,000,000 PNG (78 KB) costs gigabytes and seconds in
# LANCZOS resizing (its coefficients grow with the shrink factor). 65,535 is JPEG's and WebP's own format limit.
MAX_IMAGE_DIMENSION = 65_535
# libjpeg's progressive scripts use about 10 scans; each scan is a pass over the whole image, so a file repeating one
# scan 1000 times (223 KB) costs tens of seconds.
MAX_JPEG_SCANS = 100
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
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
    if max(width, height) > MAX_IMAGE_DIMENSION:
        raise ValueError(
            f"Image {name} is {width} x {height} pixels: a side longer than {MAX_IMAGE_DIMENSION:,} pixels is refused "
            "(it would cost gigabytes to resize whatever its pixel count; `MAX_IMAGE_DIMENSION`)"
        )
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
        with _regular_file(source, name) as file:
            yield file
    elif hasattr(source, "read"):
        yield source
    else:
        raise TypeError(f"Cannot open image {name} of type {type(source).__name__}: pass a path, bytes or a file")


@contextlib.contextmanager
def _regular_file(path, name: str):
    """A regular file opened for reading. Opening never blocks (`O_NONBLOCK`: a named pipe would wait for a writer
    forever) and anything but a regular file (pipe, device, socket, folder) is refused before a byte is read."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise ValueError(f"Image file {name} is a broken symbolic link (to {os.readlink(path)!r})") from None
        raise ValueError(f"Image file not found: {name}") from None
    except OSError as error:
        raise ValueError(f"Could not read image {name}: {type(error).__name__}: {error}") from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):
        os.close(descriptor)
        kind = "a named pipe" if stat.S_ISFIFO(status.st_mode) else "a folder, device or socket"
        raise ValueError(f"Could not read image {name}: it is {kind}, not a regular file")
    with open(descriptor, "rb") as file:
        if status.st_size == 0:
            raise ValueError(f"Could not read image {name}: the file is empty (0 bytes)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
        yield file


class DecodeTimeout(TimeoutError, ValueError):
    """An image took longer to decode than its budget: a `ValueError` too, since the input is at fault."""


class _TimedReader:
    """A file whose reads fail once `seconds` have passed since it was opened: PIL's decoders read their input in
    blocks (64 KB), so this bounds a decode's time from any thread (a signal would only reach the main thread).
    No `fileno`: libtiff would read the descriptor itself, unchecked."""

    def __init__(self, file, seconds: float, name: str):
        self._file, self._seconds, self._name = file, seconds, name
        self._deadline = time.monotonic() + seconds

    def _check(self):
        if time.monotonic() > self._deadline:
            raise DecodeTimeout(
                f"Image {self._name} took more than {self._seconds:g} s to decode (the decode time budget, "
                "`max_decode_seconds`); send a smaller or simpler image"
            )

    def read(self, *args):
        self._check()
        return self._file.read(*args)

    def readline(self, *args):
        self._check()
        return self._file.readline(*args)

    def fileno(self):
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, attribute):
        return getattr(self._file, attribute)


def _open_header(file, name: str, max_pixels: int | None) -> Image.Image:
    """PIL's lazily opened image (only the header read) after the format, size and structure checks."""
    problem = _structure_problem(file, max_pixels)
    if problem:
        raise ValueError(f"Image {name} is refused before decoding: {problem}")
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


def _structure_problem(file, max_pixels: int | None, from_start: bool = False) -> str | None:
    """What makes the file cost more than its size says, found without PIL (whose TIFF reader builds one Python
    object per declared strip while opening): too many TIFF strips or tiles, too many JPEG scans. None when fine."""
    position = file.tell()
    start = 0 if from_start else position
    try:
        file.seek(start)
        head = file.read(4)
        file.seek(start)
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return tiff_block_problem(file, start, max_pixels)
        if head[:2] == b"\xff\xd8":
            scans = jpeg_scan_count(file)
            if scans > MAX_JPEG_SCANS:
                return (
                    f"a JPEG with {scans:,} scans (at most {MAX_JPEG_SCANS}; each scan is a pass over the whole "
                    "image, a progressive JPEG needs about 10)"
                )
        return None
    finally:
        file.seek(position)


def jpeg_scan_count(file, chunk_size: int = 1 << 20) -> int:
    """The number of scans (SOS markers) of the JPEG in `file` after its first one, plus one; an EXIF thumbnail's
    scan (inside an APP segment, before the image's first scan) is skipped. Entropy-coded data never holds the SOS
    marker (a 0xFF byte there is followed by 0x00), so counting the marker's bytes is exact."""
    data = file.read(2)
    while True:  # the segments before the first scan: FF xx, a 2-byte length, the payload
        marker = file.read(4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return 0  # not a JPEG PIL can decode: PIL reports it
        if marker[1] == 0xDA:
            break
        file.seek(struct.unpack(">H", marker[2:])[0] - 2, os.SEEK_CUR)
    scans, tail = 1, b""
    while data:
        data = file.read(chunk_size)
        scans += (tail + data).count(b"\xff\xda")
        tail = data[-1:]
    return scans


_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}


def _tiff_first_ifd(file, start: int) -> dict[int, tuple[int, int | None]]:
    """`{tag: (count, first value or None)}` of the first image file directory of a TIFF or BigTIFF."""
    file.seek(start)
    head = file.read(16)
    order = "<" if head[:2] == b"II" else ">"
    big = struct.unpack(order + "H", head[2:4])[0] == 43
    # (entry count, value count) formats and the size of an entry: classic TIFF, or BigTIFF's 64-bit fields
    number_format, count_format, entry_size = ("Q", "Q", 20) if big else ("H", "I", 12)
    offset = struct.unpack(order + "Q", head[8:16])[0] if big else struct.unpack(order + "I", head[4:8])[0]
    file.seek(start + offset)
    number = struct.unpack(order + number_format, file.read(struct.calcsize(number_format)))[0]
    entries = file.read(min(number, 1 << 16) * entry_size)
    size = struct.calcsize(count_format)
    tags = {}
    for position in range(0, len(entries) - entry_size + 1, entry_size):
        entry = entries[position : position + entry_size]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        value_count = struct.unpack(order + count_format, entry[4 : 4 + size])[0]
        inline = entry[4 + size :]
        value = None
        if kind in (3, 4, 16) and value_count >= 1 and _TIFF_TYPE_SIZES[kind] <= len(inline):
            value = struct.unpack(order + {3: "H", 4: "I", 16: "Q"}[kind], inline[: _TIFF_TYPE_SIZES[kind]])[0]
        tags[tag] = (value_count, value)
    return tags


def tiff_block_problem(file, start: int = 0, max_pixels: int | None = None) -> str | None:
    """Why a TIFF's first image is refused before PIL opens it, or None: a size over the limits, or more strips or
    tiles than its size needs (a 16 x 16 image declaring 3.9 million strips costs PIL 1 GB and 35 s to open)."""
    try:
        tags = _tiff_first_ifd(file, start)
    except (struct.error, OSError, ValueError, OverflowError):
        return None  # PIL reports what is wrong with it
    width, height = (tags.get(tag, (0, None))[1] or 0 for tag in (256, 257))
    if max(width, height) > MAX_IMAGE_DIMENSION or (max_pixels and width * height > max_pixels):
        return f"a TIFF of {width} x {height} pixels (at most {MAX_IMAGE_DIMENSION:,} a side and the pixel limit)"
    samples = tags.get(277, (0, 1))[1] or 1
    planes = min(samples, 8) if (tags.get(284, (0, 1))[1] == 2) else 1
    if 324 in tags or 325 in tags:
        tile_width, tile_height = (max(tags.get(tag, (0, 16))[1] or 16, 16) for tag in (322, 323))
        needed = math.ceil(width / tile_width) * math.ceil(height / tile_height) * planes
        declared, what = max(tags.get(324, (0,))[0], tags.get(325, (0,))[0]), "tiles"
    else:
        rows_per_strip = max(tags.get(278, (0, height))[1] or height or 1, 1)
        needed = math.ceil(height / rows_per_strip) * planes
        declared, what = max(tags.get(273, (0,))[0], tags.get(279, (0,))[0]), "strips"
    if declared > max(needed, 1):
        return f"a {width} x {height} TIFF declaring {declared:,} {what}, more than the {needed:,} its size needs"
    return None


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


def open_image(
    source,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_seconds: float | None = None,
) -> Image.Image:
    """Decode an image given as a path, bytes or binary file object, in a format of `RASTER_FORMATS` only.

    The format, the size (at most `max_pixels` pixels, None or 0: no limit; at most `MAX_IMAGE_DIMENSION` a side)
    and the structure (TIFF strips, JPEG scans) are checked from the header before any pixel is decoded; the EXIF
    orientation is applied. Every failure is a `ValueError` that names the input (`name`, by default the path); a
    decode that takes longer than `max_seconds` (None or 0: no budget) is a `TimeoutError` (also a `ValueError`
    here: the input's fault).
    """
    name = _source_name(source, name)
    with _binary_file(source, name) as file:
        if max_seconds:
            file = _TimedReader(file, max_seconds, name)
        return _decode(_open_header(file, name, max_pixels), name, max_pixels, apply_orientation=True)


def verify_image(source, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """Check that an image decodes completely (what `open_image` would accept), for the least memory: the header
    is checked first and JPEGs are decoded at 1/8 scale (their decoder still reads every byte). `ValueError` naming
    the input when it does not."""
    name = _source_name(source, name)
    with _binary_file(source, name) as file:
        image = _open_header(file, name, max_pixels)
        image.draft(image.mode, (1, 1))  # a no-op for formats without reduced decoding
        image = _decode(image, name, max_pixels=None)
        if image.mode in HIGH_BIT_MODES:
            _rescale_to_rgb(image, name)  # the same value checks as when the image is prepared (finite values)


def _decode(image: Image.Image, name: str, max_pixels: int | None, apply_orientation: bool = False) -> Image.Image:
    try:
        image.load()
        if apply_orientation:
            ImageOps.exif_transpose(image, in_place=True)
    except DecodeTimeout:
        raise
    except Exception as error:  # OSError (truncated), SyntaxError, struct.error... from the decoders
        raise ValueError(f"Could not read image {name}: {type(error).__name__}: {error}") from error
    _check_size(image.size, name, max_pixels)  # a few formats only learn their true size while decoding
    return image


def to_rgb(image: Image.Image, name: str | None = None) -> Image.Image:
    """Convert a PIL image of any mode (RGB, L, P, RGBA, LA, CMYK, I;16, I, F, ...) to 8-bit RGB.

    Transparent pixels are composited onto white; high-bit-depth and float images are rescaled to their own
    min-max range instead of being clipped at 255 (PIL's plain `convert` turns most 16-bit images white); NaN or
    infinite values are a `ValueError` naming the image (`name`, by default its file name or a description).
    """
    name = name or _describe(image)
    try:
        image.load()
    except Exception as error:
        raise ValueError(f"Could not decode image {name}: {type(error).__name__}: {error}") from error
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_BIT_MODES:
        return _rescale_to_rgb(image, name)
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


def _rescale_to_rgb(image: Image.Image, name: str, rows_per_strip: int = 256) -> Image.Image:
    """A high-bit-depth or float image stretched over its own min-max range to 8 bits, strip by strip (a float64
    copy of a whole large image would cost 8 bytes a pixel)."""
    low, high = image.getextrema()
    gray = np.zeros((image.height, image.width), dtype=np.uint8)
    for top in range(0, image.height, rows_per_strip):
        bottom = min(top + rows_per_strip, image.height)
        strip = np.asarray(image.crop((0, top, image.width, bottom)), dtype=np.float64)
        if not np.isfinite(strip).all():
            raise ValueError(f"Image {name} contains NaN or infinite values")
        if high > low:
            gray[top:bottom] = ((strip - low) / (high - low) * 255.0).round()
    return Image.fromarray(gray).convert("RGB")


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


def check_pil_image(image: Image.Image, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """Refuse a PIL image whose format, size or (when not decoded yet) structure would not pass as a file."""
    name = name or _describe(image)
    # An image PIL opened lazily decodes on first use: its format must pass the same allow-list as a file's.
    # (PIL's JPEG opener returns the multi-picture JPEGs many cameras write as "MPO".)
    if image.format is not None and image.format not in (*RASTER_FORMATS, "MPO"):
        raise ValueError(
            f"Image {name} is in the {image.format} format, which is not accepted (accepted formats: "
            f"{', '.join(RASTER_FORMATS)}); to use an image you decoded yourself, pass `image.convert('RGB')`"
        )
    _check_size(image.size, name, max_pixels)
    file = getattr(image, "fp", None)  # still to be decoded: its structure is checked like a file's
    if file is not None and image.format in ("JPEG", "MPO", "TIFF"):
        problem = _structure_problem(file, max_pixels, from_start=True)
        if problem:
            raise ValueError(f"Image {name} is refused before decoding: {problem}")


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "MAX_IMAGE_DIMENSION",
    "MAX_JPEG_SCANS",
    "RASTER_FORMATS",
    "DecodeTimeout",
    "array_to_image",
    "check_image_header",
    "check_pil_image",
    "decode_base64_image",
    "jpeg_scan_count",
    "open_image",
    "tiff_block_problem",
    "to_rgb",
    "verify_image",
]
