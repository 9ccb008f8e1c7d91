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

Scores are the softmax of the model's `logits`, which carry the calibration temperature fitted on validation data
(`config.calibration_temperature`): a score of 0.8 means right about 8 times in 10 on data like the validation split.
`classifier(image, min_score=0.6)` answers "uncertain" (`"label": None`) when the top score is below 0.6 (see
`EmoVLMKDImageClassificationPipeline`).

Explanations are opt-in: `classifier(image, explain=True)` also asks the VLM for its own reasoning about the image
(`explain_task="observation"`: the key visual elements it sees), generated from the classification's vision pass
(see `EmoVLMKDImageClassificationPipeline.__call__`). Without `explain=True` nothing is generated.
"""

import math
import os
import re
import time

import torch
from huggingface_hub.utils import httpx  # the HTTP client transformers itself fetches images with
from transformers.pipelines import ImageClassificationPipeline

try:
    from .configuration_emovlm_kd import EXPLANATION_TASKS
except ImportError:  # imported from the installed package rather than from a model folder
    from configuration_emovlm_kd import EXPLANATION_TASKS

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


def check_min_score(min_score) -> float:
    """`min_score` as a float; `ValueError` unless it is a number in [0, 1]."""
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not 0 <= min_score <= 1:
        raise ValueError(f"min_score must be a number in [0, 1] (a class probability), got {min_score!r}")
    return float(min_score)


def check_finite_logits(logits: torch.Tensor):
    """`ValueError` when the model's logits hold NaN or infinite values: no score can be given for them."""
    if not torch.isfinite(logits).all():
        raise ValueError(
            "The model returned non-finite logits (NaN or inf): no class scores can be given (a corrupted checkpoint, "
            "or an overflow in a low-precision dtype?)"
        )


def selective_answer(predictions: list[dict], min_score: float) -> dict:
    """The answer with a minimum score: the top class, or `label` None (`uncertain`) when its score is below it."""
    top = predictions[0]
    uncertain = not top["score"] >= min_score or math.isnan(top["score"])
    return {
        "label": None if uncertain else top["label"],
        "score": top["score"],
        "uncertain": uncertain,
        "predictions": predictions,
    }


