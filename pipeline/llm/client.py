"""An async client for OpenAI-compatible chat-completions endpoints (vLLM, NIM, OpenAI, ...).

Every failure is translated once, here, into the error the engine acts on::

    RetryableError (pipeline.errors)      the task is deferred and tried again
    ├── ModelRateLimitError               HTTP 429 (``retry_after_s`` from Retry-After)
    ├── ModelTimeoutError                 HTTP 408, or no answer within ``timeout_s``
    ├── ModelServerError                  HTTP 409, 5xx, or a 200 that is not a chat completion
    └── ModelConnectionError              the endpoint cannot be reached

    ModelRequestError                     any other 4xx (bad request, bad key, ...): fails for good
    ModelOutputError                      the answer cannot be used (no text, JSON that does not
                                          parse or validate): fails for good

Secrets: the API key is read from the environment at the moment of each request and lives only
in that request's headers. It is never stored on an object, never put in a message, and the
frames that hold it are never part of a raised exception's traceback (errors are built there
and raised by the caller). httpx exceptions, which carry the request and its headers, are never
chained onto ours.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import logging
import math
import os
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import timezone
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

import httpx

from pipeline.errors import (
    ModelConnectionError,
    ModelRateLimitError,
    ModelServerError,
    ModelTimeoutError,
)

__all__ = [
    "Completion",
    "LlmClient",
    "ModelEndpoint",
    "ModelOutputError",
    "ModelRequestError",
    "parse_retry_after",
]

logger = logging.getLogger(__name__)

_BODY_SNIPPET_CHARS = 200


class ModelRequestError(Exception):
    """The endpoint refused the request (a 4xx other than 408, 409 and 429). Not retryable:
    the same request would be refused again. Fix the config, the key or the prompt."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ModelOutputError(Exception):
    """The model answered, but the answer cannot be used. Not retryable."""


@dataclass(frozen=True)
class Completion:
    """The text of the first choice and the token counts the server reported (0 if none)."""

    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ModelEndpoint:
    """Where and how to call one model alias. ``api_key_env`` is the NAME of an env var."""

    alias: str
    base_url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = 60.0
    max_parallel_requests: int = 16

    @classmethod
    def from_config(cls, alias: str, model_config: Any) -> "ModelEndpoint":
        """Build from a config's model entry (anything with the ModelConfig attributes)."""
        return cls(
            alias=alias,
            base_url=str(model_config.base_url),
            model=model_config.model,
            api_key_env=getattr(model_config, "api_key_env", None),
            timeout_s=float(getattr(model_config, "timeout_s", 60.0)),
            max_parallel_requests=int(getattr(model_config, "max_parallel_requests", 16)),
        )

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    @property
    def where(self) -> str:
        """How messages name the endpoint: alias and URL without credentials or query."""
        return f"model '{self.alias}' at {_public_url(self.base_url)}"


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


class LlmClient:
    """One pooled ``httpx.AsyncClient`` shared by every model of a config.

    ``max_connections`` bounds the connections per endpoint origin (host and port). The pool
    is opened lazily, on the event loop of the first request, and belongs to that loop: close
    it with :meth:`aclose` before the loop ends. A request made from another running loop gets
    a one-off connection instead of touching a pool it does not own.
    """

    def __init__(self, *, max_connections: int = 100) -> None:
        self.max_connections = max(1, int(max_connections))
        self._http: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        state = "open" if self._http is not None else "closed"
        return f"LlmClient(max_connections={self.max_connections}, {state})"

    async def aclose(self) -> None:
        """Close the pool. The client stays usable: the next request opens a new one."""
        http, self._http, self._loop = self._http, None, None
        if http is not None:
            await http.aclose()

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
        payload: dict[str, Any] = {"model": endpoint.model, "messages": list(messages)}
        if temperature is not None:
            payload["temperature"] = temperature
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if response_format is not None:
            payload["response_format"] = dict(response_format)

        outcome = await self._post(endpoint, payload)
        if isinstance(outcome, Exception):
            raise outcome
        return _parse_completion(endpoint, outcome)

    async def _post(self, endpoint: ModelEndpoint, payload: dict[str, Any]) -> httpx.Response | Exception:
        # Returns the error instead of raising it: this frame holds the key (in the headers),
        # and a frame that raises ends up in tracebacks that some loggers print with locals.
        headers = {"Accept": "application/json"}
        if endpoint.api_key_env:
            key = os.environ.get(endpoint.api_key_env)
            if not key:
                return ModelRequestError(
                    f"{endpoint.where}: the environment variable {endpoint.api_key_env} "
                    "(its api_key_env) is not set; export it and resume the run"
                )
            headers["Authorization"] = f"Bearer {key}"
        http, one_off = self._http_for_running_loop()
        try:
            # httpx's timeouts bound each phase; this bounds the whole exchange, so a server
            # that trickles bytes cannot hold a permit for ever.
            async with asyncio.timeout(endpoint.timeout_s):
                response = await http.post(
                    endpoint.url, json=payload, headers=headers, timeout=httpx.Timeout(endpoint.timeout_s)
                )
        except (httpx.TimeoutException, TimeoutError):
            return ModelTimeoutError(f"{endpoint.where}: no answer within {endpoint.timeout_s:g} s")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            return ModelRequestError(f"{endpoint.where}: bad base_url ({type(exc).__name__})")
        except httpx.TransportError as exc:
            detail = _scrub(str(exc), endpoint)[:_BODY_SNIPPET_CHARS]
            return ModelConnectionError(f"{endpoint.where}: cannot connect ({type(exc).__name__}: {detail})")
        except httpx.DecodingError as exc:
            return ModelServerError(f"{endpoint.where}: undecodable response ({type(exc).__name__})")
        finally:
            if one_off:
                await http.aclose()
        if response.status_code >= 300:
            return _status_error(endpoint, response)
        return response

    def _http_for_running_loop(self) -> tuple[httpx.AsyncClient, bool]:
        loop = asyncio.get_running_loop()
        if self._http is not None and self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                return self._new_http(1), True
            logger.warning("LlmClient: its event loop ended before aclose(); opening a new pool")
            self._http = None
        if self._http is None:
            self._http = self._new_http(self.max_connections)
            self._loop = loop
        return self._http, False

    @staticmethod
    def _new_http(max_connections: int) -> httpx.AsyncClient:
        headers = {"User-Agent": "pipeline-llm"}
        if max_connections == 1:
            return httpx.AsyncClient(headers=headers, follow_redirects=False)
        return httpx.AsyncClient(transport=_LaneTransport(max_connections), headers=headers, follow_redirects=False)


