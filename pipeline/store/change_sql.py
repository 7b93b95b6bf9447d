"""Changed configs in the SQL store, inside the caller's transaction: `resume --config`
(:func:`apply_change`: every row group planned with :func:`pipeline.store.change_plan.plan_edit`
and written with retry's writer) and `run --reuse` (:func:`copy_cells`). Same SQL on SQLite and
PostgreSQL; a cold path (a few statements per row group), streaming one row group at a time."""

from __future__ import annotations

import time
from typing import Callable, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline import values
from pipeline.errors import RunInUseError, RunNotFoundError
from pipeline.states import RowGroupState, RunStatus, TaskState, TaskType
from pipeline.store import schema
from pipeline.store.change_plan import ChangeResult, ConfigChange, GroupFacts, fill_values, plan_edit
from pipeline.store.reopen_sql import _apply
from pipeline.workers import HOST, owner_is_gone

__all__ = ["apply_change", "copy_cells", "live_holders"]

ReadFile = Callable[[str], Mapping[str, list]]
_CHUNK_ROWS = 5000
# Per task row: plain strings, bound once (a driver binds a str subclass more slowly).
_DONE, _FAILED = TaskState.DONE.value, TaskState.FAILED.value


def live_holders(conn: Connection, run_id: str, fresh_s: float, me: str | None = None) -> list[str]:
    """Owners of live workers of the run, and of live leases on its row groups (``me`` left out)."""
    w, g = schema.workers, schema.row_groups
    now = time.time()
    owners = set()
    for owner, heartbeat_at in conn.execute(sa.select(w.c.owner, w.c.heartbeat_at).where(w.c.run_id == run_id)):
        if not owner_is_gone(owner) and (owner.rsplit(":", 3)[0] == HOST or heartbeat_at > now - fresh_s):
            owners.add(owner)
    leases = conn.execute(sa.select(g.c.lease_owner).distinct().where(
        g.c.run_id == run_id, g.c.lease_owner.is_not(None), g.c.lease_expires_at > now)).scalars()
    owners.update(o for o in leases if not owner_is_gone(o))
    owners.discard(me)
    return sorted(owners)


