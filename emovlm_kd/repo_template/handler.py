# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""Custom handler for Hugging Face Inference Endpoints, shipped in every exported EmoVLM-KD model repo.

It needs only PyPI packages (torch, transformers, pillow); the model code comes from the repo (`trust_remote_code`).

Request::

    {"inputs": <image or list of images>, "parameters": {"top_k": 3}}

An image is a base64 string (a `data:image/...;base64,` prefix is accepted), raw bytes, or a PIL image (what the
inference toolkit passes when the request body is sent with an `image/*` content type). URLs are refused: the
endpoint never fetches anything. `top_k` defaults to every class.

Response: `[{"label": "awe", "score": 0.61}, ...]` sorted by decreasing score; a list of such lists for a list of
images. Bad input raises `ValueError` naming the offending item.
"""

import base64
import binascii
import io

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import AutoImageProcessor, AutoModelForImageClassification

SUPPORTED_PARAMETERS = ("top_k",)


class EndpointHandler:
    """Loads the model and its image processor once; each call classifies all its images in batched forwards.

    Args:
        path (`str`): the model repo folder (Inference Endpoints pass the repository's local path).
        device (`str`, *optional*): defaults to `cuda` when available, else `cpu`.
        max_batch_size (`int`, defaults to 16): larger requests run in chunks of this size.
    """

    def __init__(self, path: str = "", device: str | None = None, max_batch_size: int = 16):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForImageClassification.from_pretrained(path or ".", trust_remote_code=True, dtype="auto")
        self.model.to(self.device).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(path or ".", trust_remote_code=True)
        config = self.model.config
        self.labels = [config.id2label[index] for index in range(config.num_labels)]
        self.max_batch_size = max_batch_size

    def __call__(self, data: dict) -> list:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError(f"The request must be a JSON object with an 'inputs' field, got {_preview(data)}")
        top_k = self._top_k(data.get("parameters"))
        inputs = data["inputs"]
        batched = isinstance(inputs, (list, tuple))
        items = list(inputs) if batched else [inputs]
        if not items:
            raise ValueError("'inputs' is an empty list: send at least one image")
        images = [decode_image(item, f"inputs[{index}]" if batched else "inputs") for index, item in enumerate(items)]
        results = [self._ranked(row, top_k) for row in self.predict_proba(images)]
        return results if batched else results[0]

    @torch.inference_mode()
    def predict_proba(self, images: list[Image.Image]) -> torch.Tensor:
        """Fused class probabilities `(len(images), num_labels)`, in chunks of `max_batch_size` images."""
        chunks = []
        for start in range(0, len(images), self.max_batch_size):
            inputs = self.image_processor(images[start : start + self.max_batch_size], return_tensors="pt")
            logits = self.model(**inputs.to(self.device)).logits
            chunks.append(logits.float().softmax(dim=-1).cpu())
        return torch.cat(chunks)

    def _top_k(self, parameters) -> int:
        if parameters is None:
            return len(self.labels)
        if not isinstance(parameters, dict):
            raise ValueError(f"'parameters' must be an object like {{\"top_k\": 3}}, got {_preview(parameters)}")
        unknown = sorted(set(parameters) - set(SUPPORTED_PARAMETERS))
        if unknown:
            raise ValueError(f"Unknown parameter(s) {unknown}; supported: {list(SUPPORTED_PARAMETERS)}")
        top_k = parameters.get("top_k", len(self.labels))
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"'top_k' must be a positive integer, got {top_k!r}")
        return min(top_k, len(self.labels))

    def _ranked(self, probabilities: torch.Tensor, top_k: int) -> list[dict]:
        scores, indices = probabilities.topk(top_k)
        return [{"label": self.labels[i], "score": float(s)} for s, i in zip(scores.tolist(), indices.tolist())]


def decode_image(item, name: str = "inputs") -> Image.Image:
    """A decoded PIL image from a PIL image, raw bytes or a base64 string; `ValueError` naming `name` otherwise."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str):
        raw = _decode_base64(item, name)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        raw = bytes(item)
        if not raw:
            raise ValueError(f"{name} is empty (0 bytes): send the bytes of an image file")
        if not _looks_like_image(raw):  # JSON clients sometimes send the base64 text as raw bytes
            try:
                raw = _decode_base64(raw.decode("ascii"), name)
            except (UnicodeDecodeError, ValueError):
                pass  # not base64 either: let PIL report what it is
    else:
        raise ValueError(
            f"{name} must be a base64-encoded image string or raw image bytes, got {type(item).__name__}"
        )
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return ImageOps.exif_transpose(image).copy()
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        unknown = isinstance(error, UnidentifiedImageError)
        reason = "not a known image format" if unknown else f"{type(error).__name__}: {error}"
        raise ValueError(
            f"{name} is not a readable image ({len(raw)} bytes starting with {raw[:12]!r}): {reason}"
        ) from error


def _decode_base64(text: str, name: str) -> bytes:
    text = text.strip()
    if not text:
        raise ValueError(f"{name} is an empty string: send a base64-encoded image")
    if text.lower().startswith(("http://", "https://", "ftp://", "file:")):
        raise ValueError(f"{name} is a URL ({text[:80]!r}); this endpoint fetches nothing: send the image in base64")
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


def _looks_like_image(raw: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(raw)):
            return True
    except Exception:
        return False


def _preview(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
