"""Model usage in the state store: requests and tokens per task (while its row group is live)
and summed per run, model alias and generator in ``model_usage`` (kept after compaction), with
the model's last concurrency, the finished calls resumes saved, the money spent (``cost``) and
the model's last pacing snapshot (``pacing_json``). Same SQL on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.store.events import ModelUsage, TaskKey, TaskUsage

__all__ = ["add_calls_saved", "read", "truncated", "write"]

_TASK_USAGE = sa.text(
    "UPDATE tasks SET requests = COALESCE(requests, 0) + :n, prompt_tokens = COALESCE(prompt_tokens, 0) + :p, "
    "completion_tokens = COALESCE(completion_tokens, 0) + :c, finish_reason = COALESCE(:f, finish_reason) "
    "WHERE run_id = :r AND row_group = :rg AND column_name = :g AND slot = :s")
_MODEL_USAGE = sa.text(
    "INSERT INTO model_usage (run_id, model, generator, requests, prompt_tokens, completion_tokens, rate_limited, "
    "concurrency, calls_saved, truncated, updated_at, cost, pacing_json) "
    "VALUES (:r, :m, :g, :n, :p, :c, :l, :k, 0, :x, :t, :cost, :pj) "
    "ON CONFLICT (run_id, model, generator) DO UPDATE SET requests = model_usage.requests + excluded.requests, "
    "truncated = model_usage.truncated + excluded.truncated, "
    "prompt_tokens = model_usage.prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = model_usage.completion_tokens + excluded.completion_tokens, "
    "rate_limited = model_usage.rate_limited + excluded.rate_limited, "
    "concurrency = excluded.concurrency, updated_at = excluded.updated_at, "
    "cost = CASE WHEN excluded.cost IS NULL THEN model_usage.cost ELSE COALESCE(model_usage.cost, 0) + excluded.cost END, "
    "pacing_json = COALESCE(excluded.pacing_json, model_usage.pacing_json)")
_CALLS_SAVED = sa.text(
    "INSERT INTO model_usage (run_id, model, generator, calls_saved, updated_at) VALUES (:r, :m, :g, :n, :t) "
    "ON CONFLICT (run_id, model, generator) DO UPDATE SET "
    "calls_saved = model_usage.calls_saved + excluded.calls_saved, updated_at = excluded.updated_at")


def write(conn: Connection, run_id: str, now: float, per_task: dict[TaskKey, TaskUsage],
          per_model: dict[tuple[str, str], ModelUsage]) -> None:
    """One journal batch's usage (:func:`pipeline.store.events.usage_totals`): added to the
    tasks' rows and to ``model_usage`` (the latest pacing snapshot per model stored as JSON).
    Two statements per batch, whatever its size: one ``executemany`` per table."""
    if not per_task:
        return
    conn.execute(_TASK_USAGE, [
        {"r": run_id, "rg": rg, "g": gen, "s": -1 if ri is None else ri, "n": t.requests, "p": t.prompt_tokens,
         "c": t.completion_tokens, "f": t.finish_reason}
        for (rg, gen, ri), t in per_task.items()])
    conn.execute(_MODEL_USAGE, [
        {"r": run_id, "m": model, "g": gen, "n": m.requests, "p": m.prompt_tokens, "c": m.completion_tokens,
         "l": m.rate_limited, "k": m.concurrency, "x": m.truncated, "t": now, "cost": m.cost,
         "pj": None if m.pacing is None else json.dumps(m.pacing)}
        for (model, gen), m in per_model.items()])


def truncated(conn: Connection, run_id: str) -> dict[str, int]:
    """``{generator: kept text answers cut by length}`` of the run (generators with model usage)."""
    rows = conn.execute(sa.text(
        "SELECT generator, SUM(truncated) FROM model_usage WHERE run_id = :r GROUP BY generator"), {"r": run_id})
    return {generator: int(n or 0) for generator, n in rows}


def read(conn: Connection, run_id: str) -> dict[str, dict[str, int]]:
    """``{model alias: {requests, prompt_tokens, completion_tokens, rate_limited, concurrency,
    calls_saved, cost, <pacing>}}`` summed over the run's generators (see :func:`merge_row`)."""
    out: dict[str, dict] = {}
    rows = conn.execute(sa.text(
        "SELECT model, requests, prompt_tokens, completion_tokens, rate_limited, concurrency, calls_saved, "
        "cost, pacing_json, updated_at FROM model_usage WHERE run_id = :r ORDER BY updated_at, model, generator"),
        {"r": run_id}).all()
    for model, n, p, c, limited, concurrency, saved, cost, pacing, _ in rows:
        merge_row(out, model, {"requests": n, "prompt_tokens": p, "completion_tokens": c, "rate_limited": limited,
                               "concurrency": concurrency, "calls_saved": saved, "cost": cost},
                  json.loads(pacing) if pacing else None)
    return dict(sorted(out.items()))


#: The pacing facts of a model in ``model_usage`` reads (None until its process saw them).
PACING_KEYS = ("requests_per_minute", "tokens_per_minute", "max_requests_per_minute", "max_tokens_per_minute",
               "paced", "rate_limit_headers")


def merge_row(out: dict, model: str, row: dict, pacing: dict | None) -> None:
    """Add one generator's row to ``out[model]``; rows come oldest first, so the latest
    concurrency and pacing snapshot win. ``cost`` stays None when no row has one."""
    m = out.get(model)
    if m is None:
        m = out[model] = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "rate_limited": 0,
                          "concurrency": None, "calls_saved": 0, "cost": None, **dict.fromkeys(PACING_KEYS)}
    for k in ("requests", "prompt_tokens", "completion_tokens", "rate_limited", "calls_saved"):
        m[k] += row[k]
    if row["concurrency"] is not None:
        m["concurrency"] = row["concurrency"]
    if row.get("cost") is not None:
        m["cost"] = (m["cost"] or 0.0) + row["cost"]
    if pacing:
        for k in PACING_KEYS[:-1]:
            m[k] = pacing.get(k)
        m["rate_limit_headers"] = pacing.get("headers") or {}


def add_calls_saved(conn: Connection, run_id: str, saved: dict[tuple[str, str], int]) -> None:
    rows = [{"r": run_id, "m": m, "g": g, "n": n, "t": time.time()} for (m, g), n in saved.items() if n]
    if rows:
        conn.execute(_CALLS_SAVED, rows)
