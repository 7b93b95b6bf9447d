"""Whole-run operations of the SQL store that the engine never uses: the record counts of every
run at once (`pipeline runs`) and deleting a run (`pipeline rm`).

A run's rows live in every table with a ``run_id`` column. Deleting walks
``schema.metadata.sorted_tables`` backwards (children before the ``runs`` row their foreign
keys point at), so a table added by a later migration is covered without a change here.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.errors import RunInUseError, RunNotFoundError
from pipeline.states import RowGroupState
from pipeline.store import schema
from pipeline.workers import HOST, owner_is_gone

__all__ = ["delete_run", "record_counts", "run_tables"]


def run_tables() -> list[sa.Table]:
    """The tables that hold a run's rows, in an order safe to delete from (``runs`` last)."""
    return [t for t in reversed(schema.metadata.sorted_tables) if "run_id" in t.c]


def record_counts(reader: Engine) -> dict[str, tuple[int, int]]:
    """``{run_id: (records written, records dropped)}`` for every run, in one query: records of
    checkpointed row groups less their dropped ones, and dropped records (as
    :meth:`~pipeline.store.base.Store.row_group_counts` counts them per run)."""
    g = schema.row_groups
    written = sa.func.sum(sa.case((g.c.state == RowGroupState.CHECKPOINTED, g.c.num_rows - g.c.rows_dropped), else_=0))
    query = sa.select(g.c.run_id, written, sa.func.sum(g.c.rows_dropped)).group_by(g.c.run_id)
    with reader.connect() as conn:
        return {run_id: (int(w or 0), int(d or 0)) for run_id, w, d in conn.execute(query)}


def _live_holders(conn: sa.Connection, run_id: str, fresh_s: float) -> list[str]:
    """Owners that still work on the run: a registered worker alive (this host) or with a fresh
    heartbeat (other hosts), or a row-group lease not expired whose owner is not known gone."""
    now = time.time()
    w, g = schema.workers, schema.row_groups
    holders = set()
    for owner, heartbeat_at in conn.execute(sa.select(w.c.owner, w.c.heartbeat_at).where(w.c.run_id == run_id)):
        if not owner_is_gone(owner) and (owner.rsplit(":", 3)[0] == HOST or heartbeat_at > now - fresh_s):
            holders.add(owner)
    leases = sa.select(g.c.lease_owner).distinct().where(
        g.c.run_id == run_id, g.c.lease_owner.is_not(None), g.c.lease_expires_at >= now,
        g.c.state != RowGroupState.CHECKPOINTED)
    holders.update(owner for (owner,) in conn.execute(leases) if not owner_is_gone(owner))
    return sorted(holders)


def delete_run(engine: Engine, run_id: str, *, where: str, fresh_s: float) -> dict[str, int]:
    """Delete every row of the run, in one transaction; ``{table: rows deleted}``.

    The run's row is locked first (SQLite: the write lock of BEGIN IMMEDIATE; PostgreSQL: FOR
    UPDATE, which a worker's claim and its worker row wait for), then the run is refused with
    RunInUseError while a worker or lease is live (see :func:`_live_holders`); RunNotFoundError
    for an unknown id. ``where`` names the store in messages."""
    runs = schema.runs
    with engine.begin() as conn:
        found = conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id == run_id).with_for_update()).first()
        if found is None:
            raise RunNotFoundError(f"no run with id {run_id!r} in {where}; `pipeline runs` lists them")
        holders = _live_holders(conn, run_id, fresh_s)
        if holders:
            raise RunInUseError(
                f"run {run_id} is in use by {len(holders)} live worker(s) ({', '.join(holders[:3])}); stop them "
                f"(Ctrl-C, or SIGTERM), or wait for their leases to expire, then `pipeline rm {run_id}` again")
        return {t.name: conn.execute(t.delete().where(t.c.run_id == run_id)).rowcount for t in run_tables()}
