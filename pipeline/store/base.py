"""The Store protocol: everything the engine and the API ask of the state store, in domain words.

The engine never sees SQL. It appends *events* (:mod:`pipeline.store.events`: named tuples,
cheap to build on the hot path) to its journal, and the journal hands them to
:meth:`Store.record` in batches, in order, one transaction per batch (group commit). What the
database holds is therefore always a consistent prefix of what happened. Both stores apply
:func:`pipeline.store.events.coalesce` of a batch, which says what the batch means.

Task identity is ``(generator, row_group, row_index)``: ``generator`` is the name of the config
entry that produces the values (for a single-output column, the column's own name); it is what
the ``tasks.column_name`` column holds. ``row_index`` counts from 0 within the row group and is
``None`` for ``from_scratch`` and ``batch`` tasks.

A task event's model usage (:class:`~pipeline.store.events.Usage`) is recorded with its
transition, in the same transaction: ``finish_reason`` (None keeps the one recorded) in
``tasks.finish_reason``; ``truncated`` added to the generator's count in
``model_usage.truncated``, which compaction keeps; ``cost`` added to ``model_usage.cost``;
``pacing`` the model's pacing snapshot, the batch's last kept.

A DONE's ``value`` is the JSON text of what the generator produced, made canonical and encoded
once, on the event loop, when the task finished. A store records the text as it is and gives
``values.decode(text)`` back in :class:`LoadedRowGroup`, so types survive a resume exactly.
Times are Unix seconds (``time.time()``).

Leases: a store instance belongs to one process and has one ``owner`` id. ``claim_row_groups``
takes row groups with a fresh epoch; ``record`` and ``checkpoint_row_group`` check, in their own
transaction, that this owner and epoch still hold each row group they touch. Events of a row
group whose lease was lost are discarded, and the row group is reported back so that the engine
abandons it.

Retry (:meth:`Store.reopen_failed`): checkpoint compaction keeps, in a row group with dropped
records, the ``done`` rows of those records and of its batch/from_scratch tasks, and its
``dropped_records``; reopening puts the row group back to ``active`` with ``done`` rows for the
records its Parquet file holds, so that resume rebuilds it like any other live row group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Mapping, Protocol, Sequence

# The kinds of TaskEvent, re-exported for the code that imported them from here.
from pipeline.store.events import DEFERRED, DONE, FAILED, STARTED
from pipeline.states import RowGroupState, RunStatus, TaskState, TaskType

__all__ = [
    "DEFERRED",
    "DONE",
    "FAILED",
    "STARTED",
    "ColumnSpec",
    "Lineage",
    "LoadedRowGroup",
    "NewRun",
    "Reopened",
    "RowGroupClaim",
    "RunInfo",
    "Store",
    "TASK_STATES",
    "RUN_STATES",
    "ROW_GROUP_STATES",
    "ROW_GROUP_BATCH",
    "row_group_counts",
]

# The values as tuples, in this order, for the code that imported them (pipeline.states).
TASK_STATES = tuple(TaskState)
RUN_STATES = tuple(RunStatus)
ROW_GROUP_STATES = tuple(RowGroupState)
TASK_TYPES = tuple(TaskType)

#: Row-group rows are created this many at a time (a store's ``row_group_batch``): the first ones
#: with the run, the next ones by the claim that finds no free row group among those created.
#: So creating a run costs the same whatever num_records (10**12 records are 10**9 row groups,
#: which nobody should insert up front), and a run of up to this many row groups has every row
#: from the start. A row group with no row yet is ``pending``.
ROW_GROUP_BATCH = 1000


def row_group_counts(num_records: int, row_group_size: int, per_state: Iterable[tuple]) -> dict[str, int]:
    """:meth:`Store.row_group_counts` from ``(state, row groups, records kept, records dropped)``
    per state of the rows created; the row groups not created yet count as ``pending``."""
    counts = {state: 0 for state in ROW_GROUP_STATES}
    counts.update(total=-(-num_records // row_group_size), records_written=0, records_dropped=0)
    for state, n, kept, dropped in per_state:
        counts[state] += int(n)
        counts["records_dropped"] += int(dropped or 0)
        if state == RowGroupState.CHECKPOINTED:
            counts["records_written"] += int(kept or 0)
    counts[RowGroupState.PENDING] += counts["total"] - sum(counts[state] for state in ROW_GROUP_STATES)
    return counts


@dataclass(frozen=True)
class ColumnSpec:
    """One output column of a run, in config order, and the generator that produces it."""

    column_name: str
    generator: str
    strategy: str  # "cell" | "batch"
    position: int


@dataclass(frozen=True)
class NewRun:
    run_id: str
    name: str
    num_records: int
    row_group_size: int
    seed: int
    config: str  # the config as JSON text, so that resume needs no file
    fingerprint: str
    columns: Sequence[ColumnSpec]
    #: ``(kind, name, digest)`` rows of ``run_fingerprints`` (pipeline.fingerprints).
    fingerprints: Sequence[tuple[str, str, str]] = ()


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    name: str
    status: str
    num_records: int
    row_group_size: int
    seed: int
    config: str
    fingerprint: str
    created_at: float
    updated_at: float
    finished_at: float | None


@dataclass(frozen=True)
class RowGroupClaim:
    row_group: int
    num_rows: int
    epoch: int
    state: str  # the state before the claim: pending, active or complete


@dataclass
class LoadedRowGroup:
    """What the store holds of one row group, to rebuild the engine's state on resume."""

    row_group: int
    num_rows: int
    #: (generator, row_index) -> value, as recorded with DONE.
    done: dict[tuple[str, int | None], Any] = field(default_factory=dict)
    #: row indexes (within the row group) of dropped records.
    dropped: set[int] = field(default_factory=set)
    #: (generator, row_index) -> (attempts, next_eligible_at, last_error).
    deferred: dict[tuple[str, int | None], tuple[int, float, str]] = field(default_factory=dict)
    #: (generator, row_index) -> attempts of tasks left in flight or failed before (for counts).
    attempts: dict[tuple[str, int | None], int] = field(default_factory=dict)


