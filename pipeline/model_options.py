"""What a model entry of the config may add to its requests (CONTRACT section 10, "Headers"):
pacing budgets, provider options and prices; their bounds and checks, used by
:class:`pipeline.config.ModelConfig`.

- ``extra_headers``: header name -> a literal value, or ``{env: NAME}`` (:class:`EnvValue`) to
  read it from the environment at each request, as ``api_key_env`` does. A literal value that
  looks like a key is refused (keys never go in the file); the client's own headers
  (:data:`RESERVED_HEADERS`) may not be set.
- ``extra_body``: merged into every request's JSON; ``model``, ``messages`` and ``stream`` are
  the client's.
- Fingerprints take ``extra_body`` (it changes answers), never headers (:func:`answer_facts`).
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline import redact

__all__ = ["CONTROL_CHARACTER_HINT", "HEADER_NAME_PATTERN", "MAX_PRICE", "MAX_RATE_PER_MINUTE", "RESERVED_HEADERS", "EnvValue",
           "answer_facts", "check_extra_body", "check_extra_headers", "env_missing", "header_value_ok", "unset_header_envs"]

#: Per-minute budgets: far above any provider's, far below float trouble.
MAX_RATE_PER_MINUTE = 1e12
#: The smallest budget (per minute) taken: one request or token per 100 minutes.
MIN_RATE_PER_MINUTE = 0.01
#: Price per million tokens, in any currency.
MAX_PRICE = 1e9
#: An HTTP header name (a token, RFC 9110).
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
#: Headers the client owns: a second Authorization would clash with the key.
RESERVED_HEADERS = frozenset({"authorization", "content-type", "content-length", "host", "accept"})
_CLIENT_FIELDS = frozenset({"model", "messages", "stream"})


class EnvValue(BaseModel):
    """A header value read from the environment at each request: ``{env: NAME}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


#: A header value is one line: no control character but the tab (RFC 9110, field-value).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: What is wrong with a header value that is not one line (a literal one or one read from the environment).
_NOT_ONE_LINE = "holds a line break or another control character, which no HTTP header may carry"
#: Why a value read from the environment cannot be sent, never showing it.
CONTROL_CHARACTER_HINT = f"{_NOT_ONE_LINE} (a value read from a file saved with Windows line endings ends in \\r)"


def header_value_ok(value: str) -> bool:
    """True when ``value`` can be sent as an HTTP header value (no control character but tab)."""
    return _CONTROL.search(value) is None


def check_extra_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """ValueError for a reserved header, a literal value that is not one line of text, or a
    literal value shaped like a key (shown by its first 3 characters only)."""
    for name, value in headers.items():
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"extra_headers may not set '{name}' (the client sets it); "
                             "use api_key_env / api_key_header for the key")
        if isinstance(value, str) and not header_value_ok(value):
            raise ValueError(f"extra_headers.{name} {_NOT_ONE_LINE}; write it on one line")
        if isinstance(value, str) and redact.looks_like_key(value):
            raise ValueError(
                f"extra_headers.{name} looks like a key (it starts with {value[:3]!r}); write "
                f"{{env: NAME}} and export NAME=<the value>: keys never go in the file")
    return headers


def check_extra_body(body: dict[str, Any]) -> dict[str, Any]:
    """ValueError for a field the client sets itself."""
    taken = sorted(set(body) & _CLIENT_FIELDS)
    if taken:
        raise ValueError(f"extra_body may not set {', '.join(taken)} (the client sets them)")
    return body


def env_missing(variable: str) -> str | None:
    """Why the environment variable ``variable`` gives no value, to follow its name in a message
    ("is not set", or "is set but empty": ``MYKEY= pipeline run`` sets it to nothing), or None
    when it has one."""
    value = os.environ.get(variable)
    if value is None:
        return "is not set"
    return None if value else "is set but empty"


def unset_header_envs(model: Any) -> list[tuple[str, str]]:
    """``(header, NAME)`` of each ``{env: NAME}`` header whose variable is unset or empty."""
    return [(name, value.env) for name, value in model.extra_headers.items()
            if isinstance(value, EnvValue) and env_missing(value.env)]


def answer_facts(model: Any) -> dict[str, Any]:
    """What of a model decides its answers, for fingerprints: ``base_url``, ``model``, and
    ``extra_body`` when set (its fields, such as ``top_p`` or a reasoning effort, change
    answers). Never a key or a header: headers carry credentials, not answers."""
    facts: dict[str, Any] = {"base_url": model.base_url, "model": model.model}
    if getattr(model, "extra_body", None):
        facts["extra_body"] = model.extra_body
    return facts
