"""Stage 0's chat requests through `huggingface_hub.InferenceClient`, retried with backoff, failures explained.

The client talks to any OpenAI-compatible server (`base_url`: OpenAI, vLLM, TGI, LM Studio, ...) or to a model on
Hugging Face Inference Providers (a Hub model id with `provider`, authenticated with an HF token). This module speaks
no HTTP itself: `ChatClient.complete` calls `InferenceClient.chat_completion` and retries timeouts
(`InferenceTimeoutError`), connection errors, and HTTP 408/409/429/5xx (`HfHubHTTPError`, which carries the
response) with exponential backoff and jitter, honouring the server's `Retry-After`; every other failure is a
[`ChatRequestError`] that says why, and whether it is fatal (it would fail every request the same way, like a
rejected key). Images travel inside the messages as `data:` URLs (`image_data_url`).
"""

import base64
import dataclasses
import email.utils
import logging
import random
import threading
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, OfflineModeIsEnabled
from huggingface_hub.utils import httpx  # the HTTP library huggingface_hub uses (and raises from)

from emovlm_kd.arguments import REDACTED, url_credentials, without_url_credentials
from emovlm_kd.settings import NOTHING, Affects
from emovlm_kd.sources import WEB_IMAGE_FORMATS, web_image

logger = logging.getLogger(__name__)

FATAL_STATUS = {401: "the API key was rejected", 403: "access is forbidden", 404: "wrong --base-url or --model"}


def is_retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


class ChatRequestError(RuntimeError):
    """A request that failed for good. `fatal`: every other request would fail the same way (stop the run)."""

    def __init__(self, reason: str, attempts: int, status: int | None = None, fatal: bool = False):
        super().__init__(reason)
        self.reason, self.attempts, self.status, self.fatal = reason, attempts, status, fatal