@dataclass(frozen=True)
class Lineage:
    """The run's DAG as :meth:`Store.reopen_failed` needs it (the API builds it from the run's
    stored config with :mod:`pipeline.graph`), by generator name."""

    outputs: Mapping[str, tuple[str, ...]]  # output columns, in config order
    task_types: Mapping[str, str]  # "cell", "batch" or "from_scratch"
    upstream: Mapping[str, frozenset[str]]  # generators it reads, directly or not
    downstream: Mapping[str, frozenset[str]]  # generators that read it, directly or not


@dataclass
class Reopened:
    """What :meth:`Store.reopen_failed` reopened."""

    tasks: dict[str, int] = field(default_factory=dict)  # generator -> failed tasks reopened
    records: int = 0  # dropped records back in the run
    row_groups: list[int] = field(default_factory=list)  # row groups that became active again
    reset: int = 0  # done tasks to compute again (computed without the records now back)
    #: matching failed tasks left as they are: their records stay dropped by other failures that
    #: the filter did not select (set by pipeline.api.retry)
    left: int = 0

    def add(self, change: Any) -> None:
        """Count one row group's :class:`pipeline.store.reopen.GroupChange`."""
        for gen, _ in change.reopen:
            self.tasks[gen] = self.tasks.get(gen, 0) + 1
        self.records += len(change.revived)
        self.reset += len(change.reset)
        self.row_groups.append(change.row_group)


