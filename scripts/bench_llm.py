"""Benchmark of the LLM columns: the "dual" shape against the fake OpenAI-compatible server.

    python scripts/bench_llm.py                # the table, medians of 3 runs per case
    python scripts/bench_llm.py --repeat 5
    python scripts/bench_llm.py --diagnose     # also: permits in use, and the HTTP clients compared
    python scripts/bench_llm.py --section pacing   # pacing against per-minute limits (bench_pacing.py)

The dual shape: 200 records; 3 writer columns (``llm_text``) on model A, each followed by a
judge column (``llm_judge``) on model B that reads it: 1,200 calls, 600 per model. The server
answers every request after 50 ms. A and B allow 32 requests in flight each (64 in total);
row groups of 50, 4 admitted at once (the whole dataset: nothing waits for admission).

The figure is ``makespan / lower bound``: makespan is the wall time of ``pipeline.run`` (SQLite
store in one temporary home migrated before timing; process start and imports excluded); the lower bound is
``max(critical path x latency, calls x latency / 64)`` with a critical path of 2 calls (writer,
then judge) and 1,200 calls, i.e. max(0.10 s, 0.94 s) = 0.94 s. Target <= 1.10 (the reference
engine: 1.16, with 64 sleeping Python cells sharing one pool and no HTTP).

Two floors are printed with it, because that bound is not reachable here:

- the split: with 32 permits per model, model B has nothing to do until A's first answers come
  back, so no scheduler can finish before ``latency + 600 x latency / 32`` = 0.99 s (ratio 1.053);
- this machine: the same 600 writer -> judge chains driven by raw asyncio HTTP/1.1 keep-alive
  connections (32 + 32), with no engine and no store, against the same server. Its makespan is
  the floor of the server, the loopback and the event loops sharing 2 cores; ``engine / floor``
  is what the engine adds to it.

With faults (5 % of first attempts answered 503, or 429), the same ratio is printed against the
fault-free bound (what a user sees), and against a bound that counts the extra calls and, on
the critical path, one retry (its latency and the shortest backoff, ``retry_backoff_s x 0.5``).
The fake server's injected 429s carry ``Retry-After: 0`` (its ``--retry-after-s`` default), and
the engine waits ``max(backoff, Retry-After)``, i.e. the backoff, as after a 503: the two fault
cases have the same bound. The server runs in its own process, so it does not share the
engine's GIL. One untimed run warms the process up first (lazy imports, first SQLite store).

``--diagnose`` adds columns (permits in use, mean limits) and rows that take the engine apart
(no-fault case, same medians):

- ``engine, no HTTP``: the pipeline with ``LlmClient.complete`` replaced by a 50 ms
  ``asyncio.sleep`` and the fake server's answer: the engine's own overhead;
- per HTTP client, the client alone (1,200 calls, 64 at once, no engine: wall time and CPU per
  call, connections warm) and the dual ratio with it:
  ``aiohttp`` (``LlmClient``, the one in use); ``httpx pool``: LlmClient with its HTTP done by
  one ``httpx.AsyncClient`` pool of 64 connections (httpcore's pool scans all its connections
  for every queued request, O(N^2) per batch at 64 in flight).
"""

# This file runs the cases (the fake server, the dual and burst configs, the runs and their
# tables); the machine floor and the --diagnose rows are in
# scripts/bench_llm_floors.py.

from __future__ import annotations

import argparse
import os
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# One module, whether run as a script or imported: bench_llm_floors imports it for the shape
# below (which bench_compare.py may change) and the state home.
sys.modules.setdefault("bench_llm", sys.modules[__name__])

RECORDS = 200
WRITERS = 3
LATENCY_MS = 50.0
PER_MODEL = 32  # A and B: 64 in flight in total
CONCURRENCY = 2 * PER_MODEL
ROW_GROUP_SIZE = 50
ROW_GROUPS_AT_ONCE = 4
RETRY_BACKOFF_S = 0.05
CALLS = RECORDS * WRITERS * 2
CRITICAL_PATH_CALLS = 2

CASES = [
    ("no faults", []),
    ("5% 503", ["--rate-503", "0.05"]),
    ("5% 429", ["--rate-429", "0.05"]),
]


