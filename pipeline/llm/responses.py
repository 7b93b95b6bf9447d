"""What :mod:`pipeline.llm.client` makes of an HTTP response: an error for its status, or the
:class:`Completion` in its body. Pure functions of the response, which holds no part of the
request (so no key).

Statuses (errors of :mod:`pipeline.errors`; the full tree is in :mod:`pipeline.llm.client`)::

    429                    ModelRateLimitError  (retry_after_s from retry-after-ms or Retry-After)
    408                    ModelTimeoutError
    409, 5xx               ModelServerError
    any other 3xx or 4xx   ModelRequestError    (status_code set; fails for good)

A 200 whose body is not a chat completion is a ModelServerError; one whose first choice has no
text (and no reasoning field) is a ModelOutputError. Server-provided text quoted in a message
is redacted and cut to :data:`_BODY_SNIPPET_CHARS` characters.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from dataclasses import dataclass
from datetime import timezone
from typing import Any, Mapping

from pipeline.errors import (
    ModelOutputError,
    ModelRateLimitError,
    ModelRequestError,
    ModelServerError,
    ModelTimeoutError,
)
from pipeline.llm.endpoint import ModelEndpoint
from pipeline.redact import redact, redact_secrets
from pipeline.values import valid_unicode

__all__ = ["Answer", "Completion", "parse_completion", "parse_retry_after", "snippet", "status_error"]

_BODY_SNIPPET_CHARS = 200
_FINISH_REASON_CHARS = 64


@dataclass(frozen=True)
class Completion:
    """The text of the first choice and the token counts the server reported (0 if none).

    ``finish_reason``: why the model stopped, as the server said (``stop``, ``length``, ...;
    None when it did not say). ``reasoning_chars``: the length of the choice's reasoning field
    (``reasoning_content`` or ``reasoning``), 0 when there is none; a reasoning-only answer has
    ``text == ""`` (see :mod:`pipeline.llm.answers`).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    reasoning_chars: int = 0


@dataclass(frozen=True, slots=True)
class Answer:
    """What is kept of an HTTP response: status, headers and body (never the request)."""

    status_code: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a 429 asks us to wait: ``retry-after-ms`` (Azure OpenAI, OpenAI's own clients
    prefer it), else ``Retry-After`` (seconds or an HTTP date), else None (the engine backs off)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            seconds = float(millis) / 1000.0
        except ValueError:
            seconds = math.nan
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return parse_retry_after(headers.get("Retry-After"))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def status_error(endpoint: ModelEndpoint, response: Answer) -> Exception:
    """The error of the table above for a response of status 300 or more (returned, not raised)."""
    status = response.status_code
    where = f"{endpoint.where}: HTTP {status}"
    if status == 429:
        retry_after = _retry_after(response.headers)
        hint = f", retry after {retry_after:g} s" if retry_after is not None else ""
        return ModelRateLimitError(f"{where} (rate limited{hint})", retry_after_s=retry_after)
    body = snippet(response.text)
    if status == 408:
        return ModelTimeoutError(f"{where}: {body}")
    if status == 409 or status >= 500:
        return ModelServerError(f"{where}: {body}")
    return ModelRequestError(f"{where}: {body}", status_code=status)


def parse_completion(endpoint: ModelEndpoint, response: Answer) -> Completion:
    """The first choice of a 200's chat completion; raises ModelServerError (not a chat
    completion) or ModelOutputError (no text)."""
    try:
        data = response.json()
        choice = data["choices"][0]
        message = choice["message"]
        content = message.get("content")
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        text = snippet(response.text)
        raise ModelServerError(f"{endpoint.where}: a 200 answer that is not a chat completion: {text}") from None
    reason = choice.get("finish_reason")
    # Kept in tasks.finish_reason: a string of the usual size, or nothing.
    finish_reason = valid_unicode(reason[:_FINISH_REASON_CHARS]) if isinstance(reason, str) else None
    reasoning_chars = len(reasoning) if isinstance(reasoning, str) else 0
    if isinstance(content, list):  # some servers send content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if content is None and reasoning_chars:
        content = ""  # only reasoning (vLLM's reasoning parser, cut short): a malformed answer
    if not isinstance(content, str):
        raise ModelOutputError(f"{endpoint.where}: the answer has no text (finish_reason={snippet(repr(reason))})")
    # A server that echoes our key into its answer must not put it into the dataset; a "\ud83d"
    # escape in the JSON body is a lone surrogate, which no store can hold: U+FFFD.
    return Completion(text=valid_unicode(redact_secrets(content)), prompt_tokens=prompt_tokens,
                      completion_tokens=completion_tokens, finish_reason=finish_reason,
                      reasoning_chars=reasoning_chars)


def snippet(text: str) -> str:
    """The start of server-provided text for a message, redacted before it is cut (a key cut in
    two would not be recognised); a server may echo the key or the Authorization header."""
    return redact(text[:_BODY_SNIPPET_CHARS + 4096])[:_BODY_SNIPPET_CHARS]
