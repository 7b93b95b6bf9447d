"""The reading side of the SQL store: runs, row groups, counts, failures, model usage, generator
states, and `pipeline sql`'s read-only queries. Each call is one reading transaction (a plain
``BEGIN`` on SQLite, so that a `status` never waits for the write lock)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import sqlalchemy as sa

from pipeline import values
from pipeline.errors import RunNotFoundError
from pipeline.states import TaskState
from pipeline.store import postgres, schema, sqlite
from pipeline.store import usage as usage_sql
from pipeline.store.base import RunInfo, row_group_counts
from pipeline.store.sql_common import SqlParts, translate_errors

__all__ = ["SqlReads"]

# The columns of ``runs`` in RunInfo's field order.
_RUN_INFO = tuple(schema.runs.c[f.name] for f in fields(RunInfo))


class SqlReads(SqlParts):
    """The reading part of :class:`~pipeline.store.sql.SqlStore`."""

    @translate_errors
    def get_run(self, run_id: str) -> RunInfo:
        runs = schema.runs
        with self._reader.connect() as conn:
            row = conn.execute(sa.select(*_RUN_INFO).where(runs.c.run_id == run_id)).first()
        if row is None:
            raise RunNotFoundError(f"no run with id {run_id!r} in {self.url_text}; `pipeline runs` lists them")
        return RunInfo(*row)

    @translate_errors
    def list_runs(self) -> list[RunInfo]:
        runs = schema.runs
        with self._reader.connect() as conn:
            rows = conn.execute(sa.select(*_RUN_INFO).order_by(runs.c.created_at.desc(), runs.c.run_id.desc()))
            return [RunInfo(*row) for row in rows]

    @translate_errors
    def record_counts(self) -> dict[str, tuple[int, int]]:
        from pipeline.store import admin

        return admin.record_counts(self._reader)

    @translate_errors
    def run_fingerprints(self, run_id: str) -> dict[tuple[str, str], str]:
        f = schema.run_fingerprints
        with self._reader.connect() as conn:
            rows = conn.execute(sa.select(f.c.kind, f.c.name, f.c.digest).where(f.c.run_id == run_id))
            return {(kind, name): digest for kind, name, digest in rows}

    @translate_errors
    def model_usage(self, run_id: str) -> dict[str, dict[str, int]]:
        with self._reader.connect() as conn:
            return usage_sql.read(conn, run_id)

    @translate_errors
    def run_changes(self, run_id: str) -> list[dict]:
        c = schema.run_changes
        with self._reader.connect() as conn:
            rows = conn.execute(sa.select(c.c.changed_at, c.c.kind, c.c.name, c.c.old_digest, c.c.new_digest,
                                          c.c.detail).where(c.c.run_id == run_id).order_by(c.c.change_id))
            return [dict(row) for row in rows.mappings()]

    @translate_errors
    def row_groups(self, run_id: str) -> list[dict]:
        g = schema.row_groups
        with self._reader.connect() as conn:
            rows = conn.execute(
                sa.select(g.c.row_group, g.c.num_rows, g.c.state, g.c.rows_dropped, g.c.path, g.c.lease_owner,
                          g.c.lease_epoch, g.c.lease_expires_at, g.c.file_bytes, g.c.file_sha256)
                .where(g.c.run_id == run_id)
                .order_by(g.c.row_group)
            )
            return [dict(row) for row in rows.mappings()]

    @translate_errors
    def row_group_counts(self, run_id: str) -> dict[str, int]:
        g, runs = schema.row_groups, schema.runs
        with self._reader.connect() as conn:
            run = conn.execute(
                sa.select(runs.c.num_records, runs.c.row_group_size).where(runs.c.run_id == run_id)
            ).first()
            if run is None:
                raise RunNotFoundError(f"no run with id {run_id!r} in {self.url_text}; `pipeline runs` lists them")
            rows = conn.execute(
                sa.select(g.c.state, sa.func.count(), sa.func.sum(g.c.num_rows - g.c.rows_dropped),
                          sa.func.sum(g.c.rows_dropped))
                .where(g.c.run_id == run_id)
                .group_by(g.c.state)
            ).all()
        return row_group_counts(run[0], run[1], rows)

    @translate_errors
    def column_counts(self, run_id: str) -> dict[str, dict[str, int]]:
        with self._reader.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT p.column_name, c.generator, p.rows_done, p.rows_failed, p.rows_deferred, "
                    "p.rows_in_flight FROM column_progress p JOIN run_columns c "
                    "ON c.run_id = p.run_id AND c.column_name = p.column_name "
                    "WHERE p.run_id = :r ORDER BY c.position"
                ),
                {"r": run_id},
            ).all()
            truncated = usage_sql.truncated(conn, run_id)
        return {
            name: {"done": int(done), "failed": int(failed), "deferred": int(deferred), "in_flight": int(in_flight),
                   "truncated": truncated.get(generator, 0)}
            for name, generator, done, failed, deferred, in_flight in rows
        }

    @translate_errors
    def generator_states(self, run_id: str) -> dict[str, tuple[int, Any]]:
        s = schema.generator_states
        latest = (sa.select(s.c.generator, sa.func.max(s.c.row_group).label("rg"))
                  .where(s.c.run_id == run_id).group_by(s.c.generator).subquery())
        with self._reader.connect() as conn:
            rows = conn.execute(
                sa.select(s.c.generator, s.c.row_group, s.c.state)
                .join(latest, sa.and_(s.c.generator == latest.c.generator, s.c.row_group == latest.c.rg))
                .where(s.c.run_id == run_id))
            return {gen: (rg, values.decode(state)) for gen, rg, state in rows}

    @translate_errors
    def failed_tasks(self, run_id: str) -> list[tuple[str, str | None]]:
        t = schema.tasks
        with self._reader.connect() as conn:
            return [tuple(row) for row in conn.execute(
                sa.select(t.c.column_name, t.c.last_error).where(t.c.run_id == run_id, t.c.state == TaskState.FAILED))]

    def read_query(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Run one statement that only reads, on a connection of its own that cannot write (for
        `pipeline sql`); return the column names and the rows. ReadOnlyQueryError if the
        statement is refused (:mod:`pipeline.store.readonly` says what passes), StoreError with
        the database's message for any other error."""
        if self._pg:
            return postgres.read_query(self._engine.url, sql)
        return sqlite.read_query(self._engine.url, sql)