class FakeServer:
    """scripts/fake_llm_server.py in its own process."""

    def __init__(self, *flags: str, latency_ms: float = LATENCY_MS) -> None:
        cmd = [sys.executable, str(ROOT / "scripts" / "fake_llm_server.py"), "--port", "0",
               "--latency-ms", str(latency_ms), *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the fake server did not start: {line!r}")
        self.url = line.removeprefix("listening on ")
        self.root = self.url.removesuffix("/v1")

    def stats(self) -> dict:
        with urllib.request.urlopen(self.root + "/stats", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dual_config(folder: Path, url: str, *, seed: int = 0):
    """The dual shape as a loaded config (prompts differ per record: an uuid sampler)."""
    from pipeline.config import load_config

    lines = [
        "name: dual",
        f"num_records: {RECORDS}",
        f"row_group_size: {ROW_GROUP_SIZE}",
        f"seed: {seed}",
        f"settings: {{max_concurrent_row_groups: {ROW_GROUPS_AT_ONCE}, retry_backoff_s: {RETRY_BACKOFF_S}}}",
        "models:",
        f"  a: {{base_url: '{url}', model: writer-model, max_parallel_requests: {PER_MODEL}}}",
        f"  b: {{base_url: '{url}', model: judge-model, max_parallel_requests: {PER_MODEL}}}",
        "columns:",
        "  - {name: id, type: sampler, sampler: uuid}",
        "  - {name: topic, type: sampler, sampler: category, params: {values: [books, games, tools, music]}}",
    ]
    for i in range(WRITERS):
        lines.append(f"  - {{name: w{i}, type: llm_text, model: a, "
                     f"prompt: 'Write review {i} of a {{{{ topic }}}} product, record {{{{ id }}}}.'}}")
        lines.append(f"  - {{name: j{i}, type: llm_judge, model: b, prompt: 'Judge this review: {{{{ w{i} }}}}', "
                     f"rubric: {{helpful: 'Is it helpful?', fluent: 'Is it fluent?'}}}}")
    path = folder / "dual.yaml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path)


class Sampler(threading.Thread):
    """Samples the two limits' permits in use every ``every_s`` (for --diagnose), from when the
    run has made its runtime (``runtimes``: :func:`run_runtimes`' list)."""

    def __init__(self, runtimes: list, every_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.runtimes = runtimes
        self.every_s = every_s
        self.samples: list[tuple[float, dict]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.halt.is_set():
            if self.runtimes:
                self.samples.append((time.perf_counter() - t0,
                                     {a: (l.in_use, l.limit) for a, l in self.runtimes[0].limits.items()}))
            time.sleep(self.every_s)


_STATE_HOME: Path | None = None


def state_home() -> Path:
    """One state store for every run of this process, migrated before anything is timed, as a
    user's store is (a new database costs its migrations once, ~40 ms)."""
    global _STATE_HOME
    if _STATE_HOME is None:
        from pipeline.api import open_state

        _STATE_HOME = Path(tempfile.mkdtemp(prefix="bench-llm-home-"))
        open_state(_STATE_HOME)[1].close()
    return _STATE_HOME


@contextlib.contextmanager
def run_runtimes(client: Callable | None = None) -> Iterator[list]:
    """Inside, every LLM runtime a run's job makes (one per run: pipeline.api.jobs.Job makes and
    owns it) is appended to the list given, with its HTTP client made by
    ``client(max_connections)`` when given."""
    from pipeline import llm

    made: list = []
    real = llm.LlmRuntime

    class Recorded(real):
        def __init__(self, models):
            super().__init__(models)
            if client is not None:
                self.client = client(self.client.max_connections)
            made.append(self)

    llm.LlmRuntime = Recorded
    try:
        yield made
    finally:
        llm.LlmRuntime = real


def one_run(flags: list[str], seed: int, diagnose: bool = False, client: Callable | None = None) -> dict:
    """One dual run; ``client(max_connections)`` makes the HTTP client (default: LlmClient)."""
    import pipeline

    with run_runtimes(client) as made, FakeServer(*flags) as server, \
            tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        cfg = dual_config(Path(tmp), server.url, seed=seed)
        sampler = Sampler(made) if diagnose else None
        if sampler:
            sampler.start()
        t0 = time.perf_counter()
        # check_models=False: the makespan is the engine's; the model check is not part of it.
        result = pipeline.run(cfg, home=state_home(), run_id=f"dual-{seed}-{os.getpid()}-{time.monotonic_ns()}",
                              check_models=False)
        makespan = time.perf_counter() - t0
        if sampler:
            sampler.halt.set()
            sampler.join()
        assert result.status == "complete", result.status
        assert result.stats.records_dropped == 0, result.stats
        stats = server.stats()["models"]
        runtime = made[0]
        limits = runtime.stats()
    requests = sum(m["requests"] for m in stats.values())
    out = {"makespan": makespan, "requests": requests,
           "max_in_flight": {m: s["max_in_flight"] for m, s in stats.items()},
           "faults": sum(m["rate_limited"] + m["server_errors"] for m in stats.values()),
           "cuts": {a: s["decreases"] for a, s in limits.items()},
           "final_limit": {a: s["limit"] for a, s in limits.items()}}
    if sampler:
        samples = sampler.samples
        busy = [sum(v[0] for v in s.values()) for _, s in samples]
        out["mean_in_use"] = statistics.fmean(busy) if busy else 0.0
        # when was the pipe full: first and last moment with >= 90 % of the slots busy
        full = [t for (t, s), b in zip(samples, busy) if b >= 0.9 * CONCURRENCY]
        out["full_from"], out["full_to"] = (full[0], full[-1]) if full else (None, None)
        out["mean_limit"] = {a: statistics.fmean(s[a][1] for _, s in samples) for a in runtime.limits}
    return out

def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def lower_bound(calls: int, faulted: bool) -> float:
    lat = LATENCY_MS / 1000
    path = CRITICAL_PATH_CALLS * lat
    if faulted:
        path += lat + RETRY_BACKOFF_S * 0.5
    return max(path, calls * lat / CONCURRENCY)


def dual_section(repeat: int = 3, diagnose: bool = False) -> None:
    from bench_llm_floors import diagnose_rows, ideal_client_run

    base = lower_bound(CALLS, False)
    print(f"dual: {RECORDS} records, {WRITERS} writers (model A) each judged (model B), {CALLS:,} calls, "
          f"{LATENCY_MS:g} ms latency, {PER_MODEL}+{PER_MODEL} in flight, row groups of {ROW_GROUP_SIZE} "
          f"x{ROW_GROUPS_AT_ONCE}, SQLite store; HTTP client: LlmClient (aiohttp {_version('aiohttp')}); "
          f"median of {repeat}")
    print(f"lower bound without faults: max({CRITICAL_PATH_CALLS} x {LATENCY_MS / 1000:g} s, "
          f"{CALLS} x {LATENCY_MS / 1000:g} s / {CONCURRENCY}) = {base:.3f} s; target ratio <= 1.10 "
          f"(reference engine 1.16)")
    split = LATENCY_MS / 1000 + RECORDS * WRITERS * LATENCY_MS / 1000 / PER_MODEL
    print(f"split floor: model B waits for A's first answers: {LATENCY_MS / 1000:g} s + "
          f"{RECORDS * WRITERS} x {LATENCY_MS / 1000:g} s / {PER_MODEL} = {split:.3f} s (ratio {split / base:.3f}) "
          "for any scheduler")
    print("faults hit 5 % of first attempts; injected 429s carry Retry-After: 0, so a 429 waits the backoff "
          "like a 503 and both use the same adjusted bound (extra calls; one retry on the critical path)")
    header = (f"{'case':<10} {'makespan s':>10} {'ratio':>6} {'requests':>9} {'faults':>7} "
              f"{'adj. bound s':>12} {'adj. ratio':>10} {'A/B cuts':>9} {'server max in flight A/B':>25}")
    if diagnose:
        header += f" {'mean busy':>9} {'mean limit A/B':>15}"
    one_run([], seed=999)  # warm-up, not counted
    print(header)
    clean = float("nan")
    for i, (name, flags) in enumerate(CASES):
        runs = [one_run(flags, seed=100 * i + k, diagnose=diagnose) for k in range(repeat)]
        makespan = statistics.median(r["makespan"] for r in runs)
        requests = statistics.median(r["requests"] for r in runs)
        faults = statistics.median(r["faults"] for r in runs)
        adj = lower_bound(int(requests), bool(flags))
        cuts = "/".join(f"{statistics.median(r['cuts'][a] for r in runs):g}" for a in ("a", "b"))
        peak = "/".join(f"{statistics.median(r['max_in_flight'][m] for r in runs):g}"
                        for m in ("writer-model", "judge-model"))
        line = (f"{name:<10} {makespan:>10.3f} {makespan / base:>6.2f} {requests:>9,.0f} {faults:>7,.0f} "
                f"{adj:>12.3f} {makespan / adj:>10.2f} {cuts:>9} {peak:>25}")
        if diagnose:
            busy = statistics.median(r["mean_in_use"] for r in runs)
            lim = "/".join(f"{statistics.median(r['mean_limit'][a] for r in runs):.1f}" for a in ("a", "b"))
            line += f" {busy:>9.1f} {lim:>15}"
        print(line, flush=True)
        if not flags:
            clean = makespan
    floor = statistics.median(ideal_client_run(900 + k) for k in range(repeat))
    print(f"machine floor: raw asyncio HTTP client, no engine, no store, same server and chains: {floor:.3f} s "
          f"(ratio {floor / base:.2f}); no faults, engine / floor: {clean / floor:.2f}", flush=True)
    if diagnose:
        diagnose_rows(repeat, base)


def burst_run(flags: list[str], seed: int) -> dict:
    """Two independent LLM columns, on models A and B (16 permits each), 300 records, 50 ms.
    Returns model B's throughput (calls / span from its first start to its last finish) and
    A's lowest limit, from the run's trace."""
    import pipeline
    from pipeline.config import load_config

    with run_runtimes() as made, FakeServer("--latency-ms", "50", *flags) as server, \
            tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "burst.yaml"
        path.write_text("\n".join([
            "name: burst", "num_records: 300", "row_group_size: 50", f"seed: {seed}",
            "settings: {max_concurrent_row_groups: 6, retry_backoff_s: 0.05, salvage_max_rounds: 12}",
            "models:",
            f"  a: {{base_url: '{server.url}', model: writer-model, max_parallel_requests: 16}}",
            f"  b: {{base_url: '{server.url}', model: judge-model, max_parallel_requests: 16}}",
            "columns:",
            "  - {name: id, type: sampler, sampler: uuid}",
            "  - {name: a_text, type: llm_text, model: a, prompt: 'A about {{ id }}'}",
            "  - {name: b_text, type: llm_text, model: b, prompt: 'B about {{ id }}'}",
        ]) + "\n")
        cfg = load_config(path)
        sampler = Sampler(made)
        sampler.start()
        run_id = f"burst-{seed}-{os.getpid()}-{time.monotonic_ns()}"
        result = pipeline.run(cfg, home=state_home(), run_id=run_id, trace=True, check_models=False)
        sampler.halt.set()
        sampler.join()
        assert result.status == "complete" and result.stats.records_dropped == 0, result
        from pipeline.api import open_state

        _, store = open_state(state_home())
        try:
            traces = store.traces(run_id)
        finally:
            store.close()
        b = [t for t in traces if t["column_name"] == "b_text" and t["outcome"] == "ok"]
        span = max(t["finished_at"] for t in b) - min(t["started_at"] for t in b)
        lowest_a = min(s["a"][1] for _, s in sampler.samples) if sampler.samples else None
        a_429 = server.stats()["models"].get("writer-model", {}).get("rate_limited", 0)
    return {"b_per_s": len(b) / span, "lowest_a_limit": lowest_a, "a_429": a_429}


def burst_section(repeat: int = 3) -> None:
    """Issue #4: under a burst of 429s on model A, model B's throughput stays within 10%."""
    print("burst: models A and B, 16 permits each, 300 independent calls each, 50 ms latency; "
          f"A gets only 429s (Retry-After: 0) from 0.3 s to 1.3 s of server time; median of {repeat}")
    calm = [burst_run([], seed) for seed in range(repeat)]
    burst = [burst_run(["--burst-429", "writer-model:0.3:1.0"], seed) for seed in range(repeat)]
    b_calm = statistics.median(r["b_per_s"] for r in calm)
    b_burst = statistics.median(r["b_per_s"] for r in burst)
    print(f"model B throughput: {b_calm:.0f} calls/s without the burst, {b_burst:.0f} with it: "
          f"ratio {b_burst / b_calm:.2f} (target >= 0.90); during the burst A's limit fell to "
          f"{min(r['lowest_a_limit'] for r in burst)} of 16 after {statistics.median(r['a_429'] for r in burst):.0f} 429s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--section", choices=["dual", "burst", "pacing", "all"], default="all")
    parser.add_argument("--diagnose", action="store_true", help="sample the permits in use during each run; compare the engine's parts and HTTP clients")
    args = parser.parse_args()
    if args.section in ("dual", "all"):
        dual_section(args.repeat, diagnose=args.diagnose)
    if args.section in ("burst", "all"):
        burst_section(args.repeat)
    if args.section in ("pacing", "all"):  # issue 10: pacing against per-minute limits (scripts/bench_pacing.py)
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_pacing import pacing_section

        pacing_section()


if __name__ == "__main__":
    main()
