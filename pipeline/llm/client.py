"""An async client for OpenAI-compatible chat-completions endpoints (vLLM, NIM, OpenAI, ...).

Every failure is translated once, at this boundary, into the error the engine acts on (all in
:mod:`pipeline.errors`): the HTTP layer's exceptions here, in :meth:`LlmClient._post`; an
answer's status and body in :mod:`pipeline.llm.responses` (which also holds :class:`Completion`);
where to call is a :class:`~pipeline.llm.endpoint.ModelEndpoint`::

    RetryableError                        the task is deferred and tried again
    ├── ModelRateLimitError               HTTP 429 (``retry_after_s`` from retry-after-ms or Retry-After)
    ├── ModelTimeoutError                 HTTP 408, or no answer within ``timeout_s``
    ├── ModelServerError                  HTTP 409, 5xx, or a 200 that is not a chat completion
    └── ModelConnectionError              the endpoint cannot be reached, or the exchange broke

    ModelRequestError                     any other 4xx (bad request, bad key, ...), a redirect,
                                          or a base_url that is not http(s): fails for good
    ModelOutputError                      the answer cannot be used (no text, JSON that does not
                                          parse or validate): fails for good

HTTP is aiohttp (C HTTP parser, keep-alive pool): one ``ClientSession`` per client and event
loop, created lazily on the loop of the first request. Proxies come from the environment
(``HTTP(S)_PROXY``, ``NO_PROXY``), resolved once per URL and session; ``.netrc`` is not read.

Provider options (per model): ``extra_headers`` are sent with every request (a value written
``{env: NAME}`` is read from the environment at each request, like the key); ``extra_body`` is
merged into every request's JSON (the client's own fields win where both set one);
``api_key_header`` sends the key as that header's raw value (``api-key: KEY``, as Azure OpenAI
wants) instead of ``Authorization: Bearer KEY``. The preflight and the health probes send the
same headers and body fields.

Every answer's headers go to ``LlmClient.observers[alias]`` (the model's pacer reads its
``x-ratelimit-*``; :mod:`pipeline.llm.pacing`).

Secrets: the API key (and every env-read header value) is read from the environment at the
moment of each request and lives only in that request's headers (and in :mod:`pipeline.redact`'s registry, which blanks it out of every
message and answer). It is never stored on an object, never put in a message, and the
frames that hold it are never part of a raised exception's traceback (errors are built there
and raised by the caller). aiohttp exceptions, which carry the request and its headers, are
never chained onto ours, and what is returned to the caller holds only the response's status,
headers and body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.parse
import urllib.request
from typing import Any, Callable, Mapping, Sequence

import aiohttp

from pipeline.errors import (
    ModelConnectionError,
    ModelOutputError,
    ModelRequestError,
    ModelTimeoutError,
)
from pipeline.llm.endpoint import ModelEndpoint
from pipeline.llm.responses import Answer, Completion, parse_completion, parse_retry_after, snippet, status_error
from pipeline.model_options import CONTROL_CHARACTER_HINT, header_value_ok
from pipeline.redact import register_secret

__all__ = [
    "Completion",
    "LlmClient",
    "ModelEndpoint",
    "ModelOutputError",
    "ModelRequestError",
    "parse_retry_after",
]

logger = logging.getLogger(__name__)


def _header_value_from_env(endpoint: ModelEndpoint, variable: str, role: str) -> str | ModelRequestError:
    """The value of the environment variable ``variable``, read at each request to go in a
    header (``role``: where the config names it, ``its api_key_env`` or ``of
    extra_headers.NAME``), registered as a secret; or the error to return, naming the variable
    and never its value, when it is unset or empty or is not one line of text."""
    value = os.environ.get(variable)
    if not value:
        state = "is not set" if value is None else "is set but empty"
        return ModelRequestError(
            f"{endpoint.where}: the environment variable {variable} ({role}) {state}; export it and resume the run")
    register_secret(value)  # a server may echo it: every message it could reach is redacted
    if not header_value_ok(value):
        return ModelRequestError(
            f"{endpoint.where}: the environment variable {variable} ({role}) {CONTROL_CHARACTER_HINT}; "
            "fix it and resume the run")
    return value


class LlmClient:
    """One pooled ``aiohttp.ClientSession`` shared by every model of a config.

    ``max_connections`` bounds the connections per endpoint origin (host and port). The pool
    is opened lazily, on the event loop of the first request, and belongs to that loop: close
    it with :meth:`aclose` before the loop ends. A request made from another running loop gets
    a one-off connection instead of touching a pool it does not own.
    """

    def __init__(self, *, max_connections: int = 100) -> None:
        self.max_connections = max(1, int(max_connections))
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proxies: dict[str, str | None] = {}  # endpoint URL -> proxy URL (or None), per pool
        #: alias -> called with the headers of every answer of that model (pacing).
        self.observers: dict[str, Callable[[Mapping[str, str]], None]] = {}

    def __repr__(self) -> str:
        state = "open" if self._session is not None else "closed"
        return f"LlmClient(max_connections={self.max_connections}, {state})"

    async def aclose(self) -> None:
        """Close the pool. The client stays usable: the next request opens a new one."""
        session, self._session, self._loop = self._session, None, None
        self._proxies.clear()
        if session is not None:
            await session.close()

    async def complete(
        self,
        endpoint: ModelEndpoint,
        messages: Sequence[Mapping[str, str]],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> Completion:
        """POST one chat completion and return its first choice.

        Raises the errors of the module docstring; nothing else escapes but cancellation.
        """
        payload: dict[str, Any] = {**endpoint.extra_body, "model": endpoint.model, "messages": list(messages)}
        if temperature is not None:
            payload["temperature"] = temperature
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if response_format is not None:
            payload["response_format"] = dict(response_format)

        outcome = await self._post(endpoint, json.dumps(payload).encode())
        if isinstance(outcome, Exception):
            raise outcome
        return parse_completion(endpoint, outcome)

    async def request(
        self, endpoint: ModelEndpoint, method: str, path: str, payload: Any = None,
        *, headers: Mapping[str, str] | None = None,
    ) -> Answer | Exception:
        """One raw exchange, for checks such as the preflight (:mod:`pipeline.llm.preflight`):
        ``method`` on ``base_url + path`` with ``payload`` as JSON (if any) and the key.

        Returns the answer (status below 300: ``status_code``, ``headers``, ``body``) or the
        error of the module docstring for any other outcome; never raises but cancellation.
        """
        if isinstance(payload, dict) and method == "POST" and endpoint.extra_body:
            payload = {**endpoint.extra_body, **payload}
        body = None if payload is None else json.dumps(payload).encode()
        url = endpoint.base_url.rstrip("/") + path
        return await self._post(endpoint, body, method=method, url=url, extra_headers=headers)

    async def _post(self, endpoint: ModelEndpoint, body: bytes | None, *, method: str = "POST",
                    url: str | None = None, extra_headers: Mapping[str, str] | None = None) -> Answer | Exception:
        # Returns the error instead of raising it: this frame holds the key (in the headers),
        # and a frame that raises ends up in tracebacks that some loggers print with locals.
        # For the same reason every exception of the HTTP layer is caught here: its traceback
        # runs through aiohttp frames whose locals hold the request headers.
        headers = {"Accept": "application/json", "Content-Type": "application/json", **(extra_headers or {})}
        for name, value in endpoint.extra_headers:
            if type(value) is tuple:  # ("env", NAME)
                secret = _header_value_from_env(endpoint, value[1], f"of extra_headers.{name}")
                if isinstance(secret, Exception):
                    return secret
                headers[name] = secret
                del secret
            else:
                headers[name] = value
        if endpoint.api_key_env:
            key = _header_value_from_env(endpoint, endpoint.api_key_env, "its api_key_env")
            if isinstance(key, Exception):
                return key
            if endpoint.api_key_header:
                headers[endpoint.api_key_header] = key
            else:
                headers["Authorization"] = f"Bearer {key}"
            del key
        session, one_off = await self._session_for_running_loop()
        url = url or endpoint.url
        try:
            # Bounds the whole exchange, body included: a server that trickles bytes cannot
            # hold a permit for ever.
            async with asyncio.timeout(endpoint.timeout_s):
                async with session.request(
                    method, url, data=body, headers=headers, proxy=self._proxy_for(url), allow_redirects=False
                ) as response:
                    answer = Answer(response.status, response.headers, await response.read())
        except TimeoutError:  # asyncio's, and aiohttp's connect/read timeouts
            return ModelTimeoutError(f"{endpoint.where}: no answer within {endpoint.timeout_s:g} s")
        except (aiohttp.InvalidURL, _NonHttpUrlClientError) as exc:
            return ModelRequestError(f"{endpoint.where}: bad base_url ({type(exc).__name__})")
        except (aiohttp.ClientResponseError, aiohttp.ClientPayloadError) as exc:
            # An answer that is not HTTP, or a body cut short or badly encoded.
            detail = snippet(getattr(exc, "message", None) or str(exc))
            return ModelConnectionError(f"{endpoint.where}: broken answer ({type(exc).__name__}: {detail})")
        except (aiohttp.ClientError, OSError) as exc:
            detail = snippet(str(exc))
            return ModelConnectionError(f"{endpoint.where}: cannot connect ({type(exc).__name__}: {detail})")
        except ValueError as exc:  # a header aiohttp refuses, say: the same request would fail again
            return ModelRequestError(f"{endpoint.where}: the request cannot be sent ({type(exc).__name__})")
        except Exception as exc:  # anything else the HTTP layer raises; retryable, and key-free
            detail = snippet(str(exc))
            return ModelConnectionError(f"{endpoint.where}: HTTP client error ({type(exc).__name__}: {detail})")
        finally:
            headers.clear()  # nothing of the key stays in this frame's locals
            if one_off:
                await session.close()
        observe = self.observers.get(endpoint.alias)
        if observe is not None:
            observe(answer.headers)
        if answer.status_code >= 300:
            return status_error(endpoint, answer)
        return answer

    async def _session_for_running_loop(self) -> tuple[aiohttp.ClientSession, bool]:
        loop = asyncio.get_running_loop()
        if self._session is not None and self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                return self._new_session(1), True
            logger.warning("LlmClient: its event loop ended before aclose(); opening a new pool")
            stale, self._session, self._loop = self._session, None, None
            self._proxies.clear()
            try:
                await stale.close()  # its loop is gone: this only marks it closed
            except Exception:  # pragma: no cover - best effort
                pass
        if self._session is None:
            self._session = self._new_session(self.max_connections)
            self._loop = loop
        return self._session, False

    @staticmethod
    def _new_session(max_connections: int) -> aiohttp.ClientSession:
        # limit=0: no bound across origins; each origin (host, port, TLS, proxy) gets its own.
        # Idle connections are dropped after 4 s, before servers drop them (uvicorn, under
        # vLLM, after 5 s): reusing a connection the server is closing fails the request.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=max_connections, keepalive_timeout=4.0)
        return aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": "pipeline-llm"},
            timeout=aiohttp.ClientTimeout(total=None),  # _post bounds each exchange
            # Proxies are resolved by _proxy_for, once per URL: aiohttp's trust_env reads the
            # environment and ~/.netrc in a worker thread on every request (two thread hops,
            # ~0.3 ms of CPU), and a .netrc entry for the host would clash with our key.
            trust_env=False,
        )

    def _proxy_for(self, url: str) -> str | None:
        """The proxy from the environment for ``url`` (``HTTP_PROXY``/``HTTPS_PROXY``, minus
        ``NO_PROXY``), as urllib reads it; cached for the life of the pool."""
        try:
            return self._proxies[url]
        except KeyError:
            pass
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:  # aiohttp will say what is wrong with it
            return None
        proxy = urllib.request.getproxies().get(parts.scheme) or None
        if proxy and parts.hostname and urllib.request.proxy_bypass(parts.hostname):
            proxy = None
        self._proxies[url] = proxy
        return proxy


_NonHttpUrlClientError: type[Exception] = getattr(aiohttp, "NonHttpUrlClientError", aiohttp.InvalidURL)