class Store(Protocol):
    """The state store. Implementations: :class:`pipeline.store.memory.MemoryStore`,
    :class:`pipeline.store.sql.SqlStore` (SQLite and PostgreSQL)."""

    #: This process's owner id (host, pid, process start time, random token).
    owner: str

    # -- runs ---------------------------------------------------------------------------
    def create_run(self, run: NewRun) -> None:
        """Create the run, its columns and its first row groups (state ``pending``; at most
        ``row_group_batch`` of them, see :data:`ROW_GROUP_BATCH`). Raises RunExistsError if the
        id is taken."""

    def get_run(self, run_id: str) -> RunInfo:
        """Raises RunNotFoundError."""

    def list_runs(self) -> list[RunInfo]:
        """Newest first."""

    def set_run_status(self, run_id: str, status: str) -> None:
        """Sets status and updated_at; ``complete`` also sets finished_at."""

    def record_counts(self) -> dict[str, tuple[int, int]]:
        """``{run_id: (records written, records dropped)}`` of every run that has row groups,
        counted as :meth:`row_group_counts` does (`pipeline runs`)."""

    def delete_run(self, run_id: str) -> dict[str, int]:
        """Delete every row of the run in one transaction (`pipeline rm`); ``{table: rows
        deleted}``. RunInUseError while a worker of the run is live or a lease of it is held
        by a process not known to be gone; RunNotFoundError for an unknown id."""

    def run_fingerprints(self, run_id: str) -> dict[tuple[str, str], str]:
        """``{(kind, name): digest}`` recorded for the run (empty for runs made before them)."""

    def replace_fingerprints(self, run_id: str, fingerprints: Sequence[tuple[str, str, str]],
                             changes: Sequence[tuple[str, str, str | None, str | None, str]]) -> None:
        """In one transaction: the run's fingerprints become ``(kind, name, digest)`` rows, and
        each ``(kind, name, old_digest, new_digest, detail)`` of ``changes`` is added to
        ``run_changes`` (at the current time)."""

    # -- workers and leases ---------------------------------------------------------------
    def register_worker(self, run_id: str) -> bool:
        """Record that this owner works on the run now (for `status`: running vs interrupted).
        True when no other live worker holds the run: this process begins it, or a resume of it.
        Registrations are serialised: of processes registering at once, one alone gets True."""

    def unregister_worker(self, run_id: str) -> None: ...

    def live_workers(self, run_id: str) -> int:
        """Workers of the run whose process is alive (same host) or whose heartbeat is fresh."""

    def leases(self, run_id: str) -> dict[str, list[int]]:
        """``{worker (lease owner): [row group, ...]}``: the unexpired leases on row groups not
        yet checkpointed, row groups in order (what the live panel shows per worker)."""

    def claim_row_groups(self, run_id: str, limit: int, lease_s: float) -> list[RowGroupClaim]:
        """Claim up to ``limit`` row groups in row-group order whose state is not
        ``checkpointed`` and whose lease is free: no owner, expired, or owned by a process of
        this host that is gone. Each claim bumps the epoch, sets owner and expiry, and moves
        ``pending`` to ``active``. When the row groups created are not enough, the next ones
        are created (in the same transaction) and claimed."""

    def renew_leases(self, run_id: str, lease_s: float) -> set[int]:
        """Extend this owner's leases (and worker heartbeat); return the row groups lost."""

    def release_row_groups(self, run_id: str, row_groups: Sequence[int]) -> None:
        """Give leases back (clean stop) so another worker can take them at once."""

    def load_row_group(self, run_id: str, row_group: int) -> LoadedRowGroup: ...

    # -- the journal ----------------------------------------------------------------------
    def record(self, run_id: str, events: Sequence[tuple]) -> set[int]:
        """Apply a batch of events (:mod:`pipeline.store.events`) in one transaction, as
        :func:`~pipeline.store.events.coalesce` reads them; return the row groups whose lease
        this owner lost (their events were discarded). ValueError for an unknown event."""

    def lease_epoch(self, run_id: str, row_group: int) -> int | None:
        """The epoch of this owner's claim on the row group, None if it holds none (or learned
        that it lost it). No I/O: the fence itself is in ``record`` and ``checkpoint_row_group``."""

    def checkpoint_row_group(self, run_id: str, row_group: int, path: str, rows_dropped: int, *,
                             file_bytes: int | None = None, file_sha256: str | None = None) -> bool:
        """After the row group's Parquet file is durable at ``path`` (relative to home; its name
        carries the lease epoch): mark it ``checkpointed``, store ``path``, its size in bytes and
        SHA-256 digest (hex) and ``rows_dropped``, release its lease and compact its task rows,
        in one transaction that checks this owner still holds the lease with its epoch. The file
        becomes the row group's only through this. False if the lease was lost; True also when
        this very ``path`` is current already (a retry after a commit whose answer was lost), so
        that the caller never removes the current file. Compaction deletes every task row but
        ``failed`` ones; in a row group with dropped records it also keeps the ``done`` rows of
        those records and of batch/from_scratch tasks, and the ``dropped_records`` (what
        :meth:`reopen_failed` needs to bring them back)."""

    def reopen_failed(self, run_id: str, lineage: Lineage, *, generators: Collection[str] | None = None,
                      error: str | None = None, read_file: Callable[[str], Mapping[str, list]]) -> Reopened:
        """`pipeline retry`, in one transaction: delete the ``failed`` tasks of the run (of
        ``generators`` only, and/or whose ``last_error`` contains ``error``) so that they are
        ready again with 0 attempts, and bring back the records they dropped. In each row group
        touched (see :func:`pipeline.store.reopen.plan_group`): its dropped records and
        ``rows_dropped`` are recounted; ``done`` batch/from_scratch tasks that were computed
        without a record now back, and every task downstream of them, are deleted (computed
        again); a checkpointed row group gets ``done`` rows for the records of its Parquet
        file (``read_file(path)`` -> ``{column: [value per record in the file]}``); it becomes
        ``active`` with no lease and a new epoch (a worker holding it is fenced off). The run's
        status becomes ``running``. Nothing matching: nothing changes. A failed task whose
        record stays dropped by another failure that is not reopened is left as it is."""

    def reopen_row_groups(self, run_id: str, row_groups: Sequence[int]) -> list[int]:
        """For ``pipeline resume --repair``: put checkpointed row groups whose file is lost or
        damaged back to ``pending`` (path, size and digest cleared, ``rows_dropped`` 0) and
        delete their task rows and dropped records, in one transaction, so that they are
        computed again. Returns the row groups reopened (those that were checkpointed)."""

    def apply_config_change(self, run_id: str, change: Any, *, read_file: Callable[[str], Mapping[str, list]],
                            dry_run: bool = False) -> Any:
        """`pipeline resume --config`: apply a :class:`pipeline.store.change_plan.ConfigChange`
        in one transaction (see :mod:`pipeline.store.change_plan`): the run's config, columns,
        fingerprints and ``num_records``; in every row group the tasks of generators computed
        again deleted, the records their failures dropped back, checkpointed row groups that are
        touched reopened with ``done`` rows from their file; row groups past the new end gone;
        one ``run_changes`` row per entry of ``change.changes``. Returns the
        :class:`~pipeline.store.change_plan.ChangeResult` (cells kept and to compute per
        generator). RunInUseError, changing nothing, while live workers hold the run.
        ``dry_run``: the same counts, nothing written, no worker check."""

    def copy_cells(self, source: str, target: str, generators: Mapping[str, tuple[str, tuple[str, ...]]], *,
                   read_file: Callable[[str], Mapping[str, list]]) -> dict[str, int]:
        """`pipeline run --reuse`: copy run ``source``'s recorded values of ``generators``
        (``{generator: (task_type, outputs)}``) into the new run ``target``, in one transaction
        (:func:`pipeline.store.change_sql.copy_cells`); ``{generator: records copied}``."""

    def run_changes(self, run_id: str) -> list[dict]:
        """``{"changed_at", "kind", "name", "old_digest", "new_digest", "detail"}`` per row of
        ``run_changes``, oldest first."""

    # -- reading --------------------------------------------------------------------------
    def row_groups(self, run_id: str) -> list[dict]:
        """``{"row_group", "num_rows", "state", "rows_dropped", "path", "lease_owner",
        "lease_epoch", "lease_expires_at", "file_bytes", "file_sha256"}`` per row group created
        so far, in order (those not created yet are pending and have no row: count with
        :meth:`row_group_counts`)."""

    def row_group_counts(self, run_id: str) -> dict[str, int]:
        """``{"total", "pending", "active", "complete", "checkpointed", "records_written",
        "records_dropped"}``: row groups per state, those not created yet counted as pending;
        records in checkpointed row groups less their dropped ones; dropped records. Raises
        RunNotFoundError."""

    def column_counts(self, run_id: str) -> dict[str, dict[str, int]]:
        """``{column: {"done", "failed", "deferred", "in_flight", "truncated"}}`` counted in
        records, in config order (what the ``column_progress`` view shows); ``truncated``: the
        kept text answers cut by ``finish_reason == "length"`` (``model_usage.truncated`` of the
        column's generator, 0 for a column that calls no model)."""

    def model_usage(self, run_id: str) -> dict[str, dict[str, int]]:
        """``{model alias: {"requests", "prompt_tokens", "completion_tokens", "rate_limited",
        "concurrency", "calls_saved", "cost", "requests_per_minute", "tokens_per_minute",
        "max_requests_per_minute", "max_tokens_per_minute", "paced", "rate_limit_headers"}}``
        summed over the run's generators; ``cost`` is None without prices, the pacing facts are
        the latest its process recorded (None before any)."""

    def generator_states(self, run_id: str) -> dict[str, tuple[int, Any]]:
        """``{generator: (row group, state)}``: the state each stateful generator recorded
        after the latest row group it finished (``STATE`` events)."""

    def failed_tasks(self, run_id: str) -> list[tuple[str, str | None]]:
        """``(generator, last_error)`` of every ``failed`` task of the run (kept after
        compaction), for the failure summary (``pipeline.engine.failures``)."""

    def add_traces(self, run_id: str, rows: Sequence[Any]) -> None:
        """Record task attempts of a traced run (:class:`pipeline.store.traces.TraceRow`)."""

    def traces(self, run_id: str) -> list[dict]:
        """Every recorded task attempt of the run, in dispatch order (see ``task_traces``)."""

    def add_calls_saved(self, run_id: str, saved: dict[tuple[str, str], int]) -> None:
        """On resume: finished model calls, per (model alias, generator), not made again
        (added once per resume, by the process that began it: :class:`pipeline.api.jobs.Job`)."""

    def close(self) -> None: ...
