"""The Store protocol: everything the engine and the API ask of the state store, in domain words.

The engine never sees SQL. It appends *events* (plain tuples, cheap to build on the hot path) to
its journal, and the journal hands them to :meth:`Store.record` in batches, in order, one
transaction per batch (group commit). What the database holds is therefore always a consistent
prefix of what happened.

Task identity is ``(generator, row_group, row_index)``: ``generator`` is the name of the config
entry that produces the values (for a single-output column, the column's own name); it is what
the ``tasks.column_name`` column holds. ``row_index`` counts from 0 within the row group and is
``None`` for ``from_scratch`` and ``batch`` tasks.

Events (``kind`` first)::

    (STARTED,  rg, generator, row_index, task_type)        task is in flight (sent only for
                                                           tasks still running at a commit)
    (DONE,     rg, generator, row_index, task_type, text)  task done; the JSON text of its
                                                           value is recorded with it
    (DEFERRED, rg, generator, row_index, task_type, (attempts, next_eligible_at, error))
    (FAILED,   rg, generator, row_index, task_type, (attempts, error))
    (DROPPED,  rg, None, row_index)                        record dropped (row_index None: all)
    (COMPLETE, rg)                                         every task of the row group is terminal

DONE, DEFERRED and FAILED events of a task that called a model carry one more field, its usage
in that attempt: ``(model, requests, prompt_tokens, completion_tokens, rate_limited,
concurrency)``; it is recorded with the transition, in the same transaction.

``text`` is the JSON text (:func:`pipeline.values.prepare`) of what the generator produced,
made canonical and encoded once, on the event loop, when the task finished: for a cell task of
a single-output generator the cell value; of a multi-output generator a dict ``{column:
value}``; for a batch or from_scratch task a dict ``{column: [value per row of the row
group]}`` with ``null`` at dropped rows. A store records the text as it is and gives
``values.decode(text)`` back in :class:`LoadedRowGroup`, so types survive a resume exactly.
Times are Unix seconds (``time.time()``).

Leases: a store instance belongs to one process and has one ``owner`` id. ``claim_row_groups``
takes row groups with a fresh epoch; ``record`` and ``checkpoint_row_group`` check, in their own
transaction, that this owner and epoch still hold each row group they touch. Events of a row
group whose lease was lost are discarded, and the row group is reported back so that the engine
abandons it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

__all__ = [
    "COMPLETE",
    "DEFERRED",
    "DONE",
    "DROPPED",
    "FAILED",
    "STARTED",
    "ColumnSpec",
    "LoadedRowGroup",
    "NewRun",
    "RowGroupClaim",
    "RunInfo",
    "Store",
    "TASK_STATES",
    "RUN_STATES",
    "ROW_GROUP_STATES",
]

STARTED = 0
DONE = 1
DEFERRED = 2
FAILED = 3
DROPPED = 4
COMPLETE = 5

TASK_STATES = ("frontier", "in_flight", "deferred", "done", "failed")
RUN_STATES = ("running", "interrupted", "complete", "failed")
ROW_GROUP_STATES = ("pending", "active", "complete", "checkpointed")
TASK_TYPES = ("from_scratch", "cell", "batch")


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


class Store(Protocol):
    """The state store. Implementations: :class:`pipeline.store.memory.MemoryStore`,
    :class:`pipeline.store.sql.SqlStore` (SQLite and PostgreSQL)."""

    #: This process's owner id (host, pid, process start time, random token).
    owner: str

    # -- runs ---------------------------------------------------------------------------
    def create_run(self, run: NewRun) -> None:
        """Create the run, its columns and all its row groups (state ``pending``).
        Raises RunExistsError if the id is taken."""

    def get_run(self, run_id: str) -> RunInfo:
        """Raises RunNotFoundError."""

    def list_runs(self) -> list[RunInfo]:
        """Newest first."""

    def set_run_status(self, run_id: str, status: str) -> None:
        """Sets status and updated_at; ``complete`` also sets finished_at."""

    # -- workers and leases ---------------------------------------------------------------
    def register_worker(self, run_id: str) -> None:
        """Record that this owner works on the run now (for `status`: running vs interrupted)."""

    def unregister_worker(self, run_id: str) -> None: ...

    def live_workers(self, run_id: str) -> int:
        """Workers of the run whose process is alive (same host) or whose heartbeat is fresh."""

    def claim_row_groups(self, run_id: str, limit: int, lease_s: float) -> list[RowGroupClaim]:
        """Claim up to ``limit`` row groups in row-group order whose state is not
        ``checkpointed`` and whose lease is free: no owner, expired, or owned by a process of
        this host that is gone. Each claim bumps the epoch, sets owner and expiry, and moves
        ``pending`` to ``active``."""

    def renew_leases(self, run_id: str, lease_s: float) -> set[int]:
        """Extend this owner's leases (and worker heartbeat); return the row groups lost."""

    def release_row_groups(self, run_id: str, row_groups: Sequence[int]) -> None:
        """Give leases back (clean stop) so another worker can take them at once."""

    def load_row_group(self, run_id: str, row_group: int) -> LoadedRowGroup: ...

    # -- the journal ----------------------------------------------------------------------
    def record(self, run_id: str, events: Sequence[tuple]) -> set[int]:
        """Apply a batch of events in one transaction, in order; return the row groups whose
        lease this owner lost (their events were discarded)."""

    def checkpoint_row_group(self, run_id: str, row_group: int, path: str, rows_dropped: int) -> bool:
        """After the row group's Parquet file is durable at ``path`` (relative to home): mark
        it ``checkpointed``, store ``path`` and ``rows_dropped``, release its lease and compact
        its task rows (all but ``failed`` ones), in one transaction. False if the lease was lost."""

    # -- reading --------------------------------------------------------------------------
    def row_groups(self, run_id: str) -> list[dict]:
        """``{"row_group", "num_rows", "state", "rows_dropped", "path", "lease_owner"}`` per row
        group, in order."""

    def column_counts(self, run_id: str) -> dict[str, dict[str, int]]:
        """``{column: {"done", "failed", "deferred", "in_flight"}}`` counted in records, in
        config order (what the ``column_progress`` view shows)."""

    def model_usage(self, run_id: str) -> dict[str, dict[str, int]]:
        """``{model alias: {"requests", "prompt_tokens", "completion_tokens", "rate_limited",
        "concurrency", "calls_saved"}}`` summed over the run's generators."""

    def add_calls_saved(self, run_id: str, saved: dict[tuple[str, str], int]) -> None:
        """On resume: finished model calls, per (model alias, generator), not made again."""

    def close(self) -> None: ...
