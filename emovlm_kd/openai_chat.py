"""A small client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, Ollama, LM Studio, ...).

Retries timeouts, connection errors, 408/409/429 and 5xx with exponential backoff and jitter, honouring the
server's `Retry-After`; every other failure is a [`ChatRequestError`] that says why (and whether it is fatal, i.e.
would fail every request the same way, like a wrong key). Images travel as base64 data URLs.
"""

import base64
import email.utils
import io
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

logger = logging.getLogger(__name__)

# Sent as-is when the server can read them; anything else is re-encoded as JPEG.
DATA_URL_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
FATAL_STATUS = {401: "the API key was rejected", 403: "access is forbidden", 404: "wrong --base-url or --model"}


def is_retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


class ChatRequestError(RuntimeError):
    """A request that failed for good. `fatal`: every other request would fail the same way (stop the run)."""

    def __init__(self, reason: str, attempts: int, status: int | None = None, fatal: bool = False):
        super().__init__(reason)
        self.reason, self.attempts, self.status, self.fatal = reason, attempts, status, fatal


class MalformedResponse(ChatRequestError):
    """HTTP 200, but the body is not a chat completion with a text message."""


@dataclass
class ChatResult:
    content: str
    attempts: int
    finish_reason: str | None = None


@dataclass
class RetryPolicy:
    """`max_retries` retries after the first attempt; the n-th waits `backoff_base * 2**n` seconds (at most
    `backoff_max`) times a random factor in [0.5, 1], or what the server's `Retry-After` asks (at most
    `max_retry_after`)."""

    max_retries: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float = 600.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        return min(self.backoff_max, self.backoff_base * 2**retry) * self.rng.uniform(0.5, 1.0)


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date); None if absent."""
    if "retry-after-ms" in headers:
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None


def image_data_url(path: str | Path, max_side: int | None = 1024) -> str:
    """A `data:` URL of the image file: its own bytes when the format is web-safe and no side exceeds `max_side`,
    else a JPEG of the RGB image resized to fit `max_side`. Unreadable files raise `ValueError` naming the file."""
    from image_processing_emovlm_kd import check_image_header, open_image, to_rgb

    path = Path(path)
    file_format, _ = check_image_header(path)  # raster formats only, size checked before decoding
    image = open_image(path)  # decodes the whole file: a broken one fails here, not at the server
    if file_format in DATA_URL_FORMATS and (max_side is None or max(image.size) <= max_side):
        data, mime = path.read_bytes(), DATA_URL_FORMATS[file_format]
    else:
        image = to_rgb(image)
        if max_side is not None and max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        data, mime = buffer.getvalue(), "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class OpenAIChatClient:
    """Thread-safe client of `POST {base_url}/chat/completions`.

    Args:
        base_url: e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`.
        api_key: sent as `Authorization: Bearer <api_key>` (skipped when empty).
        model: the `model` field of every request.
        timeout: seconds per attempt (connect, read, write).
        retry: the [`RetryPolicy`].
        request_fields: extra JSON fields of every request (`max_tokens`, `temperature`, `response_format`, ...).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        request_fields: dict | None = None,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.retry = retry or RetryPolicy()
        self.request_fields = dict(request_fields or {})
        self._http = httpx.Client(timeout=httpx.Timeout(timeout), headers=headers)
        self._lock = threading.Lock()
        self.retries = 0  # total retries over all requests, for the run summary

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._http.close()

    def complete(self, messages: list[dict]) -> ChatResult:
        """The assistant's text for `messages`, retrying transient failures; raises [`ChatRequestError`]."""
        payload = {"model": self.model, "messages": messages, **self.request_fields}
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.post(self.url, json=payload)
            except httpx.TimeoutException as error:
                failure, retry_after = f"timed out ({type(error).__name__})", None
            except httpx.TransportError as error:
                failure, retry_after = f"connection failed ({type(error).__name__}: {error})", None
            else:
                if response.status_code == 200:
                    return self._parse(response, attempt)
                failure = f"HTTP {response.status_code}: {response.text[:200]!r}"
                if not is_retryable_status(response.status_code):
                    status = response.status_code
                    fatal_hint = FATAL_STATUS.get(status)
                    reason = f"{failure} ({fatal_hint})" if fatal_hint else failure
                    raise ChatRequestError(reason, attempt, status=status, fatal=fatal_hint is not None)
                retry_after = parse_retry_after(response.headers)
            if attempt > self.retry.max_retries:
                raise ChatRequestError(f"{failure}; gave up after {attempt} attempts", attempt)
            delay = self.retry.delay(attempt - 1, retry_after)
            logger.info(f"Chat request {failure}; retry {attempt}/{self.retry.max_retries} in {delay:.2f} s")
            with self._lock:
                self.retries += 1
            time.sleep(delay)

    @staticmethod
    def _parse(response: httpx.Response, attempts: int) -> ChatResult:
        try:
            choice = response.json()["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise MalformedResponse(
                f"not a chat completion ({type(error).__name__}: {error}): {response.text[:200]!r}", attempts
            ) from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise MalformedResponse(f"message content is {type(content).__name__}, not text", attempts)
        return ChatResult(content=content, attempts=attempts, finish_reason=choice.get("finish_reason"))


__all__ = [
    "ChatRequestError",
    "ChatResult",
    "MalformedResponse",
    "OpenAIChatClient",
    "RetryPolicy",
    "image_data_url",
    "is_retryable_status",
    "parse_retry_after",
]
