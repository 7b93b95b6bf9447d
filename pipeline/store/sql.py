"""The state store on SQLite or PostgreSQL: :class:`SqlStore`, one code path for both.

Every method is one transaction. Writers on SQLite begin with ``BEGIN IMMEDIATE`` (see
:mod:`pipeline.store.sqlite`), which serialises them; on PostgreSQL the row groups a transaction
fences on are locked ``FOR UPDATE`` in row-group order, and claims skip locked rows. The journal's
hot path (:meth:`SqlStore.record`) coalesces a batch per task and writes it with pre-built
``INSERT ... ON CONFLICT DO UPDATE`` statements: the driver's ``executemany`` on SQLite, one
statement over arrays on PostgreSQL (``upsert_tasks`` in :mod:`~pipeline.store.sqlite` and
:mod:`~pipeline.store.postgres`). The cold paths use SQLAlchemy Core on :mod:`~pipeline.store.schema`.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import asdict, fields
from typing import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url

from pipeline import values
from pipeline.errors import RunExistsError, RunNotFoundError, StoreError
from pipeline.store import postgres, schema, sqlite
from pipeline.store.base import (
    COMPLETE,
    DEFERRED,
    DONE,
    DROPPED,
    FAILED,
    RUN_STATES,
    STARTED,
    LoadedRowGroup,
    NewRun,
    RowGroupClaim,
    RunInfo,
)
from pipeline.store import usage as usage_sql
from pipeline.workers import HOST, make_owner_id, owner_is_gone

__all__ = ["SqlStore", "make_engine", "WORKER_HEARTBEAT_FRESH_S"]



#: A worker of another host counts as live while its heartbeat is younger than this.
WORKER_HEARTBEAT_FRESH_S = 60.0


# The columns of ``runs`` in RunInfo's field order.
_RUN_INFO = tuple(schema.runs.c[f.name] for f in fields(RunInfo))


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
_MARK_COMPLETE = sa.text(
    "UPDATE row_groups SET state = 'complete' WHERE run_id = :r AND row_group = :rg AND state <> 'checkpointed'"
)


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
                             "pip install 'pipeline[postgres]'") from None
    raise StoreError(
        f"unsupported state store {parsed.render_as_string(hide_password=True)}: "
        "use sqlite:///path/to/state.db or postgresql://user@host/db"
    )


def _translate_errors(method):
    """Driver errors leave the store as StoreError, with the database's message."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sa_exc.DBAPIError as exc:
            raise StoreError(f"state store error ({self.url_text}): {exc.orig}") from exc

    return wrapper


