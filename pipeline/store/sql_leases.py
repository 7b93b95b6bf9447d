"""Workers and leases of the SQL store: who works on a run, which row groups each process holds
(claims with a fresh epoch, renewals, releases), and the fence every writing transaction checks.

A claim bumps the row group's epoch; :meth:`SqlLeases._fence` checks, inside the caller's
transaction, that this owner still holds each row group it touches with the epoch it claimed.
SQLite's write lock (``BEGIN IMMEDIATE``) and PostgreSQL's row locks, taken in row-group order,
keep other claimers out until commit.
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.states import RowGroupState
from pipeline.store import schema
from pipeline.store.base import RowGroupClaim
from pipeline.store.sql_common import WORKER_HEARTBEAT_FRESH_S, SqlParts, translate_errors
from pipeline.workers import HOST, owner_is_gone

__all__ = ["SqlLeases"]


class SqlLeases(SqlParts):
    """The workers-and-leases part of :class:`~pipeline.store.sql.SqlStore`."""

    def _create_row_groups(self, conn: Connection, run_id: str, start: int, num_records: int, size: int,
                           at_least: int = 0) -> range:
        """Insert the ``pending`` rows of the next row groups from ``start``: ``row_group_batch``
        of them (or ``at_least``), fewer at the end of the run. Returns the row groups created."""
        total = -(-num_records // size)
        created = range(start, min(total, start + max(self.row_group_batch, at_least)))
        if created:
            conn.execute(schema.row_groups.insert(), [
                {"run_id": run_id, "row_group": rg, "num_rows": min(size, num_records - rg * size),
                 "state": RowGroupState.PENDING, "rows_dropped": 0, "lease_epoch": 0}
                for rg in created
            ])
        return created

    @translate_errors
    def register_worker(self, run_id: str) -> bool:
        workers, runs = schema.workers, schema.runs
        now = time.time()
        with self._engine.begin() as conn:
            # The run's row first (PostgreSQL; SQLite's BEGIN IMMEDIATE serialises already):
            # registrations take turns, so of processes that join a run with no live worker at
            # the same moment exactly one sees none other and begins the resume.
            conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id == run_id).with_for_update(key_share=True))
            conn.execute(
                sa.text(
                    "INSERT INTO workers (run_id, owner, heartbeat_at, started_at) VALUES (:r, :o, :now, :now) "
                    "ON CONFLICT (run_id, owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
                ),
                {"r": run_id, "o": self.owner, "now": now},
            )
            others = conn.execute(
                sa.select(workers.c.owner, workers.c.heartbeat_at)
                .where(workers.c.run_id == run_id, workers.c.owner != self.owner)
            ).all()
            # Forget processes of this host that died without unregistering.
            gone = [owner for owner, _ in others if owner_is_gone(owner)]
            if gone:
                conn.execute(workers.delete().where(workers.c.run_id == run_id, workers.c.owner.in_(gone)))
        return not any(_is_live(owner, heartbeat_at, now) for owner, heartbeat_at in others if owner not in gone)

    @translate_errors
    def unregister_worker(self, run_id: str) -> None:
        workers = schema.workers
        with self._engine.begin() as conn:
            conn.execute(workers.delete().where(workers.c.run_id == run_id, workers.c.owner == self.owner))

    @translate_errors
    def live_workers(self, run_id: str) -> int:
        workers = schema.workers
        with self._reader.connect() as conn:
            rows = conn.execute(
                sa.select(workers.c.owner, workers.c.heartbeat_at).where(workers.c.run_id == run_id)
            ).all()
        now = time.time()
        return sum(1 for owner, heartbeat_at in rows if _is_live(owner, heartbeat_at, now))

    @translate_errors
    def leases(self, run_id: str) -> dict[str, list[int]]:
        g = schema.row_groups
        held: dict[str, list[int]] = {}
        with self._reader.connect() as conn:
            rows = conn.execute(
                sa.select(g.c.lease_owner, g.c.row_group)
                .where(g.c.run_id == run_id, g.c.lease_owner.is_not(None), g.c.state != RowGroupState.CHECKPOINTED,
                       g.c.lease_expires_at > time.time())
                .order_by(g.c.row_group))
            for owner, row_group in rows:
                held.setdefault(owner, []).append(row_group)
        return held

    @translate_errors
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
                g.c.state != RowGroupState.CHECKPOINTED,
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
                    claims.append(RowGroupClaim(rg, min(size, num_records - rg * size), 1, RowGroupState.PENDING))
            if claims:
                conn.execute(
                    g.update()
                    .where(g.c.run_id == run_id, g.c.row_group == sa.bindparam("rg"))
                    .values(
                        lease_owner=self.owner,
                        lease_epoch=sa.bindparam("epoch"),
                        lease_expires_at=now + lease_s,
                        state=sa.case((g.c.state == RowGroupState.PENDING, RowGroupState.ACTIVE), else_=g.c.state),
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

    @translate_errors
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

    @translate_errors
    def release_row_groups(self, run_id: str, row_groups: Sequence[int]) -> None:
        if not row_groups:
            return
        with self._engine.begin() as conn:
            ours, _lost = self._fence(conn, run_id, set(row_groups))
            if ours:
                self._update_row_groups(conn, run_id, ours, lease_owner=None, lease_expires_at=None)
        self._forget(run_id, row_groups)

    def lease_epoch(self, run_id: str, row_group: int) -> int | None:
        with self._lock:
            return self._epochs.get((run_id, row_group))


def _is_live(owner: str, heartbeat_at: float, now: float) -> bool:
    """A worker whose process runs (this host) or whose heartbeat is fresh (another host)."""
    if owner_is_gone(owner):
        return False
    return owner.rsplit(":", 3)[0] == HOST or heartbeat_at > now - WORKER_HEARTBEAT_FRESH_S
