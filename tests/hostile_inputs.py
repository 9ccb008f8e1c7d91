"""Hostile and broken image inputs, generated small (never committed): documents disguised as images, decompression
bombs, truncated files, and a fake Ghostscript that records whether PIL ever ran it."""

import io
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import EpsImagePlugin, Image

# PostScript-family documents under raster names. PIL's EPS plugin opens the first three (and would run Ghostscript
# on them when decoding); none of them is an image this package may decode.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nnewpath 0 0 moveto 16 16 lineto stroke\n"
DOCUMENTS = {
    "eps": EPS,
    "postscript": b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nshowpage\n",
    "dos_eps": b"\xc5\xd0\xd3\xc6" + struct.pack("<6I", 30, len(EPS), 0, 0, 0, 0) + b"\xff\xff" + EPS,
    "pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16"><rect width="16" height="16"/></svg>',
}
DOCUMENT_NAMES = {"eps": "photo.jpg", "postscript": "scan.png", "dos_eps": "cat.webp", "pdf": "x.jpg", "svg": "y.png"}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, rgb: bool = False) -> bytes:
    """A genuine PNG of one colour, 1-bit or 8-bit RGB: ~110 KB for 30000 x 30000 1-bit pixels, which PIL decodes
    into 900 MB (and 3.6 GB as RGB)."""
    row = b"\x00" + bytes(3 * width if rgb else (width + 7) // 8)
    compressor = zlib.compressobj(9)
    rows_per_block = max(1, 2**20 // len(row))  # the same stream in blocks: fast for 40,000,000 rows too
    blocks = (row * min(rows_per_block, height - start) for start in range(0, height, rows_per_block))
    data = b"".join(compressor.compress(block) for block in blocks) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8 if rgb else 1, 2 if rgb else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims `width` x `height` (a decoder would allocate for that size)."""
    raw = bytearray(image_bytes(Image.new("RGB", (16, 16), (200, 30, 30)), "JPEG"))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def gif_claiming(width: int, height: int) -> bytes:
    """A small GIF whose screen and frame descriptors claim `width` x `height`."""
    raw = bytearray(image_bytes(Image.new("P", (16, 16), 1), "GIF"))
    raw[6:10] = struct.pack("<HH", width, height)
    descriptor = raw.index(b"\x2c\x00\x00\x00\x00")
    raw[descriptor + 5 : descriptor + 9] = struct.pack("<HH", width, height)
    return bytes(raw)


def bmp_claiming(width: int, height: int) -> bytes:
    """A 54-byte BMP header for a 24-bit `width` x `height` image, with no pixels after it."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 3 * width * height, 0, 0, 14 + len(info)) + info


def ppm_claiming(width: int, height: int) -> bytes:
    return f"P6\n{width} {height}\n255\n".encode() + bytes(48)


BOMBS = {  # name -> (bytes maker, width, height)
    "png_30k": (png_bomb, 30000, 30000),
    "png_13k": (png_bomb, 13000, 13000),
    "png_10k": (png_bomb, 10000, 10000),
    "jpeg_13k": (jpeg_claiming, 13000, 13000),
    "gif_13k": (gif_claiming, 13000, 13000),
    "bmp_13k": (bmp_claiming, 13000, 13000),
    "ppm_10k": (ppm_claiming, 10000, 10000),
}


def image_bytes(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def noise_image(size=(96, 64), seed=0) -> Image.Image:
    """Random pixels: they compress badly, so half a file is missing most of its image data."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


TRUNCATED_FORMATS = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}


def truncated(image_format: str) -> bytes:
    raw = image_bytes(noise_image(), image_format)
    return raw[: len(raw) // 2]


class FakeGhostscript:
    """A `gs` first on PATH that only records that it ran: PIL's EPS plugin finds it like the real one."""

    def __init__(self, folder: Path, monkeypatch):
        folder.mkdir(parents=True, exist_ok=True)
        self.marker = folder / "gs-ran"
        script = folder / "gs"
        # PIL probes with `gs --version` (must succeed) before rendering; either call means Ghostscript ran.
        script.write_text(f'#!/bin/sh\necho "$@" >> {self.marker}\n[ "$1" = "--version" ]\n')
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
        monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # found again on the new PATH

    @property
    def ran(self) -> bool:
        return self.marker.exists()


# Cost bombs inside the pixel limit: what the decoder is asked to do is out of proportion to the image's size.
def tiff_image(width: int, height: int, blocks: int | None = None, rows_per_strip: int | None = None, tile=None):
    """An 8-bit grey, uncompressed little-endian TIFF of a gradient, in strips of `rows_per_strip` rows (default:
    one strip) or in `tile` = (width, height) tiles. `blocks` declares that many strips or tiles instead of the
    ones the size needs, all pointing at the same pixel data: 16 x 16 with 3,900,000 strips is a 31 MB file that
    PIL turns into one Python object per strip while merely opening it."""
    if tile:
        across, down = -(-width // tile[0]), -(-height // tile[1])
        block_bytes, needed = tile[0] * tile[1], across * down
    else:
        rows_per_strip = rows_per_strip or height
        needed = -(-height // rows_per_strip)
        block_bytes = rows_per_strip * width
    blocks = needed if blocks is None else blocks
    pixels = bytes(range(256)) * (-(-needed * block_bytes // 256))
    pixels = pixels[: needed * block_bytes]
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (277, 3, 1, 1)]
    offsets_tag, counts_tag = (324, 325) if tile else (273, 279)
    if tile:
        entries += [(322, 3, 1, tile[0]), (323, 3, 1, tile[1])]
    else:
        entries.append((278, 4, 1, rows_per_strip))
    ifd_size = 2 + 12 * (len(entries) + 2) + 4
    data_at = 8 + ifd_size
    arrays_at = data_at + len(pixels)
    offsets = [data_at + (index % needed) * block_bytes for index in range(blocks)]
    counts = [block_bytes] * blocks
    if blocks == 1:
        entries += [(offsets_tag, 4, 1, offsets[0]), (counts_tag, 4, 1, counts[0])]
        arrays = b""
    else:
        entries += [(offsets_tag, 4, blocks, arrays_at), (counts_tag, 4, blocks, arrays_at + 4 * blocks)]
        arrays = struct.pack(f"<{blocks}I", *offsets) + struct.pack(f"<{blocks}I", *counts)
    entries.sort()
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII" if kind == 4 else "<HHIHH", tag, kind, count, value, *([] if kind == 4 else [0]))
        for tag, kind, count, value in entries
    )
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + pixels + arrays


def jpeg_repeating_scan(times: int, size=(8000, 5000), scan: int = 7) -> bytes:
    """A progressive JPEG of a smooth gradient (40 megapixels by default) whose `scan`-th scan (a 36-byte refinement
    scan) is repeated `times` times: every scan is a pass over the whole image, so 230 KB with 1000 repeats cost
    PIL seconds of CPU."""
    gradient = Image.linear_gradient("L").resize(size).convert("RGB")
    raw = image_bytes(gradient, "JPEG", progressive=True, quality=90)
    bounds = [match.start() for match in re.finditer(b"\xff\xda", raw)] + [raw.rindex(b"\xff\xd9")]
    unit = raw[bounds[scan] : bounds[scan + 1]]
    return raw[: bounds[scan + 1]] + unit * (times - 1) + raw[bounds[scan + 1] :]
