"""What scripts/bench_llm.py measures the engine against, beside its lower bound.

- :func:`ideal_client_run`, the machine floor (every dual section prints it): the dual shape's
  ``RECORDS x WRITERS`` writer -> judge chains driven by raw asyncio HTTP/1.1 keep-alive
  connections (``PER_MODEL`` per model), no engine and no store, against the same fake server
  in its own process. Returns the makespan in seconds.
- :func:`diagnose_rows` (``--diagnose``): the engine with no HTTP (:func:`no_http_run`: every
  call a ``LATENCY_MS`` sleep and the fake server's answer), and per HTTP client the client alone
  (:func:`client_only_run`: ``CALLS`` calls, ``CONCURRENCY`` at once; wall seconds and CPU
  seconds) and the dual ratio with it: ``aiohttp`` (LlmClient) and ``httpx pool``
  (:func:`httpx_pool_client`). (The httpx "lanes" client of commit d738424, which aiohttp
  replaced, was compared here until the engine's answers gained ``finish_reason``.)

The shape (``RECORDS``, ``CALLS``, ...), the fake server, the state home and the dual run are
bench_llm's, read from that module when a function runs (scripts/bench_compare.py shrinks
``RECORDS`` and ``CALLS`` for its quick sizes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import bench_llm as bench


def _judge_request(text: str) -> dict:
    from pipeline.generators.llm import _judge_instructions, judge_schema

    rubric = {"helpful": "Is it helpful?", "fluent": "Is it fluent?"}
    return {"model": "judge-model",
            "messages": [{"role": "user", "content": f"Judge this review: {text}" + _judge_instructions(rubric)}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "j", "schema": judge_schema(rubric), "strict": True}}}


async def _ideal_client(url: str, seed: int) -> float:
    """The dual shape driven by raw keep-alive connections, 32 per model; returns the makespan."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    pools = {}
    for model in ("writer-model", "judge-model"):
        pools[model] = asyncio.Queue()
        for _ in range(bench.PER_MODEL):
            pools[model].put_nowait(await asyncio.open_connection(host, int(port)))

    async def call(model: str, body: dict) -> dict:
        reader, writer = await pools[model].get()
        data = json.dumps(body).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (host.encode(), len(data)) + data)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        answer = json.loads(await reader.readexactly(length))
        pools[model].put_nowait((reader, writer))
        return answer

    async def chain(record: int, i: int) -> None:
        prompt = f"Write review {i} of a product, record {seed}-{record}."
        text = (await call("writer-model", {"model": "writer-model", "messages": [{"role": "user", "content": prompt}]})
                )["choices"][0]["message"]["content"]
        await call("judge-model", _judge_request(text))

    t0 = time.perf_counter()
    await asyncio.gather(*(chain(r, i) for r in range(bench.RECORDS) for i in range(bench.WRITERS)))
    makespan = time.perf_counter() - t0
    for pool in pools.values():
        while not pool.empty():
            _, writer = pool.get_nowait()
            writer.close()
    return makespan


def ideal_client_run(seed: int) -> float:
    with bench.FakeServer() as server:
        return asyncio.run(_ideal_client(server.url, seed))


@contextlib.contextmanager
def _patched(cls: type, name: str, fn) -> object:
    original = getattr(cls, name)
    setattr(cls, name, fn)
    try:
        yield
    finally:
        setattr(cls, name, original)


def no_http_run(seed: int) -> float:
    """The engine with every call replaced by a 50 ms sleep and the fake server's answer."""
    import pipeline
    from pipeline.llm import client as llm_client

    sys.path.insert(0, str(bench.ROOT / "scripts"))
    from fake_llm_server import sample_from_schema

    async def complete(self, endpoint, messages, *, temperature=None, max_tokens=None, response_format=None):
        await asyncio.sleep(bench.LATENCY_MS / 1000)
        user = messages[-1]["content"]
        digest = hashlib.sha256(user.encode()).hexdigest()[:12]
        if response_format:
            text = json.dumps(sample_from_schema(response_format["json_schema"]["schema"], digest))
        else:
            text = f"echo: {digest} " + " ".join(user.split()[:12])
        return llm_client.Completion(text, 1, 1)

    with _patched(llm_client.LlmClient, "complete", complete), \
            tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        cfg = bench.dual_config(Path(tmp), "http://127.0.0.1:9/v1", seed=seed)
        t0 = time.perf_counter()
        result = pipeline.run(cfg, home=bench.state_home(), run_id=f"nohttp-{os.getpid()}-{time.monotonic_ns()}",
                              check_models=False)  # no server: `complete` is patched
        makespan = time.perf_counter() - t0
    assert result.status == "complete"
    return makespan


