# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD image-classification pipeline (remote code).

The stock pipeline converts every image with PIL's `convert("RGB")` before the image processor sees it, which
drops transparency differently from training and clips 16-bit images, and it lets PIL decode any format it knows.
This subclass hands paths, bytes, arrays and PIL images straight to the model's image processor, so `pipeline(...)`,
the processor, the training stages, the Endpoint handler and the Space all decode and prepare images the same way
(raster formats only, pixel limit checked before decoding), and bad inputs get errors that name them.

URLs (http and https only) are downloaded with a timeout of `DEFAULT_URL_TIMEOUT` seconds unless the call gives one
(`classifier(url, timeout=30)`): a server that never answers raises `TimeoutError` instead of hanging. Downloads
larger than `MAX_DOWNLOAD_BYTES` are refused.
"""

import base64
import binascii
import os
import re
import time

from huggingface_hub.utils import httpx  # the HTTP client transformers itself fetches images with
from transformers.pipelines import ImageClassificationPipeline

DEFAULT_URL_TIMEOUT = 10.0
MAX_DOWNLOAD_BYTES = 32 * 2**20
_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")


def download(url: str, timeout: float = DEFAULT_URL_TIMEOUT, max_bytes: int = MAX_DOWNLOAD_BYTES) -> bytes:
    """The body at an http(s) `url`, within about `timeout` seconds in all and at most `max_bytes` bytes."""
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise ValueError(f"Image URL {url!r} serves more than {max_bytes:,} bytes: download it yourself")
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("the whole download took too long")
                chunks.append(chunk)
    except httpx.TimeoutException as error:
        raise TimeoutError(
            f"Image URL {url!r} did not arrive within {timeout} s ({error}); pass a longer `timeout=` to the pipeline "
            "call, or download the image yourself"
        ) from None
    except httpx.HTTPError as error:
        raise ValueError(f"Could not download image URL {url!r}: {type(error).__name__}: {error}") from None
    return b"".join(chunks)


def _decode_base64(text: str, name: str) -> bytes:
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise ValueError(f"The {name} has no ';base64' ({header[:40]!r}): only base64 data URLs are read")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"The {name} is not valid base64 ({len(text)} characters): {error}") from None


class EmoVLMKDImageClassificationPipeline(ImageClassificationPipeline):
    """`pipeline("image-classification", model=repo, trust_remote_code=True)` for EmoVLM-KD models."""

    def preprocess(self, image, timeout=None):
        if isinstance(image, str) and not os.path.exists(image):
            if image.startswith(("http://", "https://")):
                raw = download(image, DEFAULT_URL_TIMEOUT if timeout is None else timeout)
                image = self.image_processor.open_image(raw, name=f"downloaded from {image!r}")
            elif image.startswith("data:") or (len(image) > 64 and _BASE64.match(image)):
                kind = "data URL" if image.startswith("data:") else "base64 string"
                image = self.image_processor.open_image(_decode_base64(image, kind), name=f"<{kind}>")
            # anything else is taken as a path, which the image processor reports as not found
        return self.image_processor(images=image, return_tensors="pt").to(self.dtype)


__all__ = ["DEFAULT_URL_TIMEOUT", "EmoVLMKDImageClassificationPipeline", "MAX_DOWNLOAD_BYTES", "download"]
