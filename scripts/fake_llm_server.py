"""A deterministic OpenAI-compatible chat-completions server, for tests and benchmarks.

Run it::

    python scripts/fake_llm_server.py --port 0 --latency-ms 50 --rate-429 0.1 --rate-503 0.05

The first line of stdout is ``listening on http://127.0.0.1:<port>/v1``. Or start it inside a
test: ``url, stop = start_server(latency_ms=50)`` serves from a background thread until
``stop()``.

It answers ``POST /v1/chat/completions`` (also without the ``/v1``) as
scripts/fake_llm_answers.py says: text echoing the prompt, or JSON generated from the schema.

Faults, deterministic per (model, messages, attempt number):

- ``rate_429`` / ``rate_503``: the share of requests answered 429 (``Retry-After:
  retry_after_s``) or 503. Only first attempts of a prompt are hit, unless
  ``faults_every_attempt``, so a client that retries always gets through.
- ``malformed_marker``: a request whose messages contain this text always gets unusable output
  (invalid JSON or wrong-typed JSON, by request).
- ``burst_429`` (``MODEL:START_S:DURATION_S``, repeatable; MODEL ``*`` is every model): every
  request for that model gets 429 with ``Retry-After: 0`` during that window, timed from the
  first chat request of a run (not the preflight's, not a probe's, which are answered by the
  window as if it had started; ``/stats`` gives it as ``first_request_s`` of uptime), so that a
  slow start of the client never shifts the window.
- ``require_key``: requests without ``Authorization: Bearer <key>`` get 401 (``GET /v1/models``
  too).
- ``models`` (``--models a,b``): the models it serves. ``GET /v1/models`` lists them, and a chat
  request naming another model gets 404 (``model_not_found``), as OpenAI answers. Without it,
  every model is served, and the list holds the models asked for so far.
- As OpenAI, a ``json_schema`` with ``strict: true`` whose objects are not closed
  (``additionalProperties: false``) with every property required gets 400.
- Markers in a message, for tests of single responses: ``[[status:NNN]]`` answers with that
  status, ``[[retry-after:VALUE]]`` adds that Retry-After header, ``[[retry-after-ms:VALUE]]``
  a retry-after-ms header (as Azure OpenAI sends), ``[[status-attempts:N]]`` limits the status
  marker to the first N attempts of that prompt, ``[[sleep-ms:N]]`` replaces the latency,
  ``[[echo-auth]]`` puts the request's Authorization header into the answer (its text, which is
  then no JSON, or its error body), as a careless server might.
- ``echo_auth``: every error body quotes the request's Authorization header.
- ``rpm_limit`` / ``tpm_limit`` (``--rpm-limit``, ``--tpm-limit``; 0: none): requests and tokens
  per minute per model, enforced and announced as OpenAI does (scripts/fake_llm_limits.py):
  ``x-ratelimit-*`` headers on every chat answer, 429 with ``retry-after-ms`` past them;
  ``limits_start_s`` starts the buckets with that many seconds' share (default: a full minute's),
  ``limit_headers=False`` sends no headers.
- ``GET /last`` returns the headers and JSON body of the last request of each kind (``run``:
  the run's own chat calls, ``preflight``, ``probe``, ``list_models``), for tests that check
  what reaches a server (extra headers, body fields, the key's header).
- ``replies`` (``--replies FILE.json``): exact answers, by name. A request whose messages hold
  ``[[reply:NAME]]`` gets ``replies[NAME]``: a dict with any of ``content`` (a string, or None
  for JSON null; default ""), ``reasoning_content``, ``reasoning``, ``finish_reason`` (default
  ``stop``), or ``body`` (the whole response body, sent as it is). A list of them answers the
  n-th request of a conversation (same model and first user message: re-asks included) with
  item n, the last item ever after.

Every answer, faults included, comes after the latency. ``GET /stats`` returns, per model,
requests, 429s, 5xx and the highest number of requests in flight at once (``models``). Requests
of pipeline's model preflight and of its health probes (headers ``X-Pipeline-Preflight``,
``X-Pipeline-Probe``) are counted apart, so that the counts of ``models`` are the run's own
calls: ``preflight`` holds ``list_models`` (every ``GET /v1/models``) and ``models`` (the
preflight's chat requests, per model, the same fields); ``probes`` the probes, per model.
Chat requests for a model it does not serve count in ``unknown_model``. Nothing is logged:
least of all the Authorization header (only echoed back to its sender, when asked to).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import importlib.util
import json
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable


def _sibling(name: str) -> ModuleType:
    """scripts/NAME.py, loaded by path (tests load this file by path, not from sys.path)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_answers = _sibling("fake_llm_answers")