class SqlStore:
    """The :class:`~pipeline.store.base.Store` on SQLite or PostgreSQL.

    Safe to share between threads: each call checks a connection out of the Engine's pool.
    Open it with :func:`pipeline.store.open_store`, which also checks the schema.
    """

    def __init__(self, url: str | URL, *, owner: str | None = None):
        self.owner: str = owner or make_owner_id()
        self._engine = make_engine(url)
        self.url_text = self._engine.url.render_as_string(hide_password=True)
        self._pg = self._engine.dialect.name == "postgresql"
        self._reader = self._engine.execution_options(**sqlite.READ_ONLY)
        self._read_only_engine: Engine | None = None
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

    @_translate_errors
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
                        "status": "running",
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
                groups = [
                    {"run_id": run.run_id, "row_group": rg, "num_rows": min(size, run.num_records - rg * size),
                     "state": "pending", "rows_dropped": 0, "lease_epoch": 0}
                    for rg in range(math.ceil(run.num_records / size))
                ]
                if groups:
                    conn.execute(schema.row_groups.insert(), groups)
        except sa_exc.IntegrityError as exc:
            with self._reader.connect() as conn:
                if self._has_run(conn, run.run_id):  # another process created it since our check
                    raise RunExistsError(
                        f"a run with id {run.run_id!r} exists already; pick another --run-id"
                    ) from exc
            raise StoreError(f"cannot create run {run.run_id!r}: {exc.orig}") from exc

    @staticmethod
    def _has_run(conn: Connection, run_id: str) -> bool:
        runs = schema.runs
        return conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id == run_id)).first() is not None

    @_translate_errors
    def get_run(self, run_id: str) -> RunInfo:
        runs = schema.runs
        with self._reader.connect() as conn:
            row = conn.execute(sa.select(*_RUN_INFO).where(runs.c.run_id == run_id)).first()
        if row is None:
            raise RunNotFoundError(f"no run with id {run_id!r} in {self.url_text}; `pipeline runs` lists them")
        return RunInfo(*row)

    @_translate_errors
    def list_runs(self) -> list[RunInfo]:
        runs = schema.runs
        with self._reader.connect() as conn:
            rows = conn.execute(sa.select(*_RUN_INFO).order_by(runs.c.created_at.desc(), runs.c.run_id.desc()))
            return [RunInfo(*row) for row in rows]

    @_translate_errors
    def set_run_status(self, run_id: str, status: str) -> None:
        if status not in RUN_STATES:
            raise ValueError(f"unknown run status {status!r}; one of {RUN_STATES}")
        runs = schema.runs
        now = time.time()
        changes: dict = {"status": status, "updated_at": now}
        if status == "complete":
            changes["finished_at"] = now
        with self._engine.begin() as conn:
            if conn.execute(runs.update().where(runs.c.run_id == run_id).values(changes)).rowcount == 0:
                raise RunNotFoundError(f"no run with id {run_id!r} in {self.url_text}")

    # -- workers and leases ----------------------------------------------------------------

    @_translate_errors
    def register_worker(self, run_id: str) -> None:
        workers = schema.workers
        now = time.time()
        with self._engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO workers (run_id, owner, heartbeat_at, started_at) VALUES (:r, :o, :now, :now) "
                    "ON CONFLICT (run_id, owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
                ),
                {"r": run_id, "o": self.owner, "now": now},
            )
            # Forget processes of this host that died without unregistering.
            others = conn.execute(
                sa.select(workers.c.owner).where(workers.c.run_id == run_id, workers.c.owner != self.owner)
            ).scalars()
            gone = [owner for owner in others if owner_is_gone(owner)]
            if gone:
                conn.execute(workers.delete().where(workers.c.run_id == run_id, workers.c.owner.in_(gone)))

    @_translate_errors
    def unregister_worker(self, run_id: str) -> None:
        workers = schema.workers
        with self._engine.begin() as conn:
            conn.execute(workers.delete().where(workers.c.run_id == run_id, workers.c.owner == self.owner))

    @_translate_errors
    def live_workers(self, run_id: str) -> int:
        workers = schema.workers
        with self._reader.connect() as conn:
            rows = conn.execute(
                sa.select(workers.c.owner, workers.c.heartbeat_at).where(workers.c.run_id == run_id)
            ).all()
        fresh_after = time.time() - WORKER_HEARTBEAT_FRESH_S
        return sum(
            1
            for owner, heartbeat_at in rows
            if not owner_is_gone(owner) and (owner.rsplit(":", 3)[0] == HOST or heartbeat_at > fresh_after)
        )

    @_translate_errors
    def claim_row_groups(self, run_id: str, limit: int, lease_s: float) -> list[RowGroupClaim]:
        if limit <= 0:
            return []
        g = schema.row_groups
        # SQLite: BEGIN IMMEDIATE serialises claimers. PostgreSQL: rows another claimer is
        # looking at are skipped, never waited for, so two workers take different row groups.
        candidates = (
            sa.select(g.c.row_group, g.c.num_rows, g.c.state, g.c.lease_owner, g.c.lease_epoch, g.c.lease_expires_at)
            .where(
                g.c.run_id == run_id,
                g.c.state != "checkpointed",
                sa.or_(g.c.lease_owner.is_(None), g.c.lease_owner != self.owner),
            )
            .order_by(g.c.row_group)
            .with_for_update(skip_locked=True)
        )
        claims: list[RowGroupClaim] = []
        with self._engine.begin() as conn:
            now = time.time()
            gone: dict[str, bool] = {}
            for rg, num_rows, state, owner, epoch, expires_at in conn.execute(candidates):
                if owner is not None and expires_at is not None and expires_at >= now:
                    if owner not in gone:
                        gone[owner] = owner_is_gone(owner)
                    if not gone[owner]:
                        continue
                claims.append(RowGroupClaim(rg, num_rows, epoch + 1, state))
                if len(claims) == limit:
                    break
            if claims:
                conn.execute(
                    g.update()
                    .where(g.c.run_id == run_id, g.c.row_group == sa.bindparam("rg"))
                    .values(
                        lease_owner=self.owner,
                        lease_epoch=sa.bindparam("epoch"),
                        lease_expires_at=now + lease_s,
                        state=sa.case((g.c.state == "pending", "active"), else_=g.c.state),
                    ),
                    [{"rg": c.row_group, "epoch": c.epoch} for c in claims],
                )
        with self._lock:
            for c in claims:
                self._epochs[(run_id, c.row_group)] = c.epoch
        return claims

    def _held(self, run_id: str) -> dict[int, int]:
        with self._lock:
            return {rg: epoch for (r, rg), epoch in self._epochs.items() if r == run_id}

    def _forget(self, run_id: str, row_groups: Iterable[int]) -> None:
        with self._lock:
            for rg in row_groups:
                self._epochs.pop((run_id, rg), None)

    def _fence(self, conn: Connection, run_id: str, row_groups: Iterable[int]) -> tuple[dict[int, int], set[int]]:
        """Check, inside the caller's transaction, that this owner still holds each row group
        with the epoch it claimed. Returns ({row_group: num_rows} still held, row groups lost);
        lost ones are forgotten. SQLite's write lock, PostgreSQL's row locks (taken in row-group
        order, so fencing transactions never deadlock) keep claimers out until commit."""
        held = self._held(run_id)
        wanted = sorted(rg for rg in row_groups if rg in held)
        lost = {rg for rg in row_groups if rg not in held}
        ours: dict[int, int] = {}
        if wanted:
            g = schema.row_groups
            rows = conn.execute(
                sa.select(g.c.row_group, g.c.num_rows, g.c.lease_owner, g.c.lease_epoch)
                .where(g.c.run_id == run_id, g.c.row_group.in_(wanted))
                .order_by(g.c.row_group)
                .with_for_update()
            )
            for rg, num_rows, owner, epoch in rows:
                if owner == self.owner and epoch == held[rg]:
                    ours[rg] = num_rows
            lost.update(rg for rg in wanted if rg not in ours)
        if lost:
            self._forget(run_id, lost)
        return ours, lost

    def _update_row_groups(self, conn: Connection, run_id: str, row_groups: Iterable[int], **values) -> None:
        g = schema.row_groups
        conn.execute(g.update().where(g.c.run_id == run_id, g.c.row_group.in_(list(row_groups))).values(**values))

    @_translate_errors
    def renew_leases(self, run_id: str, lease_s: float) -> set[int]:
        workers = schema.workers
        held = self._held(run_id)
        with self._engine.begin() as conn:
            now = time.time()
            conn.execute(
                workers.update()
                .where(workers.c.run_id == run_id, workers.c.owner == self.owner)
                .values(heartbeat_at=now)
            )
            ours, lost = self._fence(conn, run_id, held)
            if ours:
                self._update_row_groups(conn, run_id, ours, lease_expires_at=now + lease_s)
        return lost

    @_translate_errors
    def release_row_groups(self, run_id: str, row_groups: Sequence[int]) -> None:
        if not row_groups:
            return
        with self._engine.begin() as conn:
            ours, _lost = self._fence(conn, run_id, set(row_groups))
            if ours:
                self._update_row_groups(conn, run_id, ours, lease_owner=None, lease_expires_at=None)
        self._forget(run_id, row_groups)

    @_translate_errors
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
            decode = values.decode
            for generator, row_index, state, attempts, next_eligible_at, last_error, value in rows:
                key = (generator, row_index)
                if state == "done":
                    loaded.done[key] = decode(value)
                elif state == "deferred":
                    loaded.deferred[key] = (attempts, next_eligible_at, last_error)
                else:  # in_flight, frontier, failed
                    loaded.attempts[key] = attempts
        return loaded

    # -- the journal -----------------------------------------------------------------------

    @_translate_errors
    def record(self, run_id: str, events: Sequence[tuple]) -> set[int]:
        if not events:
            return set()
        # Coalesce per task: the last state wins; a DONE's value travels with it; the error
        # details of the last DEFERRED/FAILED stay with the task even if it started again.
        # entry: [state, task_type, JSON text (DONE only), (attempts, next_eligible_at, error) | None]
        tasks: dict[tuple, list] = {}
        dropped: dict[int, set[int] | None] = {}
        completed: set[int] = set()
        usage: list[tuple[tuple, tuple]] = []
        for ev in events:
            kind = ev[0]
            if kind == DONE and len(ev) == 6:
                # The common case: a task done with nothing else pending in this batch. The
                # event itself stands for the row (resolved below); no coalescing entry.
                key = (ev[1], ev[2], ev[3])
                if key not in tasks:
                    tasks[key] = ev
                    continue
            if kind <= FAILED:
                key = (ev[1], ev[2], ev[3])
                if len(ev) > 6:  # model usage of this attempt, recorded with its transition
                    usage.append((key, ev[6]))
                entry = tasks.get(key)
                if entry is None:
                    entry = tasks[key] = [None, ev[4], None, None]
                elif type(entry) is tuple:  # a plain DONE seen earlier in this batch
                    entry = tasks[key] = ["done", entry[4], entry[5], None]
                else:
                    entry[1] = ev[4]
                if kind == STARTED:
                    entry[0] = "in_flight"
                    entry[2] = None
                elif kind == DONE:
                    entry[0] = "done"
                    entry[2] = ev[5]
                elif kind == DEFERRED:
                    entry[0] = "deferred"
                    entry[2] = None
                    entry[3] = ev[5]
                else:
                    attempts, error = ev[5]
                    entry[0] = "failed"
                    entry[2] = None
                    entry[3] = (attempts, None, error)
            elif kind == DROPPED:
                rg, row_index = ev[1], ev[3]
                if row_index is None:
                    dropped[rg] = None
                else:
                    rows = dropped.get(rg, set())
                    if rows is not None:
                        rows.add(row_index)
                        dropped[rg] = rows
            elif kind == COMPLETE:
                completed.add(ev[1])
            else:
                raise ValueError(f"unknown event {ev!r}")

        touched = {key[0] for key in tasks}
        touched.update(dropped)
        touched.update(completed)
        with self._engine.begin() as conn:
            ours, lost = self._fence(conn, run_id, touched)
            if not ours:
                return lost
            now = time.time()
            plain: list[tuple] = []
            full: list[tuple] = []
            all_ours = len(ours) == len(touched)
            for (rg, generator, row_index), entry in tasks.items():
                if type(entry) is tuple:  # plain DONE
                    if all_ours or rg in ours:
                        plain.append((run_id, rg, generator, -1 if row_index is None else row_index, row_index,
                                      entry[4], "done", entry[5], now))
                    continue
                if rg not in ours:
                    continue
                state, task_type, value, error = entry
                text = value if state == "done" else None  # DONE carries its JSON text
                slot = -1 if row_index is None else row_index
                if error is None:
                    plain.append((run_id, rg, generator, slot, row_index, task_type, state, text, now))
                else:
                    # A generator's message may hold lone surrogates, which no driver can encode.
                    attempts, next_eligible_at, message = error
                    full.append((run_id, rg, generator, slot, row_index, task_type, state, text, now,
                                 attempts, next_eligible_at, message and values.valid_unicode(message)))
            self._upsert_tasks(conn, run_id, now, plain, full)
            drops = []
            counts = []
            for rg, rows in dropped.items():
                if rg not in ours:
                    continue
                indexes = range(ours[rg]) if rows is None else sorted(rows)
                drops.extend({"r": run_id, "rg": rg, "i": i} for i in indexes)
                counts.append({"r": run_id, "rg": rg})
            if drops:
                conn.execute(_INSERT_DROPPED, drops)
                conn.execute(_COUNT_DROPPED, counts)
            done = [{"r": run_id, "rg": rg} for rg in completed if rg in ours]
            if done:
                conn.execute(_MARK_COMPLETE, done)
            if usage:
                usage_sql.write(conn, run_id, now, ours, usage)
        return lost

    @_translate_errors
    def model_usage(self, run_id: str) -> dict[str, dict[str, int]]:
        with self._reader.connect() as conn:
            return usage_sql.read(conn, run_id)

    @_translate_errors
    def add_calls_saved(self, run_id: str, saved: dict[tuple[str, str], int]) -> None:
        with self._engine.begin() as conn:
            usage_sql.add_calls_saved(conn, run_id, saved)

    @_translate_errors
    def checkpoint_row_group(self, run_id: str, row_group: int, path: str, rows_dropped: int) -> bool:
        t, d = schema.tasks, schema.dropped_records
        with self._engine.begin() as conn:
            ours, _lost = self._fence(conn, run_id, {row_group})
            if not ours:
                return False
            self._update_row_groups(
                conn, run_id, ours, state="checkpointed", path=path, rows_dropped=rows_dropped,
                lease_owner=None, lease_expires_at=None,
            )
            # Compaction: the Parquet file holds the values now. Failed rows stay, for the
            # failure report and rows_failed in column_progress; rows_dropped keeps the count.
            conn.execute(t.delete().where(t.c.run_id == run_id, t.c.row_group == row_group, t.c.state != "failed"))
            conn.execute(d.delete().where(d.c.run_id == run_id, d.c.row_group == row_group))
        self._forget(run_id, [row_group])
        return True

    # -- reading ---------------------------------------------------------------------------

    @_translate_errors
    def row_groups(self, run_id: str) -> list[dict]:
        g = schema.row_groups
        with self._reader.connect() as conn:
            rows = conn.execute(
                sa.select(g.c.row_group, g.c.num_rows, g.c.state, g.c.rows_dropped, g.c.path, g.c.lease_owner,
                          g.c.lease_epoch, g.c.lease_expires_at)
                .where(g.c.run_id == run_id)
                .order_by(g.c.row_group)
            )
            return [dict(row) for row in rows.mappings()]

    @_translate_errors
    def column_counts(self, run_id: str) -> dict[str, dict[str, int]]:
        with self._reader.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT p.column_name, p.rows_done, p.rows_failed, p.rows_deferred, p.rows_in_flight "
                    "FROM column_progress p JOIN run_columns c "
                    "ON c.run_id = p.run_id AND c.column_name = p.column_name "
                    "WHERE p.run_id = :r ORDER BY c.position"
                ),
                {"r": run_id},
            ).all()
        return {
            name: {"done": int(done), "failed": int(failed), "deferred": int(deferred), "in_flight": int(in_flight)}
            for name, done, failed, deferred, in_flight in rows
        }

    def read_query(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Run one statement on a connection that cannot write (for `pipeline sql`); return the
        column names and the rows. ReadOnlyQueryError if the statement would write, StoreError
        with the database's message for any other error."""
        if self._pg:
            return postgres.read_query(self._engine, sql)
        with self._lock:
            if self._read_only_engine is None:
                self._read_only_engine = sqlite.create_read_only_engine(self._engine.url)
        return sqlite.read_query(self._read_only_engine, sql)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._read_only_engine is not None:
            self._read_only_engine.dispose()
        self._engine.dispose()

