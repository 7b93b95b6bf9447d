"""The SQL store's journal side: :meth:`SqlJournal.record` (the hot path), loading a row group
on resume, its checkpoint (with compaction), traces and the calls resumes saved.

:meth:`SqlJournal.record` applies :func:`pipeline.store.events.coalesce` of a batch, fenced on
the row groups it touches, and writes its task rows with pre-built ``INSERT ... ON CONFLICT DO
UPDATE`` statements: the driver's ``executemany`` on SQLite, one statement over arrays on
PostgreSQL (``upsert_tasks`` in :mod:`~pipeline.store.sqlite` and :mod:`~pipeline.store.postgres`).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline import values
from pipeline.errors import StoreError
from pipeline.states import RowGroupState, TaskState
from pipeline.store import schema
from pipeline.store import traces as traces_sql
from pipeline.store import usage as usage_sql
from pipeline.store.base import LoadedRowGroup
from pipeline.store.events import TASK_STATE, Batch, TaskEvent, TaskKey, coalesce, usage_totals
from pipeline.store.sql_common import translate_errors
from pipeline.store.sql_leases import SqlLeases

__all__ = ["SqlJournal"]

# The journal's other writes; rare next to the task upserts (sqlite.py, postgres.py).
_INSERT_DROPPED = sa.text(
    "INSERT INTO dropped_records (run_id, row_group, row_index) VALUES (:r, :rg, :i) "
    "ON CONFLICT (run_id, row_group, row_index) DO NOTHING"
)
_COUNT_DROPPED = sa.text(
    "UPDATE row_groups SET rows_dropped = (SELECT COUNT(*) FROM dropped_records d "
    "WHERE d.run_id = row_groups.run_id AND d.row_group = row_groups.row_group) "
    "WHERE run_id = :r AND row_group = :rg"
)
_UPSERT_STATE = sa.text(
    "INSERT INTO generator_states (run_id, generator, row_group, state, updated_at) VALUES (:r, :g, :rg, :s, :now) "
    "ON CONFLICT (run_id, generator, row_group) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at"
)
_MARK_COMPLETE = sa.text(
    "UPDATE row_groups SET state = 'complete' WHERE run_id = :r AND row_group = :rg AND state <> 'checkpointed'"
)


class SqlJournal(SqlLeases):
    """The journal part of :class:`~pipeline.store.sql.SqlStore` (it fences with the leases part)."""

    @translate_errors
    def load_row_group(self, run_id: str, row_group: int) -> LoadedRowGroup:
        g, d, t = schema.row_groups, schema.dropped_records, schema.tasks
        with self._reader.connect() as conn:
            num_rows = conn.execute(
                sa.select(g.c.num_rows).where(g.c.run_id == run_id, g.c.row_group == row_group)
            ).scalar()
            if num_rows is None:
                raise StoreError(f"run {run_id!r} has no row group {row_group}")
            loaded = LoadedRowGroup(row_group=row_group, num_rows=num_rows)
            loaded.dropped.update(
                conn.execute(sa.select(d.c.row_index).where(d.c.run_id == run_id, d.c.row_group == row_group)).scalars()
            )
            rows = conn.execute(
                sa.select(t.c.column_name, t.c.row_index, t.c.state, t.c.attempts, t.c.next_eligible_at,
                          t.c.last_error, t.c.value)
                .where(t.c.run_id == run_id, t.c.row_group == row_group)
            )
            decode, done, deferred = values.decode, TaskState.DONE, TaskState.DEFERRED  # bound once
            for generator, row_index, state, attempts, next_eligible_at, last_error, value in rows:
                key = (generator, row_index)
                if state == done:
                    loaded.done[key] = decode(value)
                elif state == deferred:
                    loaded.deferred[key] = (attempts, next_eligible_at, last_error)
                else:  # in_flight, frontier, failed
                    loaded.attempts[key] = attempts
        return loaded

    # -- the journal -----------------------------------------------------------------------

    @translate_errors
    def record(self, run_id: str, events: Sequence[Any]) -> set[int]:
        if not events:
            return set()
        batch = coalesce(events)
        with self._engine.begin() as conn:
            ours, lost = self._fence(conn, run_id, batch.row_groups)
            if not ours:
                return lost
            now = time.time()
            self._write_tasks(conn, run_id, now, batch.tasks, ours, len(ours) == len(batch.row_groups))
            self._write_rest(conn, run_id, now, batch, ours)
        return lost

    def _write_tasks(self, conn: Connection, run_id: str, now: float, tasks: dict[TaskKey, TaskEvent],
                     ours: dict[int, int], all_ours: bool) -> None:
        """Upsert the batch's task rows of the row groups in ``ours``: ``plain`` rows leave
        attempts, next_eligible_at and last_error as they are, ``full`` rows set them."""
        plain: list[tuple] = []
        full: list[tuple] = []
        for (rg, generator, row_index), ev in tasks.items():
            if not all_ours and rg not in ours:
                continue
            slot = -1 if row_index is None else row_index
            if ev.attempts is None:
                plain.append((run_id, rg, generator, slot, row_index, ev.task_type, TASK_STATE[ev.kind], ev.value,
                              now))
            else:
                # A generator's message may hold lone surrogates, which no driver can encode.
                message = ev.error
                full.append((run_id, rg, generator, slot, row_index, ev.task_type, TASK_STATE[ev.kind], ev.value,
                             now, ev.attempts, ev.next_eligible_at, message and values.valid_unicode(message)))
        self._upsert_tasks(conn, run_id, now, plain, full)

    @staticmethod
    def _write_rest(conn: Connection, run_id: str, now: float, batch: Batch, ours: dict[int, int]) -> None:
        """The batch's dropped records, generator states, completed row groups and model usage,
        in the row groups of ``ours`` (``{row_group: num_rows}``)."""
        drops = []
        counts = []
        for rg, rows in batch.dropped.items():
            if rg in ours:
                indexes = range(ours[rg]) if rows is None else sorted(rows)
                drops.extend({"r": run_id, "rg": rg, "i": i} for i in indexes)
                counts.append({"r": run_id, "rg": rg})
        if drops:
            conn.execute(_INSERT_DROPPED, drops)
            conn.execute(_COUNT_DROPPED, counts)
        states = [{"r": run_id, "g": gen, "rg": rg, "s": state, "now": now}
                  for (rg, gen), state in batch.states.items() if rg in ours]
        if states:
            conn.execute(_UPSERT_STATE, states)
        done = [{"r": run_id, "rg": rg} for rg in batch.completed if rg in ours]
        if done:
            conn.execute(_MARK_COMPLETE, done)
        if batch.usage:
            usage_sql.write(conn, run_id, now, *usage_totals(batch.usage, ours))

    @translate_errors
    def add_traces(self, run_id: str, rows: Sequence[Any]) -> None:
        with self._engine.begin() as conn:
            traces_sql.insert(conn, run_id, rows)

    @translate_errors
    def traces(self, run_id: str) -> list[dict]:
        with self._reader.connect() as conn:
            return traces_sql.select(conn, run_id)

    @translate_errors
    def add_calls_saved(self, run_id: str, saved: dict[tuple[str, str], int]) -> None:
        with self._engine.begin() as conn:
            usage_sql.add_calls_saved(conn, run_id, saved)

    @translate_errors
    def checkpoint_row_group(self, run_id: str, row_group: int, path: str, rows_dropped: int, *,
                             file_bytes: int | None = None, file_sha256: str | None = None) -> bool:
        t, d, g = schema.tasks, schema.dropped_records, schema.row_groups
        with self._engine.begin() as conn:
            ours, _lost = self._fence(conn, run_id, {row_group})
            if not ours:
                current = conn.execute(
                    sa.select(g.c.state, g.c.path).where(g.c.run_id == run_id, g.c.row_group == row_group)
                ).first()
                return current is not None and tuple(current) == (RowGroupState.CHECKPOINTED, path)
            self._update_row_groups(
                conn, run_id, ours, state=RowGroupState.CHECKPOINTED, path=path, rows_dropped=rows_dropped,
                file_bytes=file_bytes, file_sha256=file_sha256, lease_owner=None, lease_expires_at=None,
            )
            # Compaction: the Parquet file holds the values now. Failed rows stay, for the
            # failure report and rows_failed in column_progress. With dropped records, so do
            # those records, their done cells and the batch tasks' values: `pipeline retry`
            # brings them back without computing them again (column_progress does not count
            # done rows of a checkpointed row group). Without drops, nothing else stays.
            rows = t.delete().where(t.c.run_id == run_id, t.c.row_group == row_group, t.c.state != TaskState.FAILED)
            if rows_dropped:
                dropped = sa.select(d.c.row_index).where(d.c.run_id == run_id, d.c.row_group == row_group)
                rows = rows.where(sa.not_(sa.and_(
                    t.c.state == TaskState.DONE, sa.or_(t.c.row_index.is_(None), t.c.row_index.in_(dropped)))))
            conn.execute(rows)
        self._forget(run_id, [row_group])
        return True
