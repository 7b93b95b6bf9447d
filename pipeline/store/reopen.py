"""What `pipeline retry` changes in one row group: the planning every store shares (pure Python).

A store reads what it holds of a row group into a :class:`GroupState`, calls
:func:`plan_group`, and applies the :class:`GroupChange` in the same transaction
(:meth:`pipeline.store.base.Store.reopen_failed`).

The rules, and why:

- A failed task is reopened when it matches the filter and brings back at least one record: a
  cell task its record, a batch/from_scratch task its row group, minus the records that another
  failed task, not reopened, keeps dropped (such a task stays ``failed``, so that it is still
  reported and a later retry of the other one brings its record back with it).
- A record is dropped by exactly one failure (the engine ignores later failures of a dropped
  record): a cell failure at that record, else the row group's batch failure. The dropping task
  started only once its upstream tasks were done, so every batch/from_scratch task upstream of
  it was computed with the record. Any other done batch/from_scratch task (downstream of the
  failure, or beside it) was computed with the record only if it holds a value for it; one with
  ``None`` in every output there may have run without it, and is computed again. So are all
  tasks downstream of such a task (cells too: a batch function may read the whole row group),
  in that row group only. Root samplers, which run first, keep their values.
- A checkpointed row group holds no rows for its live records (they are in its Parquet file):
  their cells come back as ``done`` rows with the file's exact values
  (:func:`pipeline.dataset.read_row_group`); the ``done`` rows kept at compaction (cells of
  dropped records, batch tasks) stay. A store compacted before retry existed kept neither those
  rows nor its ``dropped_records``: the dropped records are then the failed tasks' records, and
  with no recorded batch values (the file lacks the records coming back) every batch/from_scratch
  task of the row group, and all that reads them, is computed again (samplers give the same
  values). Correct either way; only the amount of work differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

from pipeline.errors import StoreError
from pipeline.states import RowGroupState, TaskType
from pipeline.store.base import Lineage

__all__ = ["GroupChange", "GroupState", "plan_group", "task_filter"]

TaskKey = tuple[str, "int | None"]  # (generator, row_index); row_index None: batch/from_scratch


@dataclass
class GroupState:
    """What the store holds of one row group."""

    row_group: int
    num_rows: int
    state: str
    path: str | None
    failed: dict[TaskKey, str | None]  # failed task -> its last_error
    dropped: set[int]  # rows in dropped_records
    done: set[TaskKey]  # tasks with a done row
    batch_values: dict[str, Any]  # generator -> value of its done batch/from_scratch task


@dataclass
class GroupChange:
    """What to write for one row group."""

    row_group: int
    reopen: list[TaskKey]  # failed rows to delete
    revived: set[int]  # records back in the run
    dropped: set[int]  # the row group's dropped records afterwards
    reset: list[TaskKey]  # done rows to delete (computed again)
    insert: dict[TaskKey, tuple[str, Any]] = field(default_factory=dict)  # done rows to add: (task_type, value)


def task_filter(generators: Collection[str] | None, error: str | None) -> Callable[[str, str | None], bool]:
    """``selected(generator, last_error)``: the retry's filter (``error``: a substring, case
    sensitive, the same on every database)."""
    wanted = None if generators is None else set(generators)

    def selected(generator: str, last_error: str | None) -> bool:
        return ((wanted is None or generator in wanted)
                and (error is None or (last_error is not None and error in last_error)))

    return selected


def plan_group(group: GroupState, lineage: Lineage, selected: Callable[[str, str | None], bool],
               read_file: Callable[[str], Mapping[str, list]]) -> GroupChange | None:
    """The change of one row group, or None when none of its failed tasks is reopened.
    ``selected(generator, last_error)`` is the retry's filter. StoreError when the row group's
    file does not hold the records the store says it does."""
    n = group.num_rows

    def cover(keys) -> set[int]:
        rows: set[int] = set()
        for _, r in keys:
            if r is None:
                return set(range(n))
            rows.add(r)
        return rows

    chosen = [k for k, err in group.failed.items() if selected(k[0], err)]
    if not chosen:
        return None
    chosen_set = set(chosen)
    held = cover(k for k in group.failed if k not in chosen_set)
    reopen = [k for k in chosen if not cover([k]) <= held]
    if not reopen:
        return None
    revived = cover(reopen) - held
    dropped_before = group.dropped | cover(group.failed)
    change = GroupChange(group.row_group, reopen, revived, dropped_before - revived, [])

    file_columns: Mapping[str, list] = {}
    live = [r for r in range(n) if r not in dropped_before]
    if group.state == RowGroupState.CHECKPOINTED:
        file_columns = read_file(group.path or "")
        for c in (c for outputs in lineage.outputs.values() for c in outputs):
            if len(file_columns.get(c, ())) != len(live):
                raise StoreError(
                    f"row group {group.row_group}'s file {group.path} holds {len(file_columns.get(c, ()))} "
                    f"values of column '{c}', but {len(live)} records of the row group are not dropped; "
                    f"it cannot be reopened")

    # Batch/from_scratch tasks computed without a record now back, and what reads them. One with
    # no recorded value has not run, or was compacted by an older version (its file lacks the
    # records coming back): computed again too.
    cell_failure = {r: gen for gen, r in reopen if r is not None}
    batch_failure = next((gen for gen, r in reopen if r is None), None)
    stale = set()
    for gen, task_type in lineage.task_types.items():
        if task_type == TaskType.CELL:
            continue
        value = group.batch_values.get(gen)
        for r in revived:
            if value is None:
                break
            if gen in lineage.upstream.get(cell_failure.get(r, batch_failure), ()):
                continue  # the failed task started after it was done: it saw the record
            if any(_at(value, c, r) is not None for c in lineage.outputs[gen]):
                continue  # it holds a value for the record: it saw it
            break
        else:
            continue
        stale.add(gen)
    reset = set(stale)
    for gen in stale:
        reset |= lineage.downstream.get(gen, frozenset())
    change.reset = sorted((k for k in group.done if k[0] in reset), key=_order)

    if group.state == RowGroupState.CHECKPOINTED:
        for gen, outputs in lineage.outputs.items():
            if gen in reset:
                continue
            task_type = lineage.task_types[gen]
            if task_type != TaskType.CELL:
                continue  # its done row was kept at compaction (else it is in `reset`)
            for i, r in enumerate(live):
                if (gen, r) in group.done:
                    continue
                value = (file_columns[outputs[0]][i] if len(outputs) == 1
                         else {c: file_columns[c][i] for c in outputs})
                change.insert[(gen, r)] = (task_type, value)
    return change


def _at(value: Any, column: str, r: int) -> Any:
    try:
        return value[column][r]
    except (KeyError, IndexError, TypeError):
        return None


def _order(key: TaskKey) -> tuple:
    return key[0], -1 if key[1] is None else key[1]
