# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD image-classification pipeline (remote code).

The stock pipeline converts every image with PIL's `convert("RGB")` before the image processor sees it, which
drops transparency differently from training and clips 16-bit images. This subclass hands paths and PIL images
straight to the model's image processor, so `pipeline(...)`, the processor, the training stages, the Endpoint
handler and the Space all see the same pixels, and unreadable files get errors that name them.
"""

import os
import re

from transformers.image_utils import load_image as load_remote_image
from transformers.pipelines import ImageClassificationPipeline

_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")


def _needs_remote_loader(image) -> bool:
    """URLs, data URLs and bare base64 strings are what transformers' own loader is for."""
    if not isinstance(image, str) or os.path.exists(image):
        return False
    return image.startswith(("http://", "https://", "data:")) or (len(image) > 64 and bool(_BASE64.match(image)))


class EmoVLMKDImageClassificationPipeline(ImageClassificationPipeline):
    """`pipeline("image-classification", model=repo, trust_remote_code=True)` for EmoVLM-KD models."""

    def preprocess(self, image, timeout=None):
        if _needs_remote_loader(image):
            image = load_remote_image(image, timeout=timeout)
        return self.image_processor(images=image, return_tensors="pt").to(self.dtype)


__all__ = ["EmoVLMKDImageClassificationPipeline"]
