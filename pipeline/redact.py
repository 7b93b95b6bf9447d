"""Secrets never leave the process: the one place that knows them and scrubs text of them.

CONTRACT section 8: no secret (API key, authorization header) is ever written to the store, the
logs or the output. Every message on its way out passes through :func:`redact`:

- errors recorded with a task (``tasks.last_error``, through ``pipeline.engine.failures.describe``);
- log records of every logger (:func:`install_log_redaction`, done on import of this module);
- per-task traces (``task_traces.error``), the command line's error lines and uncaught tracebacks;
- LLM answers: known keys are blanked out of every answer text (:func:`redact_secrets`), and
  the server text quoted in errors is redacted before it is cut (a cut key is no longer found).

What is redacted:

- the VALUES of the environment variables named by every model's ``api_key_env`` (and its
  ``extra_headers`` written ``{env: NAME}``) of every
  config this process loaded or built a runtime for (:func:`register_config`), and of every key
  the LLM client sent (:func:`register_secret`); values shorter than :data:`MIN_SECRET_CHARS`
  are not secrets worth the noise of blanking them;
- whatever looks like a credential: ``Authorization: Bearer ...`` (also as a JSON key or with
  ``Basic``), ``x-api-key: ...`` / ``api_key=...``, ``Bearer <token>``, the usual provider key
  shapes (``sk-...``, ``nvapi-...``, ``hf_...``, ``gsk_...``, ``AIza...``) and the password of a
  URL (``https://user:PASSWORD@host``, ``postgresql://host/db?password=PASSWORD``).

Each becomes ``***``. The registry holds the secrets in this process's memory only, as the
environment already does.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
from typing import Any

__all__ = [
    "MASK",
    "MIN_SECRET_CHARS",
    "excepthook",
    "install_log_redaction",
    "looks_like_key",
    "looks_like_secret",
    "redact",
    "redact_secrets",
    "register_config",
    "register_env",
    "register_secret",
]

MASK = "***"

#: Shorter values are never treated as secrets (a key of "x" would blank every "x").
MIN_SECRET_CHARS = 4

_lock = threading.Lock()
_secrets: set[str] = set()
_exact: re.Pattern[str] | None = None  # the registered secrets, longest first

# Credentials by shape, whoever's they are. Each keeps its label and masks the value.
def _field(match: re.Match[str]) -> str:
    label, separator, scheme = match.group(1, 2, 3)
    return f"{label}{separator}{scheme + ' ' if scheme else ''}{MASK}"


_PATTERNS: tuple[tuple[re.Pattern[str], Any], ...] = (
    # A header or a field: "Authorization: Bearer X", '"authorization": "Basic X"', "api_key=X",
    # also inside JSON quoted once more (\"authorization\": \"Bearer X\").
    (re.compile(r"(?i)\b((?:proxy-)?authorization|x-api-key|api[-_]?key)(\\?[\"']?\s*[:=]\s*\\?[\"']?)"
                r"(?:(bearer|basic|token)\s+)?[^\s\"'\\&,;}\]]+"),
     _field),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]{8,}=*"), r"\1 " + MASK),
    (re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_\-]{16,}"), MASK),
    (re.compile(r"\b(?:hf|gsk|ghp|gho|ghs)_[A-Za-z0-9]{30,}"), MASK),  # not hf_some_long_column_name
    (re.compile(r"\b(?:nvapi|xai|glpat)-[A-Za-z0-9_\-]{20,}|\bgithub_pat_[A-Za-z0-9_]{40,}"), MASK),
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{30,}"), MASK),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@"), r"\1" + MASK + "@"),
    # A password as a URL's query parameter (libpq and SQLAlchemy take ?password=...).
    (re.compile(r"(?i)([?&](?:password|passwd|pwd|sslpassword)=)[^&\s\"'`]+"), r"\1" + MASK),
)


def register_secret(value: str | None) -> None:
    """Redact ``value`` from now on, wherever it appears. Cheap when it is known already."""
    global _exact
    if not value or len(value) < MIN_SECRET_CHARS or value in _secrets:
        return
    with _lock:
        if value in _secrets:
            return
        _secrets.add(value)
        ordered = sorted(_secrets, key=len, reverse=True)  # a key that contains another first
        _exact = re.compile("|".join(re.escape(s) for s in ordered))


def register_env(name: str | None) -> None:
    """Redact the current value of the environment variable ``name`` (if set)."""
    if name:
        register_secret(os.environ.get(name))


def register_config(config: Any) -> None:
    """Redact the keys of every model of ``config`` (anything with ``models``: alias -> an
    object or mapping with ``api_key_env``). Called when a config is loaded and when the LLM
    runtime of a config is built."""
    models = getattr(config, "models", None) or {}
    for model in models.values():
        name = model.get("api_key_env") if isinstance(model, dict) else getattr(model, "api_key_env", None)
        if isinstance(name, str):
            register_env(name)
        headers = model.get("extra_headers") if isinstance(model, dict) else getattr(model, "extra_headers", None)
        for value in (headers or {}).values():  # {env: NAME} header values are secrets too
            env = value.get("env") if isinstance(value, dict) else getattr(value, "env", None)
            if isinstance(env, str):
                register_env(env)


def redact_secrets(text: str) -> str:
    """``text`` with only the registered secrets blanked out: for data (LLM answers), where
    credential-like shapes may be legitimate content but our own keys never are."""
    exact = _exact
    if exact is None or not isinstance(text, str) or not text:
        return text
    return exact.sub(MASK, text)


def redact(text: Any) -> Any:
    """``text`` with every registered secret and every credential-shaped string blanked out
    (``***``). Anything that is not a str is returned as it is. Redact BEFORE cutting a text
    short: a cut secret is no longer recognised."""
    if not isinstance(text, str) or not text:
        return text
    exact = _exact
    if exact is not None:
        text = exact.sub(MASK, text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_PREFIXES = ("sk-", "sk_", "rk-", "pk-", "nvapi-", "xai-", "gsk_", "hf_", "ghp_", "gho_", "ghs_",
                 "github_pat_", "glpat-", "AIza", "Bearer ", "bearer ")


def looks_like_key(value: str) -> bool:
    """Whether a header value written in a config file is rather a key: a provider's key
    shape, a credential scheme (``Bearer ...``), or one long word of letters and digits (20+
    characters, a quarter of them digits or mixed case with digits), as keys are and
    ``2024-02-01`` or ``my-team`` are not."""
    value = value.strip()
    if value.startswith(_KEY_PREFIXES) or re.match(r"(?i)(bearer|basic|token)\s", value):
        return True
    if len(value) < 20 or any(ch.isspace() for ch in value):
        return False
    digits = sum(ch.isdigit() for ch in value)
    mixed_case = any(ch.islower() for ch in value) and any(ch.isupper() for ch in value)
    return digits * 4 >= len(value) or (mixed_case and digits >= 2)


def looks_like_secret(name: str) -> bool:
    """Whether a value given as an environment variable's NAME is rather a key pasted in: not
    a name at all (``[A-Za-z_][A-Za-z0-9_]*``), a provider's key shape, or a long run of letters
    and digits (a hex or base62 key) where names are words (``OPENAI_API_KEY``)."""
    if not _NAME.fullmatch(name) or name.startswith(_KEY_PREFIXES):
        return True
    if len(name) < 20:
        return False
    digits = sum(ch.isdigit() for ch in name)
    mixed_case = any(ch.islower() for ch in name) and any(ch.isupper() for ch in name)
    return digits * 4 >= len(name) or (mixed_case and digits >= 2 and "_" not in name)


# -- where messages leave the process ----------------------------------------------------------

_installed = False


def install_log_redaction() -> None:
    """Redact every log record of the process, once (idempotent).

    A ``logging.Filter`` on the ``pipeline`` logger would not do: Python consults a logger's
    filters only for records logged on that very logger, never for those its children
    (``pipeline.scheduler``, ``pipeline.llm.client``) propagate to it. The record factory sees
    every record of every logger, whatever handlers the application configured; the message is
    formatted once, here, and its traceback text too.
    """
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it where it always does
            return record
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    logging.setLogRecordFactory(factory)


def excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    """``sys.excepthook`` that prints the traceback redacted (the command line installs it)."""
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))


install_log_redaction()
