"""`pipeline retry` in the SQL store (:meth:`pipeline.store.sql.SqlStore.reopen_failed`): read
each row group with failed tasks that match, plan it (:func:`pipeline.store.reopen.plan_group`)
and write the change, inside the caller's transaction. Same SQL on SQLite and PostgreSQL; a cold
path (a few statements per row group reopened)."""

from __future__ import annotations

import time
from typing import Callable, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline import values
from pipeline.states import RowGroupState, RunStatus, TaskState
from pipeline.store import schema
from pipeline.store.base import Lineage, Reopened
from pipeline.store.reopen import GroupChange, GroupState, plan_group

__all__ = ["reopen"]

_INSERT_DROPPED = sa.text("INSERT INTO dropped_records (run_id, row_group, row_index) VALUES (:r, :rg, :i)")


def reopen(conn: Connection, run_id: str, lineage: Lineage, selected: Callable[[str, str | None], bool],
           read_file: Callable[[str], Mapping[str, list]]) -> Reopened:
    t, g, runs = schema.tasks, schema.row_groups, schema.runs
    failed = conn.execute(
        sa.select(t.c.row_group, t.c.column_name, t.c.last_error).where(t.c.run_id == run_id, t.c.state == TaskState.FAILED)
    ).all()
    out = Reopened()
    now = time.time()
    # Row groups in order, each locked (PostgreSQL) before it is read, as SqlStore._fence locks
    # them: fencing transactions and this one never deadlock. SQLite: BEGIN IMMEDIATE holds all.
    for rg in sorted({rg for rg, gen, err in failed if selected(gen, err)}):
        row = conn.execute(
            sa.select(g.c.num_rows, g.c.state, g.c.path).where(g.c.run_id == run_id, g.c.row_group == rg)
            .with_for_update()
        ).one()
        change = plan_group(_group_state(conn, run_id, rg, *row), lineage, selected, read_file)
        if change is None:
            continue
        _apply(conn, run_id, change, now)
        out.add(change)
    if out.row_groups:
        conn.execute(runs.update().where(runs.c.run_id == run_id)
                     .values(status=RunStatus.RUNNING, updated_at=now, finished_at=None))
    return out


def _group_state(conn: Connection, run_id: str, rg: int, num_rows: int, state: str, path: str | None) -> GroupState:
    t, d = schema.tasks, schema.dropped_records
    group = GroupState(rg, num_rows, state, path, {}, set(), set(), {})
    group.dropped.update(conn.execute(
        sa.select(d.c.row_index).where(d.c.run_id == run_id, d.c.row_group == rg)).scalars())
    rows = conn.execute(
        sa.select(t.c.column_name, t.c.row_index, t.c.state, t.c.last_error,
                  sa.case((t.c.row_index.is_(None), t.c.value), else_=sa.null()))  # batch values only
        .where(t.c.run_id == run_id, t.c.row_group == rg, t.c.state.in_((TaskState.DONE, TaskState.FAILED)))
    )
    for gen, r, state, last_error, value in rows:
        if state == TaskState.FAILED:
            group.failed[(gen, r)] = last_error
            continue
        group.done.add((gen, r))
        if r is None:
            group.batch_values[gen] = values.decode(value)
    return group


def _apply(conn: Connection, run_id: str, change: GroupChange, now: float) -> None:
    t, d, g = schema.tasks, schema.dropped_records, schema.row_groups
    rg = change.row_group
    key = sa.and_(t.c.run_id == run_id, t.c.row_group == rg, t.c.column_name == sa.bindparam("gen"),
                  t.c.slot == sa.bindparam("slot"))
    for keys in (change.reopen, change.reset):
        if keys:
            conn.execute(t.delete().where(key), [{"gen": gen, "slot": -1 if r is None else r} for gen, r in keys])
    if change.insert:
        conn.execute(t.insert(), [
            {"run_id": run_id, "row_group": rg, "column_name": gen, "slot": -1 if r is None else r, "row_index": r,
             "task_type": task_type, "state": TaskState.DONE, "attempts": 0, "value": values.encode(value), "updated_at": now}
            for (gen, r), (task_type, value) in change.insert.items()])
    conn.execute(d.delete().where(d.c.run_id == run_id, d.c.row_group == rg))
    if change.dropped:
        conn.execute(_INSERT_DROPPED, [{"r": run_id, "rg": rg, "i": i} for i in sorted(change.dropped)])
    # Active again with no lease: the next claim loads it like any live row group; the new epoch
    # fences off a worker that still holds it (its next commit abandons the row group).
    conn.execute(g.update().where(g.c.run_id == run_id, g.c.row_group == rg).values(
        state=RowGroupState.ACTIVE, rows_dropped=len(change.dropped), lease_owner=None, lease_expires_at=None,
        lease_epoch=g.c.lease_epoch + 1))
