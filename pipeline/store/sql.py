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
import threading
import time
from dataclasses import asdict, fields
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

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
    ROW_GROUP_BATCH,
    RUN_STATES,
    STARTED,
    STATE,
    Lineage,
    LoadedRowGroup,
    NewRun,
    Reopened,
    RowGroupClaim,
    RunInfo,
    row_group_counts,
)
from pipeline.store import change_sql, reopen_sql
from pipeline.store import traces as traces_sql
from pipeline.store.change_plan import ChangeResult, ConfigChange
from pipeline.store import usage as usage_sql
from pipeline.store.reopen import task_filter
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
_UPSERT_STATE = sa.text(
    "INSERT INTO generator_states (run_id, generator, row_group, state, updated_at) VALUES (:r, :g, :rg, :s, :now) "
    "ON CONFLICT (run_id, generator, row_group) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at"
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
                             "pip install 'psycopg[binary]' (or, from the project's folder, pip install -e '.[postgres]')") from None
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
                self._create_row_groups(conn, run.run_id, 0, run.num_records, size)
                self._insert_fingerprints(conn, run.run_id, run.fingerprints)
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

    def _create_row_groups(self, conn: Connection, run_id: str, start: int, num_records: int, size: int,
                           at_least: int = 0) -> range:
        """Insert the ``pending`` rows of the next row groups from ``start``: ``row_group_batch``
        of them (or ``at_least``), fewer at the end of the run. Returns the row groups created."""
        total = -(-num_records // size)
        created = range(start, min(total, start + max(self.row_group_batch, at_least)))
        if created:
            conn.execute(schema.row_groups.insert(), [
                {"run_id": run_id, "row_group": rg, "num_rows": min(size, num_records - rg * size),
                 "state": "pending", "rows_dropped": 0, "lease_epoch": 0}
                for rg in created
            ])
        return created

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
    def record_counts(self) -> dict[str, tuple[int, int]]:
        from pipeline.store import admin

        return admin.record_counts(self._reader)

    @_translate_errors
    def delete_run(self, run_id: str) -> dict[str, int]:
        from pipeline.store import admin

        return admin.delete_run(self._engine, run_id, where=self.url_text, fresh_s=WORKER_HEARTBEAT_FRESH_S)

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

    @staticmethod
    def _insert_fingerprints(conn: Connection, run_id: str, rows: Sequence[tuple[str, str, str]]) -> None:
        if rows:
            conn.execute(schema.run_fingerprints.insert(),
                         [{"run_id": run_id, "kind": k, "name": n, "digest": d} for k, n, d in rows])

    @_translate_errors
    def run_fingerprints(self, run_id: str) -> dict[tuple[str, str], str]:
        f = schema.run_fingerprints
        with self._reader.connect() as conn:
            rows = conn.execute(sa.select(f.c.kind, f.c.name, f.c.digest).where(f.c.run_id == run_id))
            return {(kind, name): digest for kind, name, digest in rows}

    @_translate_errors
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
    def leases(self, run_id: str) -> dict[str, list[int]]:
        g = schema.row_groups
        held: dict[str, list[int]] = {}
        with self._reader.connect() as conn:
            rows = conn.execute(
                sa.select(g.c.lease_owner, g.c.row_group)
                .where(g.c.run_id == run_id, g.c.lease_owner.is_not(None), g.c.state != "checkpointed",
                       g.c.lease_expires_at > time.time())
                .order_by(g.c.row_group))
            for owner, row_group in rows:
                held.setdefault(owner, []).append(row_group)
        return held

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
        runs = schema.runs
        claims: list[RowGroupClaim] = []
        with self._engine.begin() as conn:
            # The run's row first (PostgreSQL: FOR NO KEY UPDATE, which inserts into row_groups
            # do not wait for): claimers that create row groups take turns, and every claim
            # locks the run before its row groups, so no two transactions wait on each other.
            run = conn.execute(
                sa.select(runs.c.num_records, runs.c.row_group_size)
                .where(runs.c.run_id == run_id)
                .with_for_update(key_share=True)
            ).first()
            if run is None:
                return []
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
            if len(claims) < limit:  # every created row group is taken: create the next ones
                last = conn.execute(sa.select(sa.func.max(g.c.row_group)).where(g.c.run_id == run_id)).scalar()
                num_records, size = run
                want = limit - len(claims)
                for rg in self._create_row_groups(conn, run_id, 0 if last is None else last + 1, num_records,
                                                  size, want)[:want]:
                    claims.append(RowGroupClaim(rg, min(size, num_records - rg * size), 1, "pending"))
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
        states: list[tuple] = []
        usage: list[tuple[tuple, tuple]] = []
        for ev in events:
            kind = ev[0]
            if kind == STATE:  # a stateful generator's state, with the DONE it follows
                states.append(ev)
                ev = ev[4]
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
        touched.update(ev[1] for ev in states)
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
            kept = [{"r": run_id, "g": ev[2], "rg": ev[1], "s": ev[3], "now": now} for ev in states if ev[1] in ours]
            if kept:
                conn.execute(_UPSERT_STATE, kept)
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
    @_translate_errors
    def add_traces(self, run_id: str, rows: Sequence[Any]) -> None:
        with self._engine.begin() as conn:
            traces_sql.insert(conn, run_id, rows)

    @_translate_errors
    def traces(self, run_id: str) -> list[dict]:
        with self._reader.connect() as conn:
            return traces_sql.select(conn, run_id)

    def add_calls_saved(self, run_id: str, saved: dict[tuple[str, str], int]) -> None:
        with self._engine.begin() as conn:
            usage_sql.add_calls_saved(conn, run_id, saved)

    def lease_epoch(self, run_id: str, row_group: int) -> int | None:
        with self._lock:
            return self._epochs.get((run_id, row_group))

    @_translate_errors
    def checkpoint_row_group(self, run_id: str, row_group: int, path: str, rows_dropped: int, *,
                             file_bytes: int | None = None, file_sha256: str | None = None) -> bool:
        t, d, g = schema.tasks, schema.dropped_records, schema.row_groups
        with self._engine.begin() as conn:
            ours, _lost = self._fence(conn, run_id, {row_group})
            if not ours:
                current = conn.execute(
                    sa.select(g.c.state, g.c.path).where(g.c.run_id == run_id, g.c.row_group == row_group)
                ).first()
                return current is not None and tuple(current) == ("checkpointed", path)
            self._update_row_groups(
                conn, run_id, ours, state="checkpointed", path=path, rows_dropped=rows_dropped,
                file_bytes=file_bytes, file_sha256=file_sha256, lease_owner=None, lease_expires_at=None,
            )
            # Compaction: the Parquet file holds the values now. Failed rows stay, for the
            # failure report and rows_failed in column_progress. With dropped records, so do
            # those records, their done cells and the batch tasks' values: `pipeline retry`
            # brings them back without computing them again (column_progress does not count
            # done rows of a checkpointed row group). Without drops, nothing else stays.
            rows = t.delete().where(t.c.run_id == run_id, t.c.row_group == row_group, t.c.state != "failed")
            if rows_dropped:
                dropped = sa.select(d.c.row_index).where(d.c.run_id == run_id, d.c.row_group == row_group)
                rows = rows.where(sa.not_(sa.and_(
                    t.c.state == "done", sa.or_(t.c.row_index.is_(None), t.c.row_index.in_(dropped)))))
            conn.execute(rows)
        self._forget(run_id, [row_group])
        return True

    @_translate_errors
    def reopen_failed(self, run_id: str, lineage: Lineage, *, generators: Collection[str] | None = None,
                      error: str | None = None, read_file: Callable[[str], Mapping[str, list]]) -> Reopened:
        with self._engine.begin() as conn:
            if not self._has_run(conn, run_id):
                raise RunNotFoundError(f"no run with id {run_id!r} in {self.url_text}; `pipeline runs` lists them")
            out = reopen_sql.reopen(conn, run_id, lineage, task_filter(generators, error), read_file)
        self._forget(run_id, out.row_groups)
        return out

    @_translate_errors
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

    @_translate_errors
    def copy_cells(self, source: str, target: str, generators: Mapping[str, tuple[str, tuple[str, ...]]], *,
                   read_file: Callable[[str], Mapping[str, list]]) -> dict[str, int]:
        with self._engine.begin() as conn:
            return change_sql.copy_cells(conn, source, target, generators, read_file)

    @_translate_errors
    def run_changes(self, run_id: str) -> list[dict]:
        c = schema.run_changes
        with self._reader.connect() as conn:
            rows = conn.execute(sa.select(c.c.changed_at, c.c.kind, c.c.name, c.c.old_digest, c.c.new_digest,
                                          c.c.detail).where(c.c.run_id == run_id).order_by(c.c.change_id))
            return [dict(row) for row in rows.mappings()]

    @_translate_errors
    def reopen_row_groups(self, run_id: str, row_groups: Sequence[int]) -> list[int]:
        if not row_groups:
            return []
        t, d, g = schema.tasks, schema.dropped_records, schema.row_groups
        with self._engine.begin() as conn:
            reopened = list(conn.execute(
                sa.select(g.c.row_group)
                .where(g.c.run_id == run_id, g.c.row_group.in_(list(row_groups)), g.c.state == "checkpointed")
                .order_by(g.c.row_group)
                .with_for_update()
            ).scalars())
            if reopened:
                self._update_row_groups(conn, run_id, reopened, state="pending", path=None, file_bytes=None,
                                        file_sha256=None, rows_dropped=0, lease_owner=None,
                                        lease_expires_at=None)
                conn.execute(t.delete().where(t.c.run_id == run_id, t.c.row_group.in_(reopened)))
                conn.execute(d.delete().where(d.c.run_id == run_id, d.c.row_group.in_(reopened)))
        return reopened

    # -- reading ---------------------------------------------------------------------------

    @_translate_errors
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

    @_translate_errors
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

    @_translate_errors
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

    @_translate_errors
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

    @_translate_errors
    def failed_tasks(self, run_id: str) -> list[tuple[str, str | None]]:
        t = schema.tasks
        with self._reader.connect() as conn:
            return [tuple(row) for row in conn.execute(
                sa.select(t.c.column_name, t.c.last_error).where(t.c.run_id == run_id, t.c.state == "failed"))]

    def read_query(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Run one statement that only reads, on a connection of its own that cannot write (for
        `pipeline sql`); return the column names and the rows. ReadOnlyQueryError if the
        statement is refused (:mod:`pipeline.store.readonly` says what passes), StoreError with
        the database's message for any other error."""
        if self._pg:
            return postgres.read_query(self._engine.url, sql)
        return sqlite.read_query(self._engine.url, sql)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._engine.dispose()

