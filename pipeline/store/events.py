"""The journal's events, and :func:`coalesce`: what a batch of them means to a store.

The engine appends events to its journal (:mod:`pipeline.engine.journal`), which hands them to
:meth:`~pipeline.store.base.Store.record` in batches, in order, one transaction per batch. Every
event is a :class:`typing.NamedTuple` (a tuple: cheap to build on the hot path, where one DONE
is made per cell)::

    TaskEvent(kind, row_group, generator, row_index, task_type, ...)  a task's transition
    StateSaved(row_group, generator, state, done)   a stateful generator's state after a DONE
    Dropped(row_group, row_index)                   a record dropped (row_index None: all)
    Completed(row_group)                            every task of the row group is terminal

A task is ``(row_group, generator, row_index)``: ``generator`` is the config entry that produces
the values, ``row_index`` counts from 0 within the row group and is None for ``batch`` and
``from_scratch`` tasks. Both stores record a batch by applying ``coalesce(events)``, so they
read the events in one place and agree on what a batch means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

from pipeline.states import TaskState

__all__ = [
    "DEFERRED",
    "DONE",
    "FAILED",
    "STARTED",
    "TASK_STATE",
    "Batch",
    "Completed",
    "Dropped",
    "ModelUsage",
    "StateSaved",
    "TaskEvent",
    "TaskKey",
    "TaskUsage",
    "Usage",
    "coalesce",
    "usage_totals",
]

#: The kinds of :class:`TaskEvent`, and the ``tasks.state`` each one leaves: plain ``str`` values,
#: which the journal binds per task row (a driver adapts a ``str`` subclass more slowly).
STARTED, DONE, DEFERRED, FAILED = 0, 1, 2, 3
TASK_STATE = tuple(s.value for s in (TaskState.IN_FLIGHT, TaskState.DONE, TaskState.DEFERRED, TaskState.FAILED))

#: ``(row_group, generator, row_index)``
TaskKey = tuple[int, str, "int | None"]


class Usage(NamedTuple):
    """A model-calling task's usage in one attempt, recorded with its transition."""

    model: str  # the model alias
    requests: int
    prompt_tokens: int
    completion_tokens: int
    rate_limited: int  # 1 if the attempt ended in a 429, else 0
    concurrency: int | None  # the model's concurrency limit then
    finish_reason: str | None  # the last answer's; None keeps the one recorded
    truncated: int  # 1 for a kept text answer cut by ``length``, else 0
    cost: float | None  # money at the model's prices; None without prices
    pacing: dict | None  # :meth:`pipeline.llm.pacing.Pacer.snapshot`, or None


class TaskEvent(NamedTuple):
    """A task's transition. STARTED is sent only for tasks still running at a commit.

    ``value`` (DONE only) is the JSON text (:func:`pipeline.values.prepare`) of what the
    generator produced: for a cell task of a single-output generator the cell value, of a
    multi-output one ``{column: value}``; for a batch or from_scratch task ``{column: [value per
    row of the row group]}`` with ``null`` at dropped rows. DEFERRED carries ``attempts``,
    ``next_eligible_at`` (Unix seconds) and ``error``; FAILED ``attempts`` and ``error``.
    """

    kind: int  # STARTED, DONE, DEFERRED or FAILED
    row_group: int
    generator: str
    row_index: int | None
    task_type: str  # a TaskType's plain value: "cell", "batch" or "from_scratch"
    value: str | None = None
    attempts: int | None = None
    next_eligible_at: float | None = None
    error: str | None = None
    usage: Usage | None = None  # a model-calling task's usage in this attempt


class StateSaved(NamedTuple):
    """A stateful generator's ``state_dict()`` (JSON text) after the task of ``done``, recorded
    in the same transaction as that DONE."""

    row_group: int
    generator: str
    state: str
    done: TaskEvent


class Dropped(NamedTuple):
    row_group: int
    row_index: int | None = None  # None: every record of the row group


class Completed(NamedTuple):
    row_group: int


