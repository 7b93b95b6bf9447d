"""Traces of a run in the store: with ``--trace`` (``settings.trace``) every task attempt becomes
a row of ``task_traces`` (:mod:`pipeline.store.traces`), written in batches once a second by the
journal's writer thread and once more at the end, so tracing never holds the event loop for a query. Off, nothing
here runs and the engine only tests one boolean per task.

A kill loses at most the last second of traces; the run's results are recorded by the journal
as always (traces are a view of the run, not part of its state).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pipeline.redact import redact
from pipeline.store.traces import TraceRow

__all__ = ["TraceWriter"]


class TraceWriter:
    """Moves the scheduler's finished :class:`~pipeline.engine.options.TaskTrace` records into
    the store. ``worker`` names this process (the store's owner id)."""

    def __init__(self, scheduler: Any, store: Any, run_id: str) -> None:
        self.scheduler, self.store, self.run_id = scheduler, store, run_id
        self.worker: str = getattr(store, "owner", "") or ""
        self._offset = time.time() - time.perf_counter()  # perf_counter seconds -> Unix seconds
        self._attempts: dict[tuple, int] = {}

    def take(self) -> list[TraceRow]:
        """The finished traces not yet taken, as rows; unfinished ones stay with the scheduler."""
        traces = self.scheduler.traces
        finished = [t for t in traces if t.finished_at]
        if not finished:
            return []
        self.scheduler.traces = [t for t in traces if not t.finished_at]
        rows = []
        off = self._offset
        for t in finished:
            key = (t.column, t.row_group, t.row_index)
            attempt = self._attempts[key] = self._attempts.get(key, 0) + 1
            rows.append(TraceRow(self.worker, t.column, t.row_group, t.row_index, t.task_type, attempt,
                                 off + t.dispatched_at, off + t.started_at if t.started_at else None,
                                 off + t.finished_at, t.status or "cancelled", redact(t.error)))
        return rows

    def flush(self) -> None:
        """Write what has finished (the end of a run, on the caller's thread)."""
        rows = self.take()
        if rows:
            self.store.add_traces(self.run_id, rows)

    async def run(self, every_s: float = 1.0) -> None:
        """Write what has finished every ``every_s`` seconds until cancelled, on the journal's
        writer thread, between its commits: a second writer would contend with it for the
        database's write lock (on SQLite that cost 3/4 of the throughput of no-op tasks)."""
        while True:
            await asyncio.sleep(every_s)
            rows = self.take()
            if rows:
                await self.scheduler.journal.call(self.store.add_traces, self.run_id, rows)