class EmoVLMKDImageClassificationPipeline(ImageClassificationPipeline):
    """`pipeline("image-classification", model=repo, trust_remote_code=True)` for EmoVLM-KD models.

    Called as the stock image-classification pipeline, it returns the standard `[{"label", "score"}, ...]` per image.
    With `explain=True`, each image's result becomes a dictionary:

    ```python
    {
        "predictions": [{"label": "fear", "score": 0.71}, ...],  # exactly what the call without `explain` returns
        "explanation": "The dark clouds over the empty field ...",  # the VLM's own words, verbatim
        "explanation_labels": ["fear"],  # the classes the text names, as whole words, in order; [] when none
    }
    ```

    An explanation is generated text, not a fact about the image: it may name no class, or a class other than the
    predicted one. It is never rewritten; compare `explanation_labels` with `predictions` to flag disagreement.

    With `min_score` (selective prediction), each image's result is a dictionary that answers "uncertain" instead of
    a class when the top score is below `min_score`:

    ```python
    {
        "label": "fear",  # the top class; None when its score is below min_score ("uncertain")
        "score": 0.71,  # the top class's score, also when uncertain
        "uncertain": False,  # True when score < min_score
        "predictions": [{"label": "fear", "score": 0.71}, ...],  # exactly what the call without min_score returns
    }
    ```

    (with `explain=True` too, the same dictionary also holds `explanation` and `explanation_labels`). Scores are
    calibrated probabilities (`config.calibration_temperature`); the model card's risk-coverage table says which
    `min_score` kept which share of the test images, and how accurate they were.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.explain_by_default = kwargs.get("explain", False)  # `pipeline(..., explain=True)`: every call explains

    def __call__(self, inputs=None, **kwargs):
        r"""Classify the image(s) as [`ImageClassificationPipeline`] does (`top_k`, `function_to_apply`, `timeout`).

        Args:
            explain (`bool`, *optional*, defaults to `False`):
                Also generate the VLM's explanation of every image (greedy; from the same vision pass as the scores,
                which stay exactly as they are without it).
            explain_task (`str`, *optional*, defaults to `"inference"`):
                With `explain=True`: `"inference"`, the reasoning from the image towards the emotion, or
                `"observation"`, the key visual elements; asked with the prompts the VLM was instruction-tuned on.
            max_new_tokens (`int`, *optional*):
                With `explain=True`: the generation budget per image (`config.max_new_tokens` by default, 256).
            min_score (`float` in [0, 1], *optional*):
                Answer "uncertain" (`"label": None`) for an image whose top score is below it (see the class).
        """
        explaining = kwargs.get("explain", self.explain_by_default)
        given = sorted({"explain_task", "max_new_tokens"} & set(kwargs))
        if given and not explaining:
            raise ValueError(f"{given} only apply with explain=True")
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, explain=None, explain_task=None, max_new_tokens=None, min_score=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if min_score is not None:
            function = postprocess_params.get("function_to_apply")
            if function is not None and getattr(function, "value", function) != "softmax":
                raise ValueError(f"min_score applies to softmax probabilities, not function_to_apply={function!r}")
            postprocess_params["min_score"] = check_min_score(min_score)
        if explain is not None:
            if not isinstance(explain, bool):
                raise ValueError(f"explain must be True or False, got {explain!r}")
            forward_params["explain"] = explain
        if explain_task is not None:
            if explain_task not in EXPLANATION_TASKS:
                raise ValueError(f"explain_task must be one of {EXPLANATION_TASKS}, got {explain_task!r}")
            forward_params["explain_task"] = explain_task
        if max_new_tokens is not None:
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
            forward_params["max_new_tokens"] = max_new_tokens
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image, timeout=None):
        if isinstance(image, str) and not os.path.exists(image):
            if image.startswith(("http://", "https://")):
                raw = download(image, DEFAULT_URL_TIMEOUT if timeout is None else timeout)
                image = self.image_processor.open_image(raw, name=f"downloaded from {image!r}")
            elif image.startswith("data:") or (len(image) > 64 and _BASE64.match(image)):
                kind = "data URL" if image.startswith("data:") else "base64 string"
                raw = self.image_processor.decode_base64(image, name=f"<{kind}>")
                image = self.image_processor.open_image(raw, name=f"<{kind}>")
            # anything else is taken as a path, which the image processor reports as not found
        return self.image_processor(images=image, return_tensors="pt").to(self.dtype)

    def _forward(self, model_inputs, explain=False, explain_task="inference", max_new_tokens=None):
        if not explain:
            return self.model(**model_inputs)
        outputs = self.model(**model_inputs, output_image_hidden_states=True)
        texts = self.model.explain(
            **model_inputs,
            task=explain_task,
            max_new_tokens=max_new_tokens,
            image_hidden_states=outputs.image_hidden_states,
        )
        # a list of strings per batch, which the pipeline's batching splits into one string per image
        return {"logits": outputs.logits, "explanation": texts}

    def postprocess(self, model_outputs, min_score=None, **kwargs):
        check_finite_logits(model_outputs["logits"])
        predictions = super().postprocess(model_outputs, **kwargs)
        result = {} if min_score is None else selective_answer(predictions, min_score)
        if "explanation" not in model_outputs:
            return result or predictions
        text = model_outputs["explanation"]
        text = text if isinstance(text, str) else text[0]
        return {
            **result,
            "predictions": predictions,
            "explanation": text,
            "explanation_labels": self.model.config.labels_named_in(text),
        }


__all__ = [
    "DEFAULT_URL_TIMEOUT",
    "EmoVLMKDImageClassificationPipeline",
    "MAX_DOWNLOAD_BYTES",
    "check_min_score",
    "download",
    "selective_answer",
]