def httpx_pool_client(max_connections: int):
    """LlmClient with its HTTP done by one ``httpx.AsyncClient`` (HTTP/1.1, a pool sized to
    the concurrency) instead of aiohttp: same payload, parsing and mapping of statuses."""
    return _httpx_pool_class()(max_connections=max_connections)


@functools.cache
def _httpx_pool_class() -> type:
    import httpx

    from pipeline.errors import ModelConnectionError, ModelTimeoutError
    from pipeline.llm.client import LlmClient
    from pipeline.llm.responses import Answer, status_error

    class HttpxPoolClient(LlmClient):
        _http: httpx.AsyncClient | None = None

        async def aclose(self) -> None:
            http, self._http = self._http, None
            if http is not None:
                await http.aclose()

        async def _post(self, endpoint, body):
            if self._http is None:
                limits = httpx.Limits(max_connections=self.max_connections,
                                      max_keepalive_connections=self.max_connections)
                self._http = httpx.AsyncClient(limits=limits, headers={"User-Agent": "pipeline-llm"},
                                               follow_redirects=False)
            headers = {"Accept": "application/json", "Content-Type": "application/json"}
            try:
                async with asyncio.timeout(endpoint.timeout_s):
                    response = await self._http.post(endpoint.url, content=body, headers=headers,
                                                      timeout=httpx.Timeout(endpoint.timeout_s))
            except (httpx.TimeoutException, TimeoutError):
                return ModelTimeoutError(f"{endpoint.where}: no answer within {endpoint.timeout_s:g} s")
            except httpx.TransportError as exc:
                return ModelConnectionError(f"{endpoint.where}: cannot connect ({type(exc).__name__})")
            answer = Answer(response.status_code, response.headers, response.content)
            return status_error(endpoint, answer) if answer.status_code >= 300 else answer

    return HttpxPoolClient


def client_only_run(seed: int, client: Callable | None = None) -> tuple[float, float]:
    """1,200 calls through a client alone (64 at once, no engine), connections warmed first:
    (makespan, CPU seconds of this process)."""
    from pipeline.llm import LlmClient, ModelEndpoint

    async def drive(url: str) -> tuple[float, float]:
        llm = client(bench.CONCURRENCY) if client is not None else LlmClient(max_connections=bench.CONCURRENCY)
        endpoint = ModelEndpoint("a", url, "writer-model", max_parallel_requests=bench.CONCURRENCY)
        gate = asyncio.Semaphore(bench.CONCURRENCY)

        async def one(i: int) -> None:
            async with gate:
                await llm.complete(endpoint, [{"role": "user", "content": f"client only {seed} {i}"}])

        try:
            await asyncio.gather(*(one(-1 - i) for i in range(bench.CONCURRENCY)))  # open the connections
            t0, c0 = time.perf_counter(), time.process_time()
            await asyncio.gather(*(one(i) for i in range(bench.CALLS)))
            return time.perf_counter() - t0, time.process_time() - c0
        finally:
            await llm.aclose()

    with bench.FakeServer() as server:
        return asyncio.run(drive(server.url))


def diagnose_rows(repeat: int, base: float) -> None:
    print("diagnostics (no faults):")
    rows = [("engine, calls = 50 ms sleeps (no HTTP)", [no_http_run(910 + k) for k in range(repeat)])]
    for name, runs in rows:
        makespan = statistics.median(runs)
        print(f"  {name:<46} {makespan:>7.3f} s  ratio {makespan / base:.2f}", flush=True)
    print(f"HTTP clients (aiohttp {bench._version('aiohttp')}, httpx {bench._version('httpx')}, "
          f"httpcore {bench._version('httpcore')}): the client alone, {bench.CALLS:,} calls, {bench.CONCURRENCY} at once; "
          f"then the dual shape with it")
    print(f"  {'client':<40} {'alone s':>8} {'CPU ms/call':>11} {'dual s':>7} {'ratio':>6}")
    clients = [("aiohttp (LlmClient, in use)", None), ("httpx pool of 64 (plain AsyncClient)", httpx_pool_client)]
    for k, (name, client) in enumerate(clients):
        alone = [client_only_run(930 + 10 * k + i, client) for i in range(repeat)]
        wall = statistics.median(a[0] for a in alone)
        cpu = statistics.median(a[1] for a in alone)
        dual = statistics.median(bench.one_run([], seed=960 + 10 * k + i, client=client)["makespan"] for i in range(repeat))
        print(f"  {name:<40} {wall:>8.3f} {1000 * cpu / bench.CALLS:>11.2f} {dual:>7.3f} {dual / base:>6.2f}", flush=True)
