"""The state store on SQLite or PostgreSQL: :class:`SqlStore`, one code path for both.

Every method is one transaction. Writers on SQLite begin with ``BEGIN IMMEDIATE`` (see
:mod:`pipeline.store.sqlite`), which serialises them; on PostgreSQL the row groups a transaction
fences on are locked ``FOR UPDATE`` in row-group order, and claims skip locked rows. The cold
paths use SQLAlchemy Core on :mod:`~pipeline.store.schema`.

SqlStore is one class made of parts, each a mixin over the state that
:class:`~pipeline.store.sql_common.SqlParts` declares:

    sql_leases.SqlLeases    workers, claims, renewals, releases, the fence (``_fence``)
    sql_journal.SqlJournal  record() (the hot path), load_row_group, checkpoints, traces
    sql_reads.SqlReads      runs, row groups, counts, failures, model usage, `pipeline sql`
    this module             creating and changing runs, retry, repair, config changes

Mixins rather than delegation: the parts share one engine, one owner and one epoch table, and
every method stays a plain method of SqlStore with no forwarding layer to keep in step.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from typing import Callable, Collection, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url

from pipeline.errors import RunExistsError, RunNotFoundError, StoreError
from pipeline.states import RowGroupState, RunStatus
from pipeline.store import change_sql, postgres, reopen_sql, schema, sqlite
from pipeline.store.base import ROW_GROUP_BATCH, RUN_STATES, Lineage, NewRun, Reopened
from pipeline.store.change_plan import ChangeResult, ConfigChange
from pipeline.store.reopen import task_filter
from pipeline.store.sql_common import WORKER_HEARTBEAT_FRESH_S
from pipeline.store.sql_common import translate_errors
from pipeline.store.sql_journal import SqlJournal
from pipeline.store.sql_reads import SqlReads
from pipeline.workers import make_owner_id

__all__ = ["SqlStore", "make_engine", "WORKER_HEARTBEAT_FRESH_S"]


def make_engine(url: str | URL) -> Engine:
    """An Engine on the state store at ``url`` (SQLite file or PostgreSQL), set up for it."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as exc:
        raise StoreError(f"not a database URL: {url!r} ({exc})") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return sqlite.create_engine(parsed)
    if backend == "postgresql":
        try:
            return postgres.create_engine(parsed)
        except ImportError as exc:
            raise StoreError(f"a PostgreSQL state store needs its driver ({exc.name or exc}): "
                             "pip install 'psycopg[binary]' (or, from the project's folder, pip install -e '.[postgres]')") from None
    raise StoreError(
        f"unsupported state store {parsed.render_as_string(hide_password=True)}: "
        "use sqlite:///path/to/state.db or postgresql://user@host/db"
    )


