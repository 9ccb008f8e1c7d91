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

Scores are calibrated probabilities: the model's logits carry the temperature fitted on validation data
(`config.calibration_temperature`).

Selective prediction (opt-in): `"parameters": {"min_score": 0.6}` (a number in [0, 1]) answers "uncertain" for an
image whose top score is below it. Each image's result then becomes::

    {"label": "awe", "score": 0.61, "uncertain": false, "predictions": [{"label": "awe", "score": 0.61}, ...]}

`label` is the top class, or null when `score` (the top class's score, always given) is below `min_score`, with
`uncertain` true; `predictions` is exactly the response without `min_score`. With `explain` as well, the same object
also holds `explanation` and `explanation_labels`.

Explanations (opt-in): `"parameters": {"explain": true}` also generates the VLM's own reasoning about each image,
from the classification's vision pass; `"explain_task": "observation"` asks for the key visual elements instead, and
`"max_new_tokens"` sets the generation budget per image. Each image's result then becomes::

    {"predictions": [{"label": "awe", "score": 0.61}, ...], "explanation": "...", "explanation_labels": ["awe"]}

`predictions` is exactly the response without `explain`; `explanation` is the generated text, verbatim (the model's
own words, not ground truth); `explanation_labels` lists the classes the text names as whole words (in order; `[]`
when none), so a client can flag an explanation that disagrees with the scores.

Limits (constructor arguments, or environment variables of the endpoint; 0 disables one):
  * `max_images_per_request` (`$EMOVLM_KD_MAX_IMAGES_PER_REQUEST`, default 64);
  * `max_request_bytes` (`$EMOVLM_KD_MAX_REQUEST_BYTES`, default 32 MiB of image data; base64 text counts for the
    bytes it encodes);
  * `max_image_pixels` (`$EMOVLM_KD_MAX_IMAGE_PIXELS`, default the image processor's, 40 megapixels), read from each
    image's header before anything is decoded;
  * `max_explanation_tokens` (`$EMOVLM_KD_MAX_EXPLANATION_TOKENS`, default 256): the most tokens generated for one
    image's explanation; a request asking for more is refused, and a request that does not say gets
    `min(config.max_new_tokens, max_explanation_tokens)`;
  * `max_decode_seconds` (`$EMOVLM_KD_MAX_DECODE_SECONDS`, default 10): the time one image may take to decode.
Images whose decoding would cost more than their size says are refused from their header too (a side over 65,535
pixels, TIFF strips or tiles beyond what the size needs, JPEGs of over 100 scans). A request nested too deeply is a
`ValueError`; a model that produces NaN or infinite scores (corrupt weights) a `RuntimeError`, never a NaN score.
Images are decoded only in the formats the image processor accepts (raster formats: JPEG, PNG, GIF, WebP, BMP,
TIFF, PPM; never PostScript or PDF, which PIL would hand to Ghostscript), one at a time as each chunk of
`max_batch_size` images is classified, so a request costs at most one full-size decoded image at a time.
"""

import os
import reprlib

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

SUPPORTED_PARAMETERS = ("top_k", "explain", "explain_task", "max_new_tokens", "min_score")
EXPLANATION_TASKS = ("inference", "observation")  # the config's; this file imports none of the model's code
DEFAULT_MAX_IMAGES_PER_REQUEST = 64
DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
DEFAULT_MAX_EXPLANATION_TOKENS = 256
DEFAULT_MAX_DECODE_SECONDS = 10


class EndpointHandler:
    """Loads the model and its image processor once; each call classifies all its images in batched forwards.

    Args:
        path (`str`): the model repo folder (Inference Endpoints pass the repository's local path).
        device (`str`, *optional*): defaults to `cuda` when available, else `cpu`.
        max_batch_size (`int`, defaults to 16): larger requests run in chunks of this size.
        max_images_per_request (`int`, *optional*): defaults to `$EMOVLM_KD_MAX_IMAGES_PER_REQUEST`, else 64.
        max_request_bytes (`int`, *optional*): image data per request; defaults to `$EMOVLM_KD_MAX_REQUEST_BYTES`,
            else 32 MiB.
        max_image_pixels (`int`, *optional*): defaults to `$EMOVLM_KD_MAX_IMAGE_PIXELS`, else the image
            processor's `max_image_pixels`.
        max_explanation_tokens (`int`, *optional*): tokens generated per image explanation at most; defaults to
            `$EMOVLM_KD_MAX_EXPLANATION_TOKENS`, else 256.
        max_decode_seconds (`int`, *optional*): seconds one image may take to decode; defaults to
            `$EMOVLM_KD_MAX_DECODE_SECONDS`, else 10.
    """

    def __init__(
        self,
        path: str = "",
        device: str | None = None,
        max_batch_size: int = 16,
        max_images_per_request: int | None = None,
        max_request_bytes: int | None = None,
        max_image_pixels: int | None = None,
        max_explanation_tokens: int | None = None,
        max_decode_seconds: int | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForImageClassification.from_pretrained(path or ".", trust_remote_code=True, dtype="auto")
        self.model.to(self.device).eval()
        # The model's own image processor (remote code from the repo) holds the decoding policy: formats, pixel
        # limit, preparation. The handler adds only what is per request.
        self.image_processor = AutoImageProcessor.from_pretrained(path or ".", trust_remote_code=True)
        if not hasattr(self.image_processor, "decode_base64"):
            raise RuntimeError(
                f"{type(self.image_processor).__name__} in {path or '.'!r} predates this handler (it has no "
                "`decode_base64`): export the model again so that handler.py and image_processing_emovlm_kd.py match"
            )
        max_image_pixels = _limit(max_image_pixels, "EMOVLM_KD_MAX_IMAGE_PIXELS", None)
        if max_image_pixels is not None:
            self.image_processor.max_image_pixels = max_image_pixels
        # read by the image processor's decoding (one exported before the budget existed ignores it)
        self.image_processor.max_decode_seconds = _limit(
            max_decode_seconds, "EMOVLM_KD_MAX_DECODE_SECONDS", DEFAULT_MAX_DECODE_SECONDS
        )
        config = self.model.config
        self.labels = config.labels
        self.max_batch_size = max_batch_size
        self.max_images_per_request = _limit(
            max_images_per_request, "EMOVLM_KD_MAX_IMAGES_PER_REQUEST", DEFAULT_MAX_IMAGES_PER_REQUEST
        )
        self.max_request_bytes = _limit(max_request_bytes, "EMOVLM_KD_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES)
        self.max_explanation_tokens = _limit(
            max_explanation_tokens, "EMOVLM_KD_MAX_EXPLANATION_TOKENS", DEFAULT_MAX_EXPLANATION_TOKENS
        )

    def __call__(self, data: dict) -> list:
        try:
            return self._answer(data)
        except RecursionError:  # e.g. a JSON body nested 1000 deep
            raise ValueError("The request is nested too deeply: send {'inputs': <image or list of images>}") from None

    def _answer(self, data: dict) -> list:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError(f"The request must be a JSON object with an 'inputs' field, got {_preview(data)}")
        top_k, explanation = self._parameters(data.get("parameters"))
        min_score = _min_score(data.get("parameters"))
        inputs = data["inputs"]
        batched = isinstance(inputs, (list, tuple))
        items = list(inputs) if batched else [inputs]
        if not items:
            raise ValueError("'inputs' is an empty list: send at least one image")
        if self.max_images_per_request and len(items) > self.max_images_per_request:
            raise ValueError(
                f"The request holds {len(items)} images, more than the limit of {self.max_images_per_request}: send "
                "fewer per request (or raise the handler's max_images_per_request, $EMOVLM_KD_MAX_IMAGES_PER_REQUEST)"
            )
        names = [f"inputs[{index}]" if batched else "inputs" for index in range(len(items))]
        total = sum(_payload_bytes(item, name) for item, name in zip(items, names))
        if self.max_request_bytes and total > self.max_request_bytes:
            raise ValueError(
                f"The request holds {total:,} bytes of image data, more than the limit of {self.max_request_bytes:,}: "
                "send fewer or smaller images (or raise the handler's max_request_bytes, $EMOVLM_KD_MAX_REQUEST_BYTES)"
            )
        # Every image's format and size are checked from its header before any image is decoded.
        images = [self.read_image(item, name) for item, name in zip(items, names)]
        probabilities, texts = self.predict(images, names, explanation)
        results = [self._ranked(row, top_k) for row in probabilities]
        if min_score is not None:
            results = [_selective_answer(ranked, min_score) for ranked in results]
        if texts is not None:
            results = [
                {
                    **(result if min_score is not None else {"predictions": result}),
                    "explanation": text,
                    "explanation_labels": self.model.config.labels_named_in(text),
                }
                for result, text in zip(results, texts)
            ]
        return results if batched else results[0]

    def read_image(self, item, name: str = "inputs") -> Image.Image | bytes:
        """The image bytes of a request item (or the PIL image the toolkit passes), after a header-only check of
        their format and size; `ValueError` naming `name` otherwise."""
        if isinstance(item, Image.Image):
            return item  # opened lazily by the toolkit; checked before decoding in `prepare_image`
        if isinstance(item, str):
            raw = self._decode_base64(item, name)
        else:
            raw = bytes(item)
            if not raw:
                raise ValueError(f"{name} is empty (0 bytes): send the bytes of an image file")
        try:
            self.image_processor.check_image_header(raw, name)
        except ValueError as error:
            if isinstance(item, str) or not raw.isascii():
                raise
            try:  # JSON clients sometimes send the base64 text as raw bytes
                raw = self._decode_base64(raw.decode("ascii"), name)
            except ValueError:
                raise error from None
            self.image_processor.check_image_header(raw, name)
        return raw

    def _decode_base64(self, text: str, name: str) -> bytes:
        """A request's base64 image text to bytes (the image processor's rules), refusing URLs: nothing is fetched."""
        text = text.strip()
        if not text:
            raise ValueError(f"{name} is an empty string: send a base64-encoded image")
        if text.lower().startswith(("http://", "https://", "ftp://", "file:")):
            raise ValueError(
                f"{name} is a URL ({text[:80]!r}); this endpoint fetches nothing: send the image in base64"
            )
        return self.image_processor.decode_base64(text, name)

    @torch.inference_mode()
    def predict(self, images: list, names: list[str] | None = None, explanation: dict | None = None):
        """Fused class probabilities `(len(images), num_labels)`, in chunks of `max_batch_size` images; each image
        (PIL image, bytes or path) is decoded and prepared only when its chunk runs, one at a time.

        Returns `(probabilities, texts)`: `texts` is None, or with `explanation` (`{"task": ..., "max_new_tokens":
        ...}`, keyword arguments of the model's `explain`) the VLM's explanation of every image, generated from the
        classification's vision pass.
        """
        names = names or [f"images[{index}]" for index in range(len(images))]
        chunks, texts = [], None if explanation is None else []
        for start in range(0, len(images), self.max_batch_size):
            chunk = zip(images[start : start + self.max_batch_size], names[start : start + self.max_batch_size])
            prepared = [self.image_processor.prepare_image(image, name) for image, name in chunk]
            inputs = self.image_processor(prepared, return_tensors="pt").to(self.device)
            outputs = self.model(**inputs, output_image_hidden_states=explanation is not None)
            if not torch.isfinite(outputs.logits).all():
                raise RuntimeError(
                    "The model returned non-finite logits (NaN or infinite scores): its weights hold non-finite "
                    "values (a corrupt or diverged checkpoint) or a low-precision dtype overflowed; no score is returned"
                )
            chunks.append(outputs.logits.float().softmax(dim=-1).cpu())
            if explanation is not None:
                texts += self.model.explain(**inputs, image_hidden_states=outputs.image_hidden_states, **explanation)
        return torch.cat(chunks), texts

    def _parameters(self, parameters) -> tuple[int, dict | None]:
        """`top_k`, and the explanation settings (`None`: no explanation) of a request's parameters."""
        if parameters is None:
            return len(self.labels), None
        if not isinstance(parameters, dict):
            raise ValueError(f"'parameters' must be an object like {{\"top_k\": 3}}, got {_preview(parameters)}")
        unknown = sorted(set(parameters) - set(SUPPORTED_PARAMETERS))
        if unknown:
            raise ValueError(f"Unknown parameter(s) {unknown}; supported: {list(SUPPORTED_PARAMETERS)}")
        top_k = parameters.get("top_k", len(self.labels))
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"'top_k' must be a positive integer, got {top_k!r}")
        return min(top_k, len(self.labels)), self._explanation(parameters)

    def _explanation(self, parameters: dict) -> dict | None:
        explain = parameters.get("explain", False)
        if not isinstance(explain, bool):
            raise ValueError(f"'explain' must be true or false, got {explain!r}")
        if not explain:
            given = sorted(set(parameters) & {"explain_task", "max_new_tokens"})
            if given:
                raise ValueError(f'{given} only apply with "explain": true')
            return None
        task = parameters.get("explain_task", "inference")
        if task not in EXPLANATION_TASKS:
            raise ValueError(f"'explain_task' must be one of {list(EXPLANATION_TASKS)}, got {task!r}")
        cap = self.max_explanation_tokens
        default = self.model.config.max_new_tokens
        max_new_tokens = parameters.get("max_new_tokens", min(default, cap) if cap else default)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"'max_new_tokens' must be a positive integer, got {max_new_tokens!r}")
        if cap and max_new_tokens > cap:
            raise ValueError(
                f"'max_new_tokens' is {max_new_tokens}, more than the limit of {cap} tokens per explanation: ask for "
                "fewer (or raise the handler's max_explanation_tokens, $EMOVLM_KD_MAX_EXPLANATION_TOKENS)"
            )
        return {"task": task, "max_new_tokens": max_new_tokens}

    def _ranked(self, probabilities: torch.Tensor, top_k: int) -> list[dict]:
        scores, indices = probabilities.topk(top_k)
        return [{"label": self.labels[i], "score": float(s)} for s, i in zip(scores.tolist(), indices.tolist())]


def _min_score(parameters) -> float | None:
    """A request's `min_score` (None when not given); `ValueError` unless it is a number in [0, 1]."""
    value = (parameters or {}).get("min_score")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"'min_score' must be a number in [0, 1] (a class probability), got {value!r}")
    return float(value)