class MalformedResponse(ChatRequestError):
    """The server answered, but not with a chat completion holding a text message."""


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


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date); None if absent."""
    headers = {name.lower(): value for name, value in headers.items()}
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


def image_data_url(data: bytes, name: str, max_side: int | None = 1024) -> str:
    """A `data:` URL of an encoded image: its own bytes when the format is web-safe and no side exceeds `max_side`,
    else a JPEG of the RGB image resized to fit. Undecodable data raises a `ValueError` naming `name`."""
    data, image_format = web_image(data, name, max_side)
    return f"data:{WEB_IMAGE_FORMATS[image_format][0]};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass
class ChatRequestArguments:
    """How requests go out: concurrency, the time an attempt may take and the retries (`RetryPolicy`)."""

    AFFECTS: ClassVar[dict[str, Affects]] = {
        name: NOTHING for name in ("concurrency", "timeout", "max_retries", "backoff_base", "backoff_max")
    }

    concurrency: int = field(default=8, metadata={"help": "Requests in flight at most"})
    timeout: float = field(default=120.0, metadata={"help": "Seconds per request attempt"})
    max_retries: int = field(default=5, metadata={"help": "Retries on timeouts, connection errors, 429 and 5xx"})
    backoff_base: float = field(default=1.0, metadata={"help": "First retry waits about this many seconds"})
    backoff_max: float = field(default=60.0, metadata={"help": "Longest backoff between retries (s)"})

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(max_retries=self.max_retries, backoff_base=self.backoff_base, backoff_max=self.backoff_max)


class Redactor(logging.Filter):
    """Replaces secrets (an API key, a URL's credentials) with `<redacted>` in texts, and, as a logging filter of
    a handler, in every record it emits (also those of the HTTP libraries underneath)."""

    def __init__(self, *secrets: str | None):
        super().__init__()
        self.secrets = sorted({secret for secret in secrets if secret and len(secret) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True

    @contextmanager
    def on_log_handlers(self):
        """Redact every record the root logger's handlers emit, for the block."""
        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(self)
        try:
            yield self
        finally:
            for handler in handlers:
                handler.removeFilter(self)


class ChatClient:
    """Chat completions with retries, safe to share between threads. The API key and the credentials of the base
    URL never appear in what it returns, raises or logs (`redact`): a server may echo them.

    Args:
        model: the model of every request: a name the server knows, or a Hub model id with `provider`.
        base_url: an OpenAI-compatible API (`https://api.openai.com/v1`, `http://127.0.0.1:8000/v1`); requests go
            to `{base_url}/chat/completions`.
        provider: Hugging Face Inference Providers (`together`, `nebius`, ..., or `auto`), when there is no
            `base_url`.
        api_key: sent as `Authorization: Bearer <api_key>`; None with `provider`: `huggingface_hub`'s token
            (`HF_TOKEN` or the cached `hf auth login`).
        timeout: seconds per attempt.
        retry: the [`RetryPolicy`].
        request_fields: `chat_completion` arguments of every request (`max_tokens`, `temperature`,
            `response_format`, ...).
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        provider: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        request_fields: dict | None = None,
    ):
        if (base_url is None) == (provider is None):
            raise ValueError("Give a base URL (an OpenAI-compatible server) or a provider (Inference Providers)")
        self.client = InferenceClient(base_url=base_url, provider=provider, api_key=api_key, timeout=timeout)
        self.model = model
        credentials = url_credentials(base_url)  # sent as HTTP basic auth: also redacted in that encoding
        basic = base64.b64encode(":".join(credentials).encode()).decode() if len(credentials) == 2 else None
        self.redact = Redactor(api_key, *credentials, basic)
        self.endpoint = without_url_credentials(base_url) if base_url else f"Inference Providers ({provider})"
        self.retry = retry or RetryPolicy()
        self.request_fields = dict(request_fields or {})
        self._lock = threading.Lock()
        self.retries = 0  # total retries over all requests, for the run summary

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.client.close()

    def complete(self, messages: list[dict]) -> ChatResult:
        """The assistant's text for `messages`, retrying transient failures; raises [`ChatRequestError`]."""
        attempt = 0
        while True:
            attempt += 1
            retry_after = None
            try:
                output = self.client.chat_completion(messages, model=self.model, **self.request_fields)
            except HfHubHTTPError as error:
                status = error.response.status_code
                failure = f"HTTP {status}: {self.redact(error.server_message or str(error))[:200]!r}"
                if not is_retryable_status(status):
                    hint = FATAL_STATUS.get(status)
                    reason = f"{failure} ({hint})" if hint else failure
                    raise ChatRequestError(reason, attempt, status=status, fatal=hint is not None) from None
                retry_after = parse_retry_after(error.response.headers)
            except InferenceTimeoutError:
                failure = "timed out"
            except OfflineModeIsEnabled:
                reason = "huggingface_hub refuses every request while HF_HUB_OFFLINE is set: unset it for stage 0"
                raise ChatRequestError(reason, attempt, fatal=True) from None
            except ValueError as error:  # the body is not JSON
                raise MalformedResponse(self.redact(f"not a chat completion ({error})"), attempt) from None
            except httpx.TransportError as error:  # could not connect, or the transfer broke off
                failure = self.redact(f"connection failed ({type(error).__name__}: {error})")
            else:
                result = self._result(output, attempt)
                return dataclasses.replace(result, content=self.redact(result.content))
            if attempt > self.retry.max_retries:
                raise ChatRequestError(f"{failure}; gave up after {attempt} attempts", attempt)
            delay = self.retry.delay(attempt - 1, retry_after)
            logger.info(f"Chat request {failure}; retry {attempt}/{self.retry.max_retries} in {delay:.2f} s")
            with self._lock:
                self.retries += 1
            time.sleep(delay)

    @staticmethod
    def _result(output, attempts: int) -> ChatResult:
        try:
            choice = output.choices[0]
            content = choice.message.content
        except (AttributeError, IndexError, KeyError, TypeError) as error:
            raise MalformedResponse(f"not a chat completion ({type(error).__name__}: {error})", attempts) from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise MalformedResponse(f"message content is {type(content).__name__}, not text", attempts)
        return ChatResult(content=content, attempts=attempts, finish_reason=choice.finish_reason)


__all__ = [
    "ChatRequestArguments",
    "Redactor",
    "ChatClient",
    "ChatRequestError",
    "ChatResult",
    "MalformedResponse",
    "RetryPolicy",
    "image_data_url",
    "is_retryable_status",
    "parse_retry_after",
]
