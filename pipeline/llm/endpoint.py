"""Where and how to call one model alias: :class:`ModelEndpoint`, the request side of
:mod:`pipeline.llm.client`.

An endpoint holds no secret: ``api_key_env`` and ``{env: NAME}`` header values are the NAMES of
environment variables, read by the client at the moment of each request. Its ``where`` (alias
and URL without credentials or query) is how every message names it.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["ModelEndpoint", "public_url"]


@dataclass(frozen=True)
class ModelEndpoint:
    """Where and how to call one model alias. ``api_key_env`` is the NAME of an env var."""

    alias: str
    base_url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = 60.0
    max_parallel_requests: int = 16
    #: ``(name, value)``: a value is the text sent, or ``("env", NAME)`` to read it from NAME.
    extra_headers: tuple[tuple[str, str | tuple[str, str]], ...] = ()
    extra_body: Mapping[str, Any] = field(default_factory=dict, compare=False)
    #: The header the key goes in, raw (``api-key``); None: ``Authorization: Bearer KEY``.
    api_key_header: str | None = None

    def __repr__(self) -> str:  # header values stay out of reprs
        return f"ModelEndpoint(alias={self.alias!r}, where={self.where!r}, model={self.model!r})"

    @classmethod
    def from_config(cls, alias: str, model_config: Any) -> "ModelEndpoint":
        """Build from a config's model entry (anything with the ModelConfig attributes)."""
        headers = []
        for name, value in (getattr(model_config, "extra_headers", None) or {}).items():
            env = value.get("env") if isinstance(value, dict) else getattr(value, "env", None)
            headers.append((name, ("env", env) if env is not None else str(value)))
        return cls(
            alias=alias,
            base_url=str(model_config.base_url),
            model=model_config.model,
            api_key_env=getattr(model_config, "api_key_env", None),
            timeout_s=float(getattr(model_config, "timeout_s", 60.0)),
            max_parallel_requests=int(getattr(model_config, "max_parallel_requests", 16)),
            extra_headers=tuple(headers),
            extra_body=dict(getattr(model_config, "extra_body", None) or {}),
            api_key_header=getattr(model_config, "api_key_header", None),
        )

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    @property
    def where(self) -> str:
        """How messages name the endpoint: alias and URL without credentials or query."""
        return f"model '{self.alias}' at {public_url(self.base_url)}"


def public_url(url: str) -> str:
    """``url`` without user, password, query or fragment (they may hold credentials)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # say nothing of it: it may hold credentials
        return "(a URL that does not parse)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