sample_from_schema = _answers.sample_from_schema
_error = _answers.error

__all__ = ["Burst", "FakeLlmServer", "FakeOptions", "main", "sample_from_schema", "start_server"]

_MARKER = re.compile(r"\[\[(status|retry-after|retry-after-ms|status-attempts|sleep-ms):([^\]]*)\]\]")
_REPLY = re.compile(r"\[\[reply:([^\]]+)\]\]")


@dataclass(frozen=True)
class Burst:
    """Every request for ``model`` gets 429 from ``start_s`` to ``start_s + duration_s``."""

    model: str
    start_s: float
    duration_s: float

    @classmethod
    def parse(cls, text: str) -> "Burst":
        # Model names may hold colons ("llama3:8b"); the two numbers never do.
        model, start, duration = text.rsplit(":", 2)
        return cls(model, float(start), float(duration))

    def covers(self, model: str, elapsed_s: float) -> bool:
        return self.model in ("*", model) and self.start_s <= elapsed_s < self.start_s + self.duration_s


@dataclass
class FakeOptions:
    latency_ms: float = 0.0
    rate_429: float = 0.0
    rate_503: float = 0.0
    retry_after_s: float = 0.0
    faults_every_attempt: bool = False
    malformed_marker: str | None = None
    burst_429: tuple[Burst, ...] = ()
    require_key: str | None = None
    echo_auth: bool = False
    models: tuple[str, ...] = ()
    rpm_limit: float = 0.0
    tpm_limit: float = 0.0
    limits_start_s: float | None = None
    limit_headers: bool = True
    replies: dict | None = None

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        self.burst_429 = tuple(b if isinstance(b, Burst) else Burst.parse(b) for b in self.burst_429)
        if not 0.0 <= self.rate_429 + self.rate_503 <= 1.0:
            raise ValueError("rate_429 + rate_503 must be within 0..1")

    def __repr__(self) -> str:  # the key stays out of reprs
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "require_key"}
        shown["require_key"] = "***" if self.require_key else None
        return f"FakeOptions({shown})"


@dataclass
class _ModelStats:
    requests: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