class SqlStore(SqlJournal, SqlReads):
    """The :class:`~pipeline.store.base.Store` on SQLite or PostgreSQL.

    Safe to share between threads: each call checks a connection out of the Engine's pool.
    Open it with :func:`pipeline.store.open_store`, which also checks the schema.
    """

    def __init__(self, url: str | URL, *, owner: str | None = None):
        self.owner: str = owner or make_owner_id()
        self.row_group_batch = ROW_GROUP_BATCH
        self._engine = make_engine(url)
        self.url_text = self._engine.url.render_as_string(hide_password=True)
        self._pg = self._engine.dialect.name == "postgresql"
        self._reader = self._engine.execution_options(**sqlite.READ_ONLY)
        # (run_id, row_group) -> the epoch of our claim; record() fences on it.
        self._epochs: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._upsert_tasks = postgres.upsert_tasks if self._pg else sqlite.upsert_tasks

    @property
    def engine(self) -> Engine:
        return self._engine

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqlStore({self.url_text!r}, owner={self.owner!r})"

    # -- runs ------------------------------------------------------------------------------

    @translate_errors
    def create_run(self, run: NewRun) -> None:
        now = time.time()
        size = run.row_group_size
        try:
            with self._engine.begin() as conn:
                if self._has_run(conn, run.run_id):
                    raise RunExistsError(f"a run with id {run.run_id!r} exists already; pick another --run-id")
                conn.execute(
                    schema.runs.insert(),
                    {
                        "run_id": run.run_id,
                        "name": run.name,
                        "status": RunStatus.RUNNING,
                        "num_records": run.num_records,
                        "row_group_size": size,
                        "seed": run.seed,
                        "config": run.config,
                        "fingerprint": run.fingerprint,
                        "created_at": now,
                        "updated_at": now,
                    },
                )
                if run.columns:
                    conn.execute(
                        schema.run_columns.insert(), [{"run_id": run.run_id, **asdict(c)} for c in run.columns]
                    )
                self._create_row_groups(conn, run.run_id, 0, run.num_records, size)
                self._insert_fingerprints(conn, run.run_id, run.fingerprints)
        except sa_exc.IntegrityError as exc:
            with self._reader.connect() as conn:
                if self._has_run(conn, run.run_id):  # another process created it since our check
                    raise RunExistsError(
                        f"a run with id {run.run_id!r} exists already; pick another --run-id"
                    ) from exc
            raise StoreError(f"cannot create run {run.run_id!r}: {exc.orig}") from exc

    @translate_errors
    def delete_run(self, run_id: str) -> dict[str, int]:
        from pipeline.store import admin

        return admin.delete_run(self._engine, run_id, where=self.url_text, fresh_s=WORKER_HEARTBEAT_FRESH_S)

    @translate_errors
    def set_run_status(self, run_id: str, status: str) -> None:
        if status not in RUN_STATES:
            raise ValueError(f"unknown run status {status!r}; one of {RUN_STATES}")
        runs = schema.runs
        now = time.time()
        changes: dict = {"status": status, "updated_at": now}
        if status == RunStatus.COMPLETE:
            changes["finished_at"] = now
        with self._engine.begin() as conn:
            if conn.execute(runs.update().where(runs.c.run_id == run_id).values(changes)).rowcount == 0:
                raise RunNotFoundError(f"no run with id {run_id!r} in {self.url_text}")

    # -- changing runs ---------------------------------------------------------------------

    @staticmethod
    def _insert_fingerprints(conn: Connection, run_id: str, rows: Sequence[tuple[str, str, str]]) -> None:
        if rows:
            conn.execute(schema.run_fingerprints.insert(),
                         [{"run_id": run_id, "kind": k, "name": n, "digest": d} for k, n, d in rows])

    @translate_errors
    def replace_fingerprints(self, run_id: str, fingerprints: Sequence[tuple[str, str, str]],
                             changes: Sequence[tuple[str, str, str | None, str | None, str]]) -> None:
        f = schema.run_fingerprints
        with self._engine.begin() as conn:
            if not self._has_run(conn, run_id):
                raise RunNotFoundError(f"no run with id {run_id!r} in {self.url_text}")
            conn.execute(f.delete().where(f.c.run_id == run_id))
            self._insert_fingerprints(conn, run_id, fingerprints)
            if changes:
                now = time.time()
                conn.execute(schema.run_changes.insert(), [
                    {"run_id": run_id, "changed_at": now, "kind": kind, "name": name, "old_digest": old,
                     "new_digest": new, "detail": detail} for kind, name, old, new, detail in changes])

    @translate_errors
    def reopen_failed(self, run_id: str, lineage: Lineage, *, generators: Collection[str] | None = None,
                      error: str | None = None, read_file: Callable[[str], Mapping[str, list]]) -> Reopened:
        with self._engine.begin() as conn:
            if not self._has_run(conn, run_id):
                raise RunNotFoundError(f"no run with id {run_id!r} in {self.url_text}; `pipeline runs` lists them")
            out = reopen_sql.reopen(conn, run_id, lineage, task_filter(generators, error), read_file)
        self._forget(run_id, out.row_groups)
        return out

    @translate_errors
    def apply_config_change(self, run_id: str, change: ConfigChange, *, read_file: Callable[[str], Mapping[str, list]],
                            dry_run: bool = False) -> ChangeResult:
        if dry_run:
            with self._reader.connect() as conn:
                return change_sql.apply_change(conn, run_id, change, read_file, dry_run=True,
                                               fresh_s=WORKER_HEARTBEAT_FRESH_S)
        with self._engine.begin() as conn:
            out = change_sql.apply_change(conn, run_id, change, read_file, dry_run=False,
                                          fresh_s=WORKER_HEARTBEAT_FRESH_S, me=self.owner)
        self._forget(run_id, out.row_groups)
        return out

    @translate_errors
    def copy_cells(self, source: str, target: str, generators: Mapping[str, tuple[str, tuple[str, ...]]], *,
                   read_file: Callable[[str], Mapping[str, list]]) -> dict[str, int]:
        with self._engine.begin() as conn:
            return change_sql.copy_cells(conn, source, target, generators, read_file)

    @translate_errors
    def reopen_row_groups(self, run_id: str, row_groups: Sequence[int]) -> list[int]:
        if not row_groups:
            return []
        t, d, g = schema.tasks, schema.dropped_records, schema.row_groups
        with self._engine.begin() as conn:
            reopened = list(conn.execute(
                sa.select(g.c.row_group)
                .where(g.c.run_id == run_id, g.c.row_group.in_(list(row_groups)), g.c.state == RowGroupState.CHECKPOINTED)
                .order_by(g.c.row_group)
                .with_for_update()
            ).scalars())
            if reopened:
                self._update_row_groups(conn, run_id, reopened, state=RowGroupState.PENDING, path=None, file_bytes=None,
                                        file_sha256=None, rows_dropped=0, lease_owner=None,
                                        lease_expires_at=None)
                conn.execute(t.delete().where(t.c.run_id == run_id, t.c.row_group.in_(reopened)))
                conn.execute(d.delete().where(d.c.run_id == run_id, d.c.row_group.in_(reopened)))
        return reopened

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._engine.dispose()

