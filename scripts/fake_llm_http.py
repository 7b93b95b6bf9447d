"""The fake server's HTTP/1.1 connections (scripts/fake_llm_server.py): requests parsed by
httptools (llhttp, the parser of Node.js and uvicorn), answers written by a timer after the
latency, one at a time per connection, in order, with keep-alive.

Not aiohttp.web: with 64 requests in flight on keep-alive connections (latency 0, 2 cores),
aiohttp.web's server took 190-270 us of CPU per request against 105-120 us here, and served
7-40 % fewer requests/s (medians of 3, five times); the server is there to cost the benchmarks
as little as it can. Here there is no task per request: a request is answered as soon as it is
parsed (``server.answer``), and a timer writes the answer.
"""

from __future__ import annotations

import asyncio
import collections
import http
import json
from typing import Any, Callable

import httptools

__all__ = ["Connection", "encode"]


class Connection(asyncio.Protocol):
    """One client connection of ``server`` (a FakeLlmServer: ``answer()`` and ``connections``)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.parts: list = []  # the request being parsed: [url, headers, body chunks]
        self.waiting: collections.deque = collections.deque()  # parsed requests, not yet answered
        self.pending: asyncio.TimerHandle | None = None  # the answer being waited for
        self.on_sent: Callable | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.pending is not None:  # an answer nobody will read: it is no longer in flight
            self.pending.cancel()
            self._send(b"", False, self.on_sent)
        self.transport = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.waiting.clear()
            self._send(encode(400, {"error": {"message": "bad request"}}, {}, keep_alive=False), False, None)
            return
        if self.pending is None:
            self._next()

    # httptools' callbacks
    def on_message_begin(self) -> None:
        self.parts = [b"", {}, []]

    def on_url(self, url: bytes) -> None:
        self.parts[0] += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.parts[1][name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.parts[2].append(body)

    def on_message_complete(self) -> None:
        url, headers, body = self.parts
        self.waiting.append((self.parser.get_method().decode("latin-1"), url.decode("latin-1"), headers,
                             b"".join(body), self.parser.should_keep_alive()))

    def _next(self) -> None:
        """Answer the next parsed request, if any: decide now, write after its latency."""
        if not self.waiting or self.transport is None:
            return
        method, target, headers, body, keep_alive = self.waiting.popleft()
        delay_s, status, extra, payload, on_sent = self.server.answer(method, target.split("?", 1)[0], headers, body)
        data = encode(status, payload, extra, keep_alive=keep_alive)
        self.on_sent = on_sent
        self.pending = asyncio.get_running_loop().call_later(delay_s, self._send, data, keep_alive, on_sent)

    def _send(self, data: bytes, keep_alive: bool, on_sent: Callable | None) -> None:
        self.pending = self.on_sent = None
        if on_sent is not None:
            on_sent()
        if self.transport is None or not data:
            return
        self.transport.write(data)
        if not keep_alive:
            self.transport.close()
            self.transport = None
        else:
            self._next()


def encode(status: int, payload: Any, extra: dict, *, keep_alive: bool) -> bytes:
    """One HTTP/1.1 response: ``payload`` as JSON (bytes: sent as they are), ``extra`` headers."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Status"
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        *(f"{name}: {value}" for name, value in extra.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