def apply_change(conn: Connection, run_id: str, change: ConfigChange, read_file: ReadFile, *, dry_run: bool,
                 fresh_s: float, me: str | None = None) -> ChangeResult:
    """Plan (``dry_run``: and write nothing) or apply ``change`` to the run; RunInUseError when
    live workers other than ``me`` hold it (not checked by a dry run)."""
    runs, g = schema.runs, schema.row_groups
    query = sa.select(runs.c.num_records, runs.c.row_group_size).where(runs.c.run_id == run_id)
    # The run's row first, as claims lock it: no claim runs while the change is applied.
    run = conn.execute(query if dry_run else query.with_for_update()).first()
    if run is None:
        raise RunNotFoundError(f"no run with id {run_id!r}; `pipeline runs` lists them")
    if not dry_run:
        holders = live_holders(conn, run_id, fresh_s, me)
        if holders:
            raise RunInUseError(
                f"run {run_id!r} has {len(holders)} live worker(s) ({', '.join(holders[:3])}"
                f"{', ...' if len(holders) > 3 else ''}); a changed config is applied only while no worker runs "
                f"it. Stop them first (Ctrl-C or SIGTERM; they stop cleanly), then run the command again. "
                f"Nothing changed")
    size, num_new = change.row_group_size, change.num_records
    total_new = -(-num_new // size)
    result = ChangeResult()
    now = time.time()
    created = conn.execute(sa.select(g.c.row_group, g.c.num_rows, g.c.state, g.c.path)
                           .where(g.c.run_id == run_id).order_by(g.c.row_group)).all()
    past = [rg for rg, *_ in created if rg >= total_new]
    for rg, num_rows, state, path in created:
        if rg >= total_new:
            continue
        n_new = min(size, num_new - rg * size)
        facts = GroupFacts(rg, num_rows, state, path)
        if state != RowGroupState.PENDING:
            _read_group(conn, run_id, facts)
        edit = plan_edit(facts, change, n_new, result)
        if dry_run:
            continue
        if edit is not None:
            if state == RowGroupState.CHECKPOINTED:
                fill_values(edit, change.lineage, read_file, path or "")
            _apply(conn, run_id, edit.change, now)
            if state == RowGroupState.CHECKPOINTED:
                conn.execute(g.update().where(g.c.run_id == run_id, g.c.row_group == rg)
                             .values(path=None, file_bytes=None, file_sha256=None))
        if n_new != num_rows:
            conn.execute(g.update().where(g.c.run_id == run_id, g.c.row_group == rg).values(num_rows=n_new))
    # Row groups not created yet: all their records are computed.
    start = (created[-1][0] + 1) * size if created else 0
    if num_new > start:
        for gen in change.lineage.task_types:
            result.add(gen, 0, num_new - start)
    result.row_groups_removed = len(past)
    if not dry_run:
        _write_run(conn, run_id, change, result, past, now)
    return result


def _read_group(conn: Connection, run_id: str, facts: GroupFacts) -> None:
    t, d = schema.tasks, schema.dropped_records
    rg = facts.row_group
    facts.dropped.update(conn.execute(
        sa.select(d.c.row_index).where(d.c.run_id == run_id, d.c.row_group == rg)).scalars())
    rows = conn.execute(
        sa.select(t.c.column_name, t.c.row_index, t.c.state, t.c.last_error,
                  sa.case((t.c.row_index.is_(None), t.c.value), else_=sa.null()))  # batch values only
        .where(t.c.run_id == run_id, t.c.row_group == rg))
    for gen, r, state, last_error, value in rows:
        if state == _FAILED:
            facts.failed[(gen, r)] = last_error
        elif state == _DONE:
            facts.done.add((gen, r))
            if r is None:
                facts.batch_values[gen] = values.decode(value)
        else:
            facts.other.add((gen, r))


def _write_run(conn: Connection, run_id: str, change: ConfigChange, result: ChangeResult, past: list[int],
               now: float) -> None:
    runs, g, t, d = schema.runs, schema.row_groups, schema.tasks, schema.dropped_records
    s, f, c = schema.generator_states, schema.run_fingerprints, schema.run_columns
    if past:  # past the new end (num_records shrank): gone, with what they held
        first = past[0]
        result.removed_paths = [p for p in conn.execute(sa.select(g.c.path).where(
            g.c.run_id == run_id, g.c.row_group >= first, g.c.path.is_not(None))).scalars()]
        for table in (t, d, s):
            conn.execute(table.delete().where(table.c.run_id == run_id, table.c.row_group >= first))
        conn.execute(g.delete().where(g.c.run_id == run_id, g.c.row_group >= first))
    # A stateful generator computed again starts from its initial state.
    redo = sorted(change.recompute | change.removed)
    if redo:
        conn.execute(s.delete().where(s.c.run_id == run_id, s.c.generator.in_(redo)))
    conn.execute(runs.update().where(runs.c.run_id == run_id).values(
        config=change.config, fingerprint=change.fingerprint, num_records=change.num_records, status=RunStatus.RUNNING,
        updated_at=now, finished_at=None))
    conn.execute(c.delete().where(c.c.run_id == run_id))
    if change.columns:
        conn.execute(c.insert(), [{"run_id": run_id, "column_name": col.column_name, "generator": col.generator,
                                   "strategy": col.strategy, "position": col.position} for col in change.columns])
    conn.execute(f.delete().where(f.c.run_id == run_id))
    if change.fingerprints:
        conn.execute(f.insert(), [{"run_id": run_id, "kind": k, "name": n, "digest": dg}
                                  for k, n, dg in change.fingerprints])
    rows = []
    for kind, name, old, new, detail in change.changes:
        if kind == "column" and name in result.compute:
            detail = (f"{detail}; {result.discarded.get(name, 0):,} recorded cells discarded, "
                      f"{result.compute[name]:,} to compute")
        rows.append({"run_id": run_id, "changed_at": now, "kind": kind, "name": name, "old_digest": old,
                     "new_digest": new, "detail": detail})
    if rows:
        conn.execute(schema.run_changes.insert(), rows)


def copy_cells(conn: Connection, source: str, target: str, generators: Mapping[str, tuple[str, tuple[str, ...]]],
               read_file: ReadFile) -> dict[str, int]:
    """`run --reuse`: copy into run ``target`` (just created, nothing computed) the recorded
    values of ``generators`` (``{generator: (task_type, outputs)}``, those whose fingerprint is
    the same in both runs) from run ``source``, which is only read. Cells go by record index
    (the global one) for the records both runs have; batch and from_scratch tasks only row group
    by row group when both runs cut row groups alike and the source's row group has the same
    records and none dropped. Row groups that receive values become ``active`` (created if need
    be). Returns ``{generator: records copied}``."""
    runs, g, t, d = schema.runs, schema.row_groups, schema.tasks, schema.dropped_records
    src = conn.execute(sa.select(runs.c.num_records, runs.c.row_group_size).where(runs.c.run_id == source)).first()
    dst = conn.execute(sa.select(runs.c.num_records, runs.c.row_group_size).where(runs.c.run_id == target)
                       .with_for_update()).first()
    if src is None or dst is None:
        raise RunNotFoundError(f"no run with id {source if src is None else target!r}; `pipeline runs` lists them")
    (_, src_size), (dst_num, dst_size) = src, dst
    same_cut = src_size == dst_size
    copied: dict[str, int] = {}
    touched: set[int] = set()
    pending: list[dict] = []
    now = time.time()
    names = sorted(generators)
    if not names:
        return copied

    def emit(rg: int, gen: str, r: int | None, text: str, records: int) -> None:
        touched.add(rg)
        copied[gen] = copied.get(gen, 0) + records
        pending.append({"run_id": target, "row_group": rg, "column_name": gen, "slot": -1 if r is None else r,
                        "row_index": r, "task_type": generators[gen][0], "state": _DONE, "attempts": 0,
                        "value": text, "updated_at": now})
        if len(pending) >= _CHUNK_ROWS:
            conn.execute(t.insert(), pending)
            pending.clear()

    groups = conn.execute(sa.select(g.c.row_group, g.c.num_rows, g.c.state, g.c.path)
                          .where(g.c.run_id == source, g.c.state != RowGroupState.PENDING).order_by(g.c.row_group)).all()
    for rg, num_rows, state, path in groups:
        base = rg * src_size
        if base >= dst_num:
            break
        dropped = set(conn.execute(sa.select(d.c.row_index).where(d.c.run_id == source, d.c.row_group == rg))
                      .scalars())
        have: set[tuple[str, int | None]] = set()
        rows = conn.execute(
            sa.select(t.c.column_name, t.c.row_index, t.c.state, t.c.value)
            .where(t.c.run_id == source, t.c.row_group == rg, t.c.state.in_((_DONE, _FAILED)))).all()
        for gen, r, state_, _ in rows:  # every failure drops its record (a batch one all of them)
            if state_ == _FAILED:
                dropped.update(range(num_rows) if r is None else (r,))
        for gen, r, state_, text in rows:
            if state_ != _DONE or gen not in generators:
                continue
            have.add((gen, r))
            if r is not None:
                i = base + r
                if i < dst_num:
                    emit(i // dst_size, gen, i % dst_size, text, 1)
            elif same_cut and not dropped and _batch_fits(rg, num_rows, dst_num, dst_size):
                emit(rg, gen, None, text, num_rows)
        if state != RowGroupState.CHECKPOINTED:
            continue
        file_rows = [r for r in range(num_rows) if r not in dropped]
        columns = None
        for gen in names:
            task_type, outputs = generators[gen]
            if task_type == TaskType.CELL:
                todo = [(k, r) for k, r in enumerate(file_rows) if (gen, r) not in have and base + r < dst_num]
                if not todo:
                    continue
                columns = columns if columns is not None else read_file(path or "")
                for k, r in todo:
                    value = (columns[outputs[0]][k] if len(outputs) == 1 else {c: columns[c][k] for c in outputs})
                    i = base + r
                    emit(i // dst_size, gen, i % dst_size, values.encode(value), 1)
            elif (gen, None) not in have and same_cut and not dropped and _batch_fits(rg, num_rows, dst_num,
                                                                                   dst_size):
                columns = columns if columns is not None else read_file(path or "")
                emit(rg, gen, None, values.encode({c: list(columns[c]) for c in outputs}), num_rows)
    if pending:
        conn.execute(t.insert(), pending)
    if touched:
        last = conn.execute(sa.select(sa.func.max(g.c.row_group)).where(g.c.run_id == target)).scalar()
        last = -1 if last is None else last
        if max(touched) > last:  # row groups are created in order: create up to the last one touched
            conn.execute(g.insert(), [
                {"run_id": target, "row_group": rg, "num_rows": min(dst_size, dst_num - rg * dst_size),
                 "state": RowGroupState.PENDING, "rows_dropped": 0, "lease_epoch": 0}
                for rg in range(last + 1, max(touched) + 1)])
        conn.execute(g.update().where(g.c.run_id == target, g.c.row_group.in_(sorted(touched)))
                     .values(state=RowGroupState.ACTIVE))
    return copied


def _batch_fits(rg: int, num_rows: int, dst_num: int, size: int) -> bool:
    return min(size, dst_num - rg * size) == num_rows
