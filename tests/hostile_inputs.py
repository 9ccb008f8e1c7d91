"""Hostile and broken image inputs, generated small (never committed): documents disguised as images, decompression
bombs, truncated files, and a fake Ghostscript that records whether PIL ever ran it."""

import io
import os
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
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
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