class _LaneTransport(httpx.AsyncBaseTransport):
    """A connection pool made of one-connection httpx transports ("lanes"), O(1) per request.

    httpcore 1.0's pool scans all its connections for every queued request on every request
    start and end, so one pool of N connections costs O(N^2) per request when N requests are
    in flight. Measured here with 128 concurrent requests to a 50 ms server: 1.2-5 s per batch
    of 128 through one 128-connection pool, 0.11 s through 128 one-connection lanes. Each lane
    is a full httpx transport (keep-alive, reconnects, proxies, TLS); lanes of an origin are
    handed out from a free list, and requests past ``max_per_origin`` wait in FIFO order.
    """

    def __init__(self, max_per_origin: int) -> None:
        self._max_per_origin = max_per_origin
        self._ssl_context: Any = None  # one for all lanes: loading CA certificates is slow
        self._idle: dict[tuple, list[httpx.AsyncHTTPTransport]] = collections.defaultdict(list)
        self._opened: collections.Counter[tuple] = collections.Counter()
        self._waiters: dict[tuple, collections.deque[asyncio.Future]] = collections.defaultdict(collections.deque)
        self._lanes: list[httpx.AsyncHTTPTransport] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        origin = (request.url.scheme, request.url.host, request.url.port)
        lane = await self._checkout(origin)
        try:
            response = await lane.handle_async_request(request)
        except BaseException:
            self._checkin(origin, lane)
            raise
        stream = _ReleasingStream(response.stream, lambda: self._checkin(origin, lane))
        return httpx.Response(
            response.status_code, headers=response.headers, stream=stream, extensions=response.extensions
        )

    async def aclose(self) -> None:
        lanes, self._lanes = self._lanes, []
        self._idle.clear()
        self._opened.clear()
        for lane in lanes:
            await lane.aclose()

    async def _checkout(self, origin: tuple) -> httpx.AsyncHTTPTransport:
        idle = self._idle[origin]
        if idle:
            return idle.pop()
        if self._opened[origin] < self._max_per_origin:
            self._opened[origin] += 1
            lane = self._new_lane(origin)
            self._lanes.append(lane)
            return lane
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[origin].append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a lane as we were cancelled
                self._checkin(origin, waiter.result())
            raise

    def _checkin(self, origin: tuple, lane: httpx.AsyncHTTPTransport) -> None:
        waiters = self._waiters[origin]
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(lane)
                return
        self._idle[origin].append(lane)

    def _new_lane(self, origin: tuple) -> httpx.AsyncHTTPTransport:
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()
        scheme, host, _ = origin
        # A custom transport turns off httpx's own reading of HTTP(S)_PROXY: do it here.
        proxy = urllib.request.getproxies().get(scheme)
        if proxy and urllib.request.proxy_bypass(host):
            proxy = None
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        return httpx.AsyncHTTPTransport(verify=self._ssl_context, limits=limits, proxy=proxy or None)


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that gives its lane back when closed (httpx always closes it)."""

    def __init__(self, stream: Any, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


def _status_error(endpoint: ModelEndpoint, response: httpx.Response) -> Exception:
    status = response.status_code
    where = f"{endpoint.where}: HTTP {status}"
    if status == 429:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        hint = f", retry after {retry_after:g} s" if retry_after is not None else ""
        return ModelRateLimitError(f"{where} (rate limited{hint})", retry_after_s=retry_after)
    body = _scrub(response.text, endpoint)[:_BODY_SNIPPET_CHARS]
    if status == 408:
        return ModelTimeoutError(f"{where}: {body}")
    if status == 409 or status >= 500:
        return ModelServerError(f"{where}: {body}")
    return ModelRequestError(f"{where}: {body}", status_code=status)


def _parse_completion(endpoint: ModelEndpoint, response: httpx.Response) -> Completion:
    try:
        data = response.json()
        choice = data["choices"][0]
        content = choice["message"].get("content")
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        snippet = _scrub(response.text, endpoint)[:_BODY_SNIPPET_CHARS]
        raise ModelServerError(f"{endpoint.where}: a 200 answer that is not a chat completion: {snippet}") from None
    if isinstance(content, list):  # some servers send content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        reason = choice.get("finish_reason")
        raise ModelOutputError(f"{endpoint.where}: the answer has no text (finish_reason={reason!r})")
    return Completion(text=content, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def _scrub(text: str, endpoint: ModelEndpoint) -> str:
    """Blank the key out of server-provided text: a misbehaving server may echo it."""
    if endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env)
        if key and len(key) >= 4:
            text = text.replace(key, "***")
    return text


def _public_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
