"""What a changed config (`pipeline resume RUN_ID --config FILE`) changes in one row group: the
planning every store shares (pure Python), beside :mod:`pipeline.store.reopen` (retry), whose
:class:`~pipeline.store.reopen.GroupChange` it produces and whose writer applies it.

The API decides per generator (:mod:`pipeline.changes`): kept (same fingerprint), or computed
again (``recompute``: its definition changed, it reads such a column, or it is new), or removed.
Per row group, with ``n_new`` its number of records under the new ``num_records``:

- every task row of a recomputed or removed generator goes (``done`` values discarded);
- a ``failed`` task goes when its generator is recomputed or removed, when its record is past
  the row group's new end, or when it is a batch task of a resized row group: the records it
  dropped come back (unless another failure, which stays, holds them dropped);
- a resized row group (the last one, when ``num_records`` grew or shrank) computes its batch and
  from_scratch tasks again (they see the whole row group); the readers of those that are not
  ``per_record`` (samplers and seed datasets give each record the same value whatever the row
  group) are computed again too; cells past the new end go. A ``per_record`` generator's records
  count as kept there: it draws them again, and draws the same values;
- a kept batch task computed without a record now back is computed again with all that reads it
  (the rule of :func:`pipeline.store.reopen.plan_group`);
- a checkpointed row group that is touched gets ``done`` rows for the kept generators' values of
  the records its Parquet file holds, and becomes active like a retried one.

Counts are in records, as ``column_progress`` counts: ``keep`` = live records whose value is
kept, ``compute`` = live records whose value is to be computed; records dropped by a failure
that stays count in neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from pipeline.errors import StoreError
from pipeline.states import RowGroupState, TaskType
from pipeline.store.base import ColumnSpec, Lineage
from pipeline.store.reopen import GroupChange, _at, _order

__all__ = ["ChangeResult", "ConfigChange", "GroupFacts", "GroupEdit", "plan_edit"]

TaskKey = tuple[str, "int | None"]


@dataclass(frozen=True)
class ConfigChange:
    """A changed config as the store applies it (built by :func:`pipeline.changes.config_change`)."""

    num_records: int
    row_group_size: int
    config: str  # the new config as JSON text (runs.config)
    fingerprint: str  # the new config's fingerprint (runs.fingerprint)
    columns: Sequence[ColumnSpec]  # run_columns afterwards
    fingerprints: Sequence[tuple[str, str, str]]  # run_fingerprints afterwards
    lineage: Lineage  # the new config's DAG
    recompute: frozenset[str]  # generators of the new config whose every cell is computed again
    removed: frozenset[str]  # generators of the run that the new config no longer has
    per_record: frozenset[str]  # generators whose value depends on the record index only
    added: frozenset[str]  # generators of the new config that the run did not have (in recompute)
    #: run_changes rows ``(kind, name, old digest, new digest, detail)``; a ``column`` row's
    #: detail gets the cells discarded and to compute appended.
    changes: Sequence[tuple[str, str, str | None, str | None, str]] = ()


@dataclass
class ChangeResult:
    """What a change keeps and computes, per generator of the new config (in records)."""

    keep: dict[str, int] = field(default_factory=dict)
    compute: dict[str, int] = field(default_factory=dict)
    discarded: dict[str, int] = field(default_factory=dict)  # recorded values computed again
    row_groups: list[int] = field(default_factory=list)  # row groups reopened (active again)
    records_revived: int = 0  # dropped records back in the run
    row_groups_removed: int = 0  # past the new end
    removed_paths: list[str] = field(default_factory=list)  # their files (relative to home), now no one's

    def add(self, gen: str, keep: int, compute: int, discarded: int = 0) -> None:
        self.keep[gen] = self.keep.get(gen, 0) + keep
        self.compute[gen] = self.compute.get(gen, 0) + compute
        self.discarded[gen] = self.discarded.get(gen, 0) + discarded


@dataclass
class GroupFacts:
    """What the store holds of one row group."""

    row_group: int
    num_rows: int
    state: str
    path: str | None
    failed: dict[TaskKey, str | None] = field(default_factory=dict)
    dropped: set[int] = field(default_factory=set)
    done: set[TaskKey] = field(default_factory=set)
    other: set[TaskKey] = field(default_factory=set)  # frontier, in_flight, deferred
    batch_values: dict[str, Any] = field(default_factory=dict)


@dataclass
class GroupEdit:
    """One row group's change: ``change`` for the retry writer, then what to fill from its file."""

    change: GroupChange
    num_rows: int
    file_rows: list[int]  # row index of each record in the Parquet file (checkpointed only)
    fill_cells: dict[str, list[int]]  # kept cell generator -> rows to fill from the file
    fill_batch: list[str]  # kept batch generators to fill from the file


def _cover(keys, n: int) -> set[int]:
    rows: set[int] = set()
    for _, r in keys:
        if r is None:
            return set(range(n))
        rows.add(r)
    return rows