class FakeLlmServer:
    """The server; one event loop. ``await start()``, then ``await close()``.

    :meth:`answer` decides everything about a request when it arrives; its connection
    (scripts/fake_llm_http.py) writes the answer after the latency. A client that hangs up
    meanwhile gets nothing, and its request is no longer in flight.
    """

    def __init__(self, options: FakeOptions | None = None) -> None:
        self.options = options or FakeOptions()
        self._server: asyncio.AbstractServer | None = None
        self.connections: set = set()  # the open connections (scripts/fake_llm_http.py)
        self._attempts: dict[str, int] = {}
        self._replies_sent: dict[tuple, int] = {}  # (reply name, model, first user message) -> count
        self._stats: dict[str, _ModelStats] = {}
        self._preflight: dict[str, _ModelStats] = {}  # the preflight's chat requests, kept apart
        self._probes: dict[str, _ModelStats] = {}  # the engine's health probes, kept apart
        self._list_models = 0
        self._unknown_model = 0
        self._started = time.monotonic()
        self._first_request: float | None = None  # the first chat request of a run (bursts start there)
        self._limits = _sibling("fake_llm_limits").RateLimits(
            self.options.rpm_limit, self.options.tpm_limit, start_s=self.options.limits_start_s,
            headers=self.options.limit_headers) \
            if self.options.rpm_limit > 0 or self.options.tpm_limit > 0 else None
        self._last: dict[str, Any] = {}  # kind -> {"headers", "body"} of the last such request

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: a free port); returns the port."""
        connection = _sibling("fake_llm_http").Connection
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: connection(self), host, port, backlog=1024)
        self._started = time.monotonic()
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):  # answers still due are not sent
            connection.abort()
        await self._server.wait_closed()
        self._server = None

    def stats(self) -> dict[str, Any]:
        return {
            "uptime_s": round(time.monotonic() - self._started, 3),
            "first_request_s": None if self._first_request is None else round(self._first_request - self._started, 3),
            "models": {name: vars(s).copy() for name, s in sorted(self._stats.items())},
            "preflight": {"list_models": self._list_models,
                          "models": {name: vars(s).copy() for name, s in sorted(self._preflight.items())}},
            "probes": {name: vars(s).copy() for name, s in sorted(self._probes.items())},
            "unknown_model": self._unknown_model,
        }

    def answer(self, method: str, path: str, headers: dict, body: bytes) -> tuple[float, int, dict, Any, Callable | None]:
        """``(delay_s, status, extra headers, payload, on_sent)`` for one request (``path``: the
        target as sent, without its query; ``headers``: names in lower case)."""
        path = path.rstrip("/")
        if method == "GET" and path == "/stats":
            return 0.0, 200, {}, self.stats(), None
        if method == "GET" and path == "/last":
            return 0.0, 200, {}, self._last, None
        if method == "GET" and path in ("/v1/models", "/models"):
            self._list_models += 1
            self._last["list_models"] = {"headers": dict(headers), "body": None}
            if not self._key_ok(headers):
                return 0.0, 401, {}, _error("missing or wrong API key", "invalid_api_key"), None
            models = [{"id": m, "object": "model"} for m in (self.options.models or sorted(self._stats))]
            return 0.0, 200, {}, {"object": "list", "data": models}, None
        if method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
            return self._chat(headers, body)
        return 0.0, 404, {}, _error(f"no route for {method} {path}", "not_found"), None

    def _key_ok(self, headers: dict) -> bool:
        key = self.options.require_key
        return not key or hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {key}".encode())

    def _chat(self, headers: dict, body: bytes) -> tuple[float, int, dict, Any, Callable | None]:
        options = self.options
        auth = headers.get("authorization", "")
        echo = f"; you sent Authorization: {auth}" if options.echo_auth else ""
        if not self._key_ok(headers):
            return 0.0, 401, {}, _error("missing or wrong API key" + echo, "invalid_api_key"), None
        try:
            request = json.loads(body)
            model = str(request["model"])
            messages = request["messages"]
            texts = [str(m.get("content") or "") for m in messages]
        except (ValueError, KeyError, TypeError, AttributeError):
            return 0.0, 400, {}, _error("the body is not a chat completion request", "invalid_request"), None
        json_schema = (request.get("response_format") or {}).get("json_schema") or {}
        if json_schema.get("strict") and not _answers.strict_schema(json_schema.get("schema")):
            # As OpenAI: strict mode takes only closed objects with every property required.
            return 0.0, 400, {}, _error("invalid schema for strict mode: every object needs "
                                        "additionalProperties: false and all properties required",
                                        "invalid_request_error"), None
        if options.models and model not in options.models:
            self._unknown_model += 1
            return 0.0, 404, {}, _error(f"The model `{model}` does not exist", "model_not_found"), None
        table = (self._preflight if "x-pipeline-preflight" in headers
                 else self._probes if "x-pipeline-probe" in headers else self._stats)
        kind = "preflight" if table is self._preflight else "probe" if table is self._probes else "run"
        self._last[kind] = {"headers": dict(headers), "body": request}
        stats = table.get(model)
        if stats is None:
            stats = table[model] = _ModelStats()
        if kind == "run" and self._first_request is None:
            self._first_request = time.monotonic()
        stats.requests += 1
        stats.in_flight += 1
        if stats.in_flight > stats.max_in_flight:
            stats.max_in_flight = stats.in_flight

        def sent() -> None:
            stats.in_flight -= 1

        joined = "\n".join(texts)
        markers = dict(_MARKER.findall(joined)) if "[[" in joined else {}
        if "[[echo-auth]]" in joined:
            echo = f"; you sent Authorization: {auth}"
        delay_ms = float(markers["sleep-ms"]) if "sleep-ms" in markers else options.latency_ms
        delay_s = max(delay_ms, 0.0) / 1000
        key = hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()
        attempt = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempt
        # Faults are judged at the moment the answer goes out (bursts are windows in time).
        first = self._first_request if self._first_request is not None else self._started
        status, extra = self._fault(model, key, attempt, markers, time.monotonic() + delay_s - first)
        if status == 429:
            stats.rate_limited += 1
        elif status >= 500:
            stats.server_errors += 1
        if status != 200:
            return delay_s, status, extra, _error(f"injected HTTP {status}{echo}", "injected"), sent
        echoed = f"Here is what you sent: Authorization: {auth}" if "[[echo-auth]]" in joined else None
        reply = _REPLY.search(joined) if "[[reply:" in joined else None
        if reply is not None and options.replies and reply.group(1) in options.replies:
            return delay_s, 200, {}, self._reply(reply.group(1), model, messages, texts), sent
        completion = _answers.completion(request, model, texts, key, malformed_marker=options.malformed_marker,
                                         echoed=echoed)
        limit_headers: dict = {}
        if self._limits is not None:
            admitted, limit_headers = self._limits.admit(model, completion["usage"]["total_tokens"])
            if not admitted:
                stats.rate_limited += 1
                return delay_s, 429, limit_headers, _error("rate limit reached", "rate_limit_exceeded"), sent
        return delay_s, 200, limit_headers, completion, sent

    def _fault(self, model: str, key: str, attempt: int, markers: dict, elapsed: float) -> tuple[int, dict]:
        options = self.options
        if any(burst.covers(model, elapsed) for burst in options.burst_429):
            return 429, {"Retry-After": "0"}
        if "status" in markers and attempt <= int(markers.get("status-attempts", "1000000000")):
            extra = {header: markers[marker] for marker, header in
                     (("retry-after", "Retry-After"), ("retry-after-ms", "retry-after-ms")) if marker in markers}
            return int(markers["status"]), extra
        if attempt == 1 or options.faults_every_attempt:
            draw = _answers.unit(f"{key}:{attempt}")
            if draw < options.rate_429:
                return 429, {"Retry-After": f"{options.retry_after_s:g}"}
            if draw < options.rate_429 + options.rate_503:
                return 503, {}
        return 200, {}

    def _reply(self, name: str, model: str, messages: list, texts: list[str]) -> dict | bytes:
        """The exact answer ``replies[name]``; of a list, the n-th for the n-th request of a
        conversation (same model and first user message), the last ever after."""
        chosen = self.options.replies[name]
        if isinstance(chosen, list):
            first_user = next((str(m.get("content") or "") for m in messages if m.get("role") == "user"), "")
            key = (name, model, first_user)
            n = self._replies_sent.get(key, 0)
            self._replies_sent[key] = n + 1
            chosen = chosen[min(n, len(chosen) - 1)]
        return _answers.reply(chosen, name, model, texts)


def start_server(*, port: int = 0, **options: Any) -> tuple[str, Callable[[], None]]:
    """Serve from a background thread. Returns the base URL (ending in /v1) and ``stop()``.

    ``options`` are the fields of :class:`FakeOptions`; ``burst_429`` may hold strings.
    """
    server = FakeLlmServer(FakeOptions(**options))
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["port"] = loop.run_until_complete(server.start(port=port))
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc
            loop.close()
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(server.close())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=run, name="fake-llm-server", daemon=True)
    thread.start()
    ready.wait()
    if "error" in outcome:
        thread.join()
        raise outcome["error"]
    stopped = threading.Event()

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)

    return f"http://127.0.0.1:{outcome['port']}/v1", stop


def _parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every answer")
    parser.add_argument("--rate-429", type=float, default=0.0, help="share of first attempts answered 429")
    parser.add_argument("--rate-503", type=float, default=0.0, help="share of first attempts answered 503")
    parser.add_argument("--retry-after-s", type=float, default=0.0, help="Retry-After of injected 429s")
    parser.add_argument("--faults-every-attempt", action="store_true", help="inject faults on retries too")
    parser.add_argument("--malformed-marker", metavar="TEXT", help="prompts with TEXT get unusable output")
    parser.add_argument(
        "--burst-429", metavar="MODEL:START_S:DURATION_S", action="append", default=[], help="429 window (repeatable)"
    )
    parser.add_argument("--require-key", metavar="KEY", help="answer 401 without 'Authorization: Bearer KEY'")
    parser.add_argument("--echo-auth", action="store_true", help="quote the Authorization header in error bodies")
    parser.add_argument("--rpm-limit", type=float, default=0.0, help="requests per minute per model (0: none)")
    parser.add_argument("--tpm-limit", type=float, default=0.0, help="tokens per minute per model (0: none)")
    parser.add_argument("--limits-start-s", type=float, default=None,
                        help="rate-limit buckets start with this many seconds' share (default: a minute's)")
    parser.add_argument("--no-limit-headers", dest="limit_headers", action="store_false",
                        help="send no x-ratelimit-* headers")
    parser.add_argument("--replies", metavar="FILE", type=lambda path: json.loads(Path(path).read_text("utf-8")),
                        help="a JSON file of exact answers by name, chosen by [[reply:NAME]] in a prompt")
    parser.add_argument("--models", metavar="A,B", default=(), type=lambda text: tuple(m for m in text.split(",") if m),
                        help="serve only these models: list them, and 404 chat requests for others")
    return parser.parse_args(list(argv) if argv is not None else None)


def main(argv: Iterable[str] | None = None) -> int:
    args = _parse_args(argv)
    options = FakeOptions(**{name: value for name, value in vars(args).items() if name != "port"})

    async def serve() -> None:
        server = FakeLlmServer(options)
        port = await server.start(port=args.port)
        print(f"listening on http://127.0.0.1:{port}/v1", flush=True)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, done.set)
        await done.wait()
        await server.close()

    try:  # the faster loop when installed: the server's own overhead stays out of measurements
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
