"""Model usage in the state store: requests and tokens per task (while its row group is live)
and summed per run, model alias and generator in ``model_usage`` (kept after compaction), with
the model's last concurrency and the finished calls resumes saved. Same SQL on SQLite and
PostgreSQL."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

__all__ = ["add_calls_saved", "read", "truncated", "write"]

_TASK_USAGE = sa.text(
    "UPDATE tasks SET requests = COALESCE(requests, 0) + :n, prompt_tokens = COALESCE(prompt_tokens, 0) + :p, "
    "completion_tokens = COALESCE(completion_tokens, 0) + :c, finish_reason = COALESCE(:f, finish_reason) "
    "WHERE run_id = :r AND row_group = :rg AND column_name = :g AND slot = :s")
_MODEL_USAGE = sa.text(
    "INSERT INTO model_usage (run_id, model, generator, requests, prompt_tokens, completion_tokens, rate_limited, "
    "concurrency, calls_saved, truncated, updated_at) VALUES (:r, :m, :g, :n, :p, :c, :l, :k, 0, :x, :t) "
    "ON CONFLICT (run_id, model, generator) DO UPDATE SET requests = model_usage.requests + excluded.requests, "
    "truncated = model_usage.truncated + excluded.truncated, "
    "prompt_tokens = model_usage.prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = model_usage.completion_tokens + excluded.completion_tokens, "
    "rate_limited = model_usage.rate_limited + excluded.rate_limited, "
    "concurrency = excluded.concurrency, updated_at = excluded.updated_at")
_CALLS_SAVED = sa.text(
    "INSERT INTO model_usage (run_id, model, generator, calls_saved, updated_at) VALUES (:r, :m, :g, :n, :t) "
    "ON CONFLICT (run_id, model, generator) DO UPDATE SET "
    "calls_saved = model_usage.calls_saved + excluded.calls_saved, updated_at = excluded.updated_at")


def write(conn: Connection, run_id: str, now: float, ours: dict, usage: list) -> None:
    """``usage``: ``[((rg, generator, row_index), (model, requests, prompt, completion,
    rate_limited, concurrency, finish_reason, truncated))]`` from one journal batch, in event
    order. Only row groups this owner holds (``ours``) count: a fenced-out zombie's calls are
    not added. Two statements per batch, whatever its size: one ``executemany`` per table."""
    per_task: dict[tuple, list] = {}
    per_model: dict[tuple[str, str], list] = {}
    for key, (model, n, p, c, limited, concurrency, finish_reason, truncated) in usage:
        if key[0] not in ours:
            continue
        t = per_task.setdefault(key, [0, 0, 0, None])
        t[0] += n
        t[1] += p
        t[2] += c
        if finish_reason is not None:
            t[3] = finish_reason  # the latest answer's
        m = per_model.setdefault((model, key[1]), [0, 0, 0, 0, None, 0])
        m[0] += n
        m[1] += p
        m[2] += c
        m[3] += limited
        m[4] = concurrency
        m[5] += truncated
    if not per_task:
        return
    conn.execute(_TASK_USAGE, [
        {"r": run_id, "rg": rg, "g": gen, "s": -1 if ri is None else ri, "n": n, "p": p, "c": c, "f": f}
        for (rg, gen, ri), (n, p, c, f) in per_task.items()])
    conn.execute(_MODEL_USAGE, [
        {"r": run_id, "m": model, "g": gen, "n": n, "p": p, "c": c, "l": limited, "k": concurrency, "x": x,
         "t": now}
        for (model, gen), (n, p, c, limited, concurrency, x) in per_model.items()])


def truncated(conn: Connection, run_id: str) -> dict[str, int]:
    """``{generator: kept text answers cut by length}`` of the run (generators with model usage)."""
    rows = conn.execute(sa.text(
        "SELECT generator, SUM(truncated) FROM model_usage WHERE run_id = :r GROUP BY generator"), {"r": run_id})
    return {generator: int(n or 0) for generator, n in rows}


def read(conn: Connection, run_id: str) -> dict[str, dict[str, int]]:
    """``{model alias: {requests, prompt_tokens, completion_tokens, rate_limited, concurrency,
    calls_saved}}`` summed over the run's generators."""
    out: dict[str, dict[str, int]] = {}
    rows = conn.execute(sa.text(
        "SELECT model, requests, prompt_tokens, completion_tokens, rate_limited, concurrency, calls_saved "
        "FROM model_usage WHERE run_id = :r ORDER BY model, generator"), {"r": run_id}).all()
    for model, n, p, c, limited, concurrency, saved in rows:
        m = out.setdefault(model, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                   "rate_limited": 0, "concurrency": None, "calls_saved": 0})
        m["requests"] += n
        m["prompt_tokens"] += p
        m["completion_tokens"] += c
        m["rate_limited"] += limited
        m["calls_saved"] += saved
        if concurrency is not None:
            m["concurrency"] = concurrency
    return out


def add_calls_saved(conn: Connection, run_id: str, saved: dict[tuple[str, str], int]) -> None:
    rows = [{"r": run_id, "m": m, "g": g, "n": n, "t": time.time()} for (m, g), n in saved.items() if n]
    if rows:
        conn.execute(_CALLS_SAVED, rows)