class Batch(NamedTuple):
    """What a batch of events means: the rows a store writes, in one transaction."""

    #: Each task's row: its last event, which also holds the ``attempts``, ``next_eligible_at``
    #: and ``error`` of the task's last DEFERRED or FAILED in the batch even if the task started
    #: again since (``attempts`` None: the batch changes none of them).
    tasks: dict[TaskKey, TaskEvent]
    #: Row group -> row indexes dropped (None: every record).
    dropped: dict[int, set[int] | None]
    #: Row groups whose every task is terminal.
    completed: set[int]
    #: ``(row_group, generator)`` -> the generator's state (JSON text), the last one sent.
    states: dict[tuple[int, str], str]
    #: ``(task, usage)`` per attempt that called a model, in event order.
    usage: list[tuple[TaskKey, Usage]]
    #: Every row group the batch touches: the ones whose lease a store checks.
    row_groups: set[int]


def coalesce(events: Iterable[Any]) -> Batch:
    """The :class:`Batch` of ``events``, in order: per task, the last state wins and a DONE's
    value travels with it. ValueError for anything that is not an event."""
    tasks: dict[TaskKey, TaskEvent] = {}
    errors: dict[TaskKey, TaskEvent] = {}  # the last DEFERRED/FAILED per task
    dropped: dict[int, set[int] | None] = {}
    completed: set[int] = set()
    states: dict[tuple[int, str], str] = {}
    usage: list[tuple[TaskKey, Usage]] = []
    for ev in events:
        cls = type(ev)
        if cls is StateSaved:
            states[(ev.row_group, ev.generator)] = ev.state
            ev = ev.done
            cls = type(ev)
        if cls is TaskEvent:
            key = ev[1:4]
            if ev.kind >= DEFERRED:
                errors[key] = ev
            elif errors and key in errors:  # started again, or done, after a DEFERRED: keep its details
                err = errors[key]
                ev = ev._replace(attempts=err.attempts, next_eligible_at=err.next_eligible_at, error=err.error)
            tasks[key] = ev
            if ev.usage is not None:
                usage.append((key, ev.usage))
        elif cls is Dropped:
            rg = ev.row_group
            if ev.row_index is None:
                dropped[rg] = None
            else:
                rows = dropped.get(rg, set())
                if rows is not None:
                    rows.add(ev.row_index)
                    dropped[rg] = rows
        elif cls is Completed:
            completed.add(ev.row_group)
        else:
            raise ValueError(f"unknown event {ev!r}")
    row_groups = {key[0] for key in tasks}
    row_groups.update(dropped, completed, (rg for rg, _ in states))
    return Batch(tasks, dropped, completed, states, usage, row_groups)


@dataclass(slots=True)
class TaskUsage:
    """One task's usage in a batch: summed, with the latest answer's finish reason."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


@dataclass(slots=True)
class ModelUsage:
    """One (model, generator)'s usage in a batch: counts summed, the latest concurrency and
    pacing snapshot; ``cost`` None unless an attempt had one."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_limited: int = 0
    concurrency: int | None = None
    truncated: int = 0
    cost: float | None = None
    pacing: dict | None = None


def usage_totals(usage: Sequence[tuple[TaskKey, Usage]], row_groups: Any
                 ) -> tuple[dict[TaskKey, TaskUsage], dict[tuple[str, str], ModelUsage]]:
    """``Batch.usage`` summed per task and per ``(model, generator)``, counting only the row
    groups in ``row_groups`` (those whose lease the store confirmed: a fenced-out worker's calls
    are not added)."""
    per_task: dict[TaskKey, TaskUsage] = {}
    per_model: dict[tuple[str, str], ModelUsage] = {}
    for key, u in usage:
        if key[0] not in row_groups:
            continue
        t = per_task.get(key)
        if t is None:
            t = per_task[key] = TaskUsage()
        t.requests += u.requests
        t.prompt_tokens += u.prompt_tokens
        t.completion_tokens += u.completion_tokens
        if u.finish_reason is not None:
            t.finish_reason = u.finish_reason
        m = per_model.get((u.model, key[1]))
        if m is None:
            m = per_model[(u.model, key[1])] = ModelUsage()
        m.requests += u.requests
        m.prompt_tokens += u.prompt_tokens
        m.completion_tokens += u.completion_tokens
        m.rate_limited += u.rate_limited
        m.concurrency = u.concurrency
        m.truncated += u.truncated
        if u.cost is not None:
            m.cost = (m.cost or 0.0) + u.cost
        if u.pacing is not None:
            m.pacing = u.pacing
    return per_task, per_model