def plan_edit(g: GroupFacts, change: ConfigChange, n_new: int, result: ChangeResult) -> GroupEdit | None:
    """Plan one created row group (``n_new`` > 0 records afterwards); add its counts to
    ``result``. None when the row group is left as it is."""
    lin = change.lineage
    types = lin.task_types
    n_old = g.num_rows
    resized = n_new != n_old
    affected = change.recompute | change.removed
    if g.state == RowGroupState.PENDING:  # nothing recorded: every live record computes
        for gen in types:
            result.add(gen, 0, n_new)
        return None

    reopen = [k for k in g.failed
              if k[0] in affected or (k[1] is None and resized) or (k[1] is not None and k[1] >= n_new)]
    reopen_set = set(reopen)
    held = _cover((k for k in g.failed if k not in reopen_set), n_old)
    dropped_before = g.dropped | _cover(g.failed, n_old)
    revived = {r for r in _cover(reopen, n_old) if r < n_new} - held
    dropped_after = {r for r in dropped_before if r < n_new} - revived

    reset_gens = set(affected) | {gen for gen in {k[0] for k in g.done | g.other} if gen not in types}
    stale: set[str] = set()
    if resized:
        for gen, task_type in types.items():
            if task_type != TaskType.CELL:
                reset_gens.add(gen)
                if gen not in change.per_record:
                    stale.add(gen)
    if revived:  # kept batch tasks computed without a record now back (see reopen.plan_group)
        cell_failure = {r: gen for gen, r in reopen if r is not None}
        batch_failure = next((gen for gen, r in reopen if r is None), None)
        for gen, task_type in types.items():
            if task_type == TaskType.CELL or gen in reset_gens:
                continue
            value = g.batch_values.get(gen)
            for r in revived:
                if value is None:
                    break
                if gen in lin.upstream.get(cell_failure.get(r, batch_failure), ()):
                    continue
                if any(_at(value, c, r) is not None for c in lin.outputs[gen]):
                    continue
                break
            else:
                continue
            stale.add(gen)
    for gen in stale:
        reset_gens.add(gen)
        reset_gens |= lin.downstream.get(gen, frozenset())

    def goes(k: TaskKey) -> bool:
        return k[0] in reset_gens or (k[1] is not None and k[1] >= n_new)

    reset = sorted((k for k in g.done | g.other if goes(k)), key=_order)
    checkpointed = g.state == RowGroupState.CHECKPOINTED
    touched = bool(reopen or reset or resized or (g.state != RowGroupState.ACTIVE and change.recompute))
    live_after = [r for r in range(n_new) if r not in dropped_after]
    file_rows = [r for r in range(n_old) if r not in dropped_before] if checkpointed else []
    in_file = set(file_rows)

    def had(gen: str, r: int | None) -> bool:  # a value was recorded before the change
        if (gen, r) in g.done:
            return True
        return checkpointed and gen not in change.added and (r is None or r in in_file)

    fill_cells: dict[str, list[int]] = {}
    fill_batch: list[str] = []
    for gen, task_type in types.items():
        kept = gen not in reset_gens
        if task_type == TaskType.CELL:
            before = sum(1 for r in live_after if had(gen, r))
            if not kept:
                keep = 0
            elif checkpointed:
                fill = [r for r in file_rows if r < n_new and (gen, r) not in g.done]
                if touched and fill:
                    fill_cells[gen] = fill
                keep = before
            else:
                keep = sum(1 for r in live_after if (gen, r) in g.done)
        else:
            before = sum(1 for r in live_after if r < n_old) if had(gen, None) else 0
            keep = before if kept else 0
            if resized and gen in change.per_record and gen not in change.recompute:
                keep = before  # drawn again for the whole row group: the same values for its records
            if kept and checkpointed and touched and (gen, None) not in g.done:
                fill_batch.append(gen)
        result.add(gen, keep, len(live_after) - keep, before - keep)
    if not touched:
        return None
    result.records_revived += len(revived)
    result.row_groups.append(g.row_group)
    return GroupEdit(GroupChange(g.row_group, reopen, revived, dropped_after, reset), n_new, file_rows,
                     fill_cells, fill_batch)


def fill_values(edit: GroupEdit, lineage: Lineage, read_file: Callable[[str], Mapping[str, list]],
                path: str) -> None:
    """Put the kept generators' values of a checkpointed row group's file into ``edit.change.insert``
    (``(task_type, value)`` per task). StoreError when the file does not hold the records the
    store says it does."""
    if not edit.fill_cells and not edit.fill_batch:
        return
    columns = read_file(path)
    rows = edit.file_rows
    position = {r: i for i, r in enumerate(rows)}
    for gen in list(edit.fill_cells) + edit.fill_batch:
        for c in lineage.outputs[gen]:
            if len(columns.get(c, ())) != len(rows):
                raise StoreError(f"row group {edit.change.row_group}'s file {path} holds "
                                 f"{len(columns.get(c, ()))} values of column '{c}', but {len(rows)} records "
                                 f"of the row group are not dropped; it cannot be reopened")
    insert, cell = edit.change.insert, TaskType.CELL
    for gen, fill in edit.fill_cells.items():
        outputs = lineage.outputs[gen]
        for r in fill:
            i = position[r]
            insert[(gen, r)] = (cell, columns[outputs[0]][i] if len(outputs) == 1
                                else {c: columns[c][i] for c in outputs})
    for gen in edit.fill_batch:
        value = {}
        for c in lineage.outputs[gen]:
            full: list = [None] * edit.num_rows
            for r, v in zip(rows, columns[c]):
                full[r] = v
            value[c] = full
        insert[(gen, None)] = (lineage.task_types[gen], value)

