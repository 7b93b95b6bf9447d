"""Per-attempt task traces (table ``task_traces``, see :mod:`pipeline.store.schema`): written in
batches by a traced run, read by `pipeline report` and plain SQL.

A trace row is a :class:`TraceRow`; :func:`insert` and :func:`select` are the SQL both SQL stores
use (the memory store keeps a list of dicts of the same shape).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import sqlalchemy as sa

from pipeline.store import schema

__all__ = ["FIELDS", "TraceRow", "insert", "select"]


class TraceRow(NamedTuple):
    """One task attempt. Times are Unix seconds; ``started_at`` is None if the task was
    cancelled before its inputs were read."""

    worker: str
    column_name: str
    row_group: int
    row_index: int | None
    task_type: str
    attempt: int
    dispatched_at: float
    started_at: float | None
    finished_at: float
    outcome: str
    error: str | None


FIELDS = TraceRow._fields


def insert(conn: sa.Connection, run_id: str, rows: Sequence[TraceRow]) -> None:
    if rows:
        conn.execute(schema.task_traces.insert(), [{"run_id": run_id, **row._asdict()} for row in rows])


def select(conn: sa.Connection, run_id: str) -> list[dict[str, Any]]:
    """Every trace of the run in dispatch order: ``[{field: value}]`` with :data:`FIELDS`."""
    t = schema.task_traces
    rows = conn.execute(sa.select(*(t.c[name] for name in FIELDS))
                        .where(t.c.run_id == run_id).order_by(t.c.dispatched_at, t.c.trace_id))
    return [dict(row) for row in rows.mappings()]