def _selective_answer(ranked: list[dict], min_score: float) -> dict:
    """The top class of `ranked` (highest score first), or `label` None (`uncertain`) when its score is below
    `min_score`."""
    uncertain = not ranked[0]["score"] >= min_score
    return {
        "label": None if uncertain else ranked[0]["label"],
        "score": ranked[0]["score"],
        "uncertain": uncertain,
        "predictions": ranked,
    }


def _limit(value: int | None, variable: str, default: int | None) -> int | None:
    """A limit from the constructor, else from the environment variable, else the default."""
    if value is None and os.environ.get(variable, "").strip():
        try:
            value = int(os.environ[variable])
        except ValueError:
            raise ValueError(f"${variable} must be an integer (0: no limit), got {os.environ[variable]!r}") from None
    value = default if value is None else value
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        setting = variable.removeprefix("EMOVLM_KD_").lower()
        raise ValueError(f"The handler's {setting} must be an integer >= 0 (0: no limit), got {value!r}")
    return value


def _payload_bytes(item, name: str) -> int:
    """The image data an item carries (base64 text: the bytes it encodes), without decoding it."""
    if isinstance(item, Image.Image):
        return 0  # the toolkit already read the request body; its pixels are limited by max_image_pixels
    if isinstance(item, str):
        return len(item) * 3 // 4
    if isinstance(item, (bytes, bytearray, memoryview)):
        return len(item)
    raise ValueError(f"{name} must be a base64-encoded image string or raw image bytes, got {type(item).__name__}")


_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def _preview(value) -> str:
    text = _REPR.repr(value)  # bounded depth: a deeply nested body is previewed, not recursed into
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
