"""Benchmark of pacing (issue 10 item 5): runs against the fake server enforcing a requests- and
a tokens-per-minute limit (scripts/fake_llm_limits.py), its buckets holding one second's share
at the start (not a minute's), so that the whole run is in the steady state: over a run of T
seconds the server admits at most ``limit / 60 x (T + 1)`` requests (or tokens).

    python scripts/bench_pacing.py            # or: python scripts/bench_llm.py --section pacing

Cases (one model, 32 requests in flight allowed, 20 ms latency):

- ``headers, requests``: the server allows 3,000 requests/min and says so in ``x-ratelimit-*``;
  no budget in the config;
- ``headers, tokens``: the server allows 30,000 tokens/min (an answer is ~25 tokens) and says so;
- ``budgets``: the server sends no headers; the config sets ``max_requests_per_minute`` and
  ``max_tokens_per_minute`` to the server's limits;
- ``none``: no headers, no budgets: what pacing saves (429s answered, the AIMD alone).

Printed per case: the allowed rate, the achieved rate (its share of the allowed rate, over the
run's wall time T from the start of ``pipeline.run``, against ``limit x (T + 1 s)``), and the 429s (count and share of the
requests). Target: >= 95 % of the allowed rate with <= 1 % 429s. One untimed run warms the
process up first (lazy imports, first SQLite store).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_llm import FakeServer, state_home  # noqa: E402

LATENCY_MS = 20.0
PARALLEL = 32

CASES = [
    # name, server flags, model config extras, records, which limit binds
    ("headers, requests", ["--rpm-limit", "3000", "--limits-start-s", "1"], "", 600, ("requests", 3000)),
    ("headers, tokens", ["--tpm-limit", "30000", "--limits-start-s", "1"], "", 300, ("tokens", 30000)),
    ("budgets", ["--rpm-limit", "3000", "--tpm-limit", "90000", "--limits-start-s", "1", "--no-limit-headers"],
     ", max_requests_per_minute: 3000, max_tokens_per_minute: 90000", 600, ("requests", 3000)),
    ("none", ["--rpm-limit", "3000", "--limits-start-s", "1", "--no-limit-headers"], "", 600, ("requests", 3000)),
]


def pacing_run(flags: list[str], extras: str, records: int) -> dict:
    import pipeline
    from pipeline.api import status
    from pipeline.config import load_config

    with FakeServer(*flags, latency_ms=LATENCY_MS) as server, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pacing.yaml"
        path.write_text("\n".join([
            "name: pacing", f"num_records: {records}", "row_group_size: 100",
            "settings: {max_concurrent_row_groups: 4, retry_backoff_s: 0.05, salvage_max_rounds: 30}",
            "models:",
            f"  a: {{base_url: '{server.url}', model: m, max_parallel_requests: {PARALLEL}{extras}}}",
            "columns:",
            "  - {name: id, type: sampler, sampler: uuid}",
            "  - {name: text, type: llm_text, model: a, max_tokens: 40, prompt: 'Write about {{ id }} in a few words.'}",
        ]) + "\n")
        cfg = load_config(path)
        run_id = f"pacing-{os.getpid()}-{time.monotonic_ns()}"
        t0 = time.perf_counter()
        result = pipeline.run(cfg, home=state_home(), run_id=run_id, check_models=False)
        wall = time.perf_counter() - t0
        assert result.status == "complete" and result.stats.records_dropped == 0, result
        served = server.stats()["models"]["m"]
        usage = status(run_id, home=state_home())["models"]["a"]
    return {"wall_s": wall, "requests": served["requests"], "rate_limited": served["rate_limited"],
            "answered": served["requests"] - served["rate_limited"],
            "tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


def pacing_section() -> list[dict]:
    print(f"pacing: one model, {PARALLEL} in flight, {LATENCY_MS:g} ms latency; the fake server enforces "
          "per-minute limits, its buckets holding 1 s of budget at the start")
    print(f"{'case':<18} {'records':>7} {'allowed':>16} {'achieved':>16} {'share':>7} {'429s':>6} {'429 %':>6}")
    pacing_run([], "", 50)  # untimed: lazy imports and the first store of the process
    rows = []
    for name, flags, extras, records, (unit, limit) in CASES:
        r = pacing_run(flags, extras, records)
        achieved = (r["answered"] if unit == "requests" else r["tokens"]) / r["wall_s"] * 60
        share = achieved / (limit * (r["wall_s"] + 1) / r["wall_s"])  # what the server allowed: T + 1 s
        row = {"case": name, "unit": unit, "allowed_per_min": limit, "achieved_per_min": achieved,
               "share": share, "429": r["rate_limited"], "429_share": r["rate_limited"] / max(1, r["requests"])}
        rows.append(row)
        print(f"{name:<18} {records:>7} {limit:>9,} {unit[:3]}/min {achieved:>9,.0f} {unit[:3]}/min "
              f"{share:>6.1%} {r['rate_limited']:>6} {row['429_share']:>6.1%}")
    print("target: >= 95 % of the allowed rate with <= 1 % 429s (cases with pacing)")
    return rows


if __name__ == "__main__":
    pacing_section()
