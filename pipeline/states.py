"""The named states of a run, a row group and a task, and the types of a task.

Each is a :class:`enum.StrEnum`: a member *is* its value as a ``str`` (``RunStatus.COMPLETE ==
"complete"``, ``f"{RunStatus.COMPLETE}"`` and ``json.dumps`` give ``complete``), so the database
and the JSON output hold exactly the plain strings, and rows read back compare equal to members.
``repr()`` is the plain string's too (``'complete'``), so that the repr of a result holding one
(``RunResult(status='complete')``) and ``{status!r}`` in a message read as they did before.

The hot path (the journal's task upserts, millions of rows) binds the plain ``str`` of
``member.value``, never the member: drivers adapt a ``str`` subclass through a slower path
(sqlite3's executemany takes about twice as long with them, measured).

A leaf module: it imports nothing of ``pipeline``, so that every layer may use it.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["RowGroupState", "RunStatus", "TaskState", "TaskType"]


class _Plain(StrEnum):
    """A StrEnum whose repr is its value's (``'complete'``, not ``<RunStatus.COMPLETE: ...>``)."""

    __repr__ = str.__repr__


class RunStatus(_Plain):
    """A run's status, stored in ``runs.status`` (a CHECK constraint allows exactly these).

    ``pipeline status`` shows a ``running`` run that has no live worker as ``interrupted``."""

    #: A worker works on it, or did until its process died without recording an end.
    RUNNING = "running"
    #: Stopped before its end (a signal, Ctrl-C): ``pipeline resume`` goes on.
    INTERRUPTED = "interrupted"
    #: Every row group is checkpointed; ``runs.finished_at`` is set.
    COMPLETE = "complete"
    #: Stopped by an error it cannot go past (error rate, a model down, a checkpoint that cannot
    #: be written); ``pipeline retry`` / ``resume`` may bring it back to ``running``.
    FAILED = "failed"


class RowGroupState(_Plain):
    """A row group's state, stored in ``row_groups.state`` (a CHECK constraint allows exactly
    these). A row group with no row yet (rows are created ``ROW_GROUP_BATCH`` at a time) is
    ``pending``."""

    #: Not claimed yet: nothing computed.
    PENDING = "pending"
    #: Claimed by a worker (or reopened by ``retry``/``resume --config``): tasks run.
    ACTIVE = "active"
    #: Every task is terminal (``done`` or ``failed``); its Parquet file is not durable yet.
    COMPLETE = "complete"
    #: Its Parquet file is durable at ``row_groups.path``; its task rows are compacted.
    CHECKPOINTED = "checkpointed"


class TaskState(_Plain):
    """A task's state, stored in ``tasks.state`` (no CHECK there: it would halve the upsert rate;
    see :mod:`pipeline.store.schema`). The ``value`` of a member is what the journal writes."""

    #: Ready, not started (the scheduler keeps it in memory; no row is written for it).
    FRONTIER = "frontier"
    #: Started, no result yet (a STARTED event).
    IN_FLIGHT = "in_flight"
    #: Failed with a retryable error; waits for ``tasks.next_eligible_at`` (a DEFERRED event).
    DEFERRED = "deferred"
    #: Its value is in ``tasks.value`` (a DONE event).
    DONE = "done"
    #: Failed for good: its record, or for a batch/from_scratch task its whole row group, is
    #: dropped (a FAILED event). Kept after compaction, for ``pipeline retry``.
    FAILED = "failed"


class TaskType(_Plain):
    """A task's type, stored in ``tasks.task_type`` (and ``task_traces.task_type``)."""

    #: A root generator of strategy ``batch`` fills its column(s) for a whole row group.
    FROM_SCRATCH = "from_scratch"
    #: One column of one record (a generator of strategy ``cell``).
    CELL = "cell"
    #: One column of a whole row group, reading upstream columns (strategy ``batch``).
    BATCH = "batch"
