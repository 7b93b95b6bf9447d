"""What a finished task leads to: its result recorded and the tasks it unblocks released, or its
failure deferred for another try or made final (its record or row group dropped).

A retryable failure is deferred: its task waits out its backoff on a timer
(:class:`~pipeline.engine.retries.RetryTimers`), then goes back to the front of its lane. A task
fails for good after ``salvage_max_rounds`` deferrals, or at once for an error that is not
retryable; those count against the error rate (``shutdown_error_rate`` over the last
``shutdown_error_window`` finished tasks), which stops the run when reached.

Failures of a model's calls never drop a record for something transient (CONTRACT section 9):
a 429 is not an attempt (the task waits as the server asks); an outage (connection, timeout,
5xx) is an attempt only when the model answered something since the task's previous try, so a
dead endpoint spends nothing while its breaker (pipeline.llm.health) pauses the lane.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.engine.failures import FailureLog, describe as _describe
from pipeline.engine.journal import Journal
from pipeline.engine.options import RunStats, SchedulerOptions
from pipeline.engine.retries import RetryTimers
from pipeline.engine.row_groups import Ready, RowGroup
from pipeline.engine.stateful import StatefulLanes
from pipeline.errors import ModelRateLimitError, is_outage, is_retryable
from pipeline.graph import CELL
from pipeline.store.events import DEFERRED, DONE, FAILED, Dropped, TaskEvent, Usage

_new_tuple = tuple.__new__
#: The defaults of a TaskEvent's fields after ``value``, for building one with tuple.__new__.
_EVENT_TAIL = tuple(TaskEvent._field_defaults[f] for f in TaskEvent._fields[6:])

__all__ = ["ModelWait", "Outcomes", "TaskKey"]

log = logging.getLogger("pipeline.scheduler")


#: A task across its attempts: (row group, generator's plan index, row; None for the generator's
#: batch task of the row group). A plain tuple: one is made per task, on the hot path, where a
#: NamedTuple costs 0.3 us more (1-2% of a task), and no key is ever read by its fields.
TaskKey = tuple[int, int, int | None]


@dataclass(slots=True)
class ModelWait:
    """A model-limited task's transient failures that spent no attempt (see ``_waits_instead``)."""

    waits: int  # times it waited so far
    answers: int  # its model's answer count (pipeline.llm.health) at its previous try


class Outcomes:
    """Records what tasks leave and decides what their failures cost; owns the tasks' attempts,
    their model waits, the retry timers and the error-rate window.

    ``route(rg, ready)`` puts tasks that became ready in their lanes; ``requeue(due)`` puts
    deferred ``(rg, generator, row)`` that are due back at the front of theirs;
    ``fail(reason)`` ends the run 'failed'. The scheduler finishes a row group once it has no
    task left and none running (RowGroups.finish_if_done). Call :meth:`start` on the event loop
    before the first task ends."""

    #: The longest a deferred task waits on resume (a stored next_eligible_at), and the longest a
    #: Retry-After is honoured for other generators' retryable errors, in seconds.
    RESUME_WAIT_MAX_S = 300.0

    def __init__(self, nodes: list[Any], journal: Journal, opts: SchedulerOptions, stats: RunStats,
                 stateful: StatefulLanes | None, *, route: Callable[[RowGroup, list[Ready]], None],
                 requeue: Callable[[list[tuple[RowGroup, int, int | None]]], None],
                 fail: Callable[[str], None]) -> None:
        self._nodes, self.opts, self.stats = nodes, opts, stats
        self._append = journal.append
        self._stateful = stateful
        # Stateful generators that implement state_dict() (their DONE events carry the state).
        self._state_idx = stateful.keeps_state if stateful is not None else frozenset()
        self._route, self._requeue = route, requeue
        self._fail = fail
        #: records done per generator (plan order), for the progress display
        self.records_done = [0] * len(nodes)
        self.failures = FailureLog(log)
        self._attempts: dict[TaskKey, int] = {}
        # Model-limited tasks that failed without spending an attempt (429, unconfirmed outage).
        self._waits: dict[TaskKey, ModelWait] = {}
        #: Deferred tasks per model limit (a model with work waiting is still needed).
        self.waiting: collections.Counter = collections.Counter()
        #: The longest a model-limited task waits between tries, whatever the server asks.
        self._max_wait_s = max(1.0, min(60.0, opts.model_down_s / 2))
        self._retries = RetryTimers(self._on_timer)
        # The error-rate window: tasks finished so far, and the numbers (1, 2, ...) of those
        # among them that failed for good, oldest first. A success costs one addition.
        self._finished = 0
        self._failed_at: collections.deque[int] = collections.deque()
        self._out: list[Ready] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = self._retries.loop = loop

    def close(self) -> None:
        """No more retries: the run is over."""
        self._retries.cancel()

    def trying(self, key: TaskKey, health: Any) -> None:
        """A model-limited task starts: note its model's answer count (``health``:
        pipeline.llm.health, or None), unless its last failure noted it already."""
        if health is not None and key not in self._waits:
            self._waits[key] = ModelWait(0, health.answers)

    def restore(self, rg: RowGroup, ready: list[Ready], loaded: Any) -> list[Ready]:
        """The ready tasks of a row group rebuilt from the store (``loaded``): those that failed
        before keep their attempts; those deferred wait out what is left of their backoff.
        Returns the others, to run now."""
        now_wall, now = time.time(), self._loop.time()
        fresh = []
        for j, r in ready:
            key = (self._nodes[j].name, r)
            deferred = loaded.deferred.get(key)
            if deferred is None:
                if loaded.attempts.get(key):  # failed attempts before the crash still count
                    self._attempts[(rg.id, j, r)] = loaded.attempts[key]
                fresh.append((j, r))
                continue
            attempts, next_at, _ = deferred
            self._attempts[(rg.id, j, r)] = attempts
            # A stored wait (an older version honoured any Retry-After) never holds a resume long.
            wait = min(max(0.0, (next_at or now_wall) - now_wall), self.RESUME_WAIT_MAX_S)
            self._defer(rg, j, r, now + wait)
        return fresh

    def final_reason(self) -> str | None:
        """The error rate judged once more at the end over the last finished tasks, up to
        shutdown_error_window of them, even when fewer (CONTRACT section 5): why the run failed,
        or None."""
        window, errors = self._in_window()
        if window and errors >= self.opts.shutdown_error_rate * window:
            return (f"{errors} of the last {window} finished tasks failed for good "
                    f"(shutdown_error_rate {self.opts.shutdown_error_rate:g})")
        return None

    # -- results --------------------------------------------------------------------------
    def _usage(self, node: Any, usage: list, exc: BaseException | None = None) -> Usage:
        """The usage of a model-limited task's event (pipeline.store.events.Usage)."""
        pacer = getattr(node.limit, "pacer", None)
        cost, snapshot = (None, None) if pacer is None else (
            pacer.cost(usage[1], usage[2]), pacer.snapshot(usage[0], usage[1] + usage[2]))  # settles after this
        return Usage(node.model, usage[0], usage[1], usage[2], int(isinstance(exc, ModelRateLimitError)),
                     node.limit.limit, usage[3], 0 if exc is not None else usage[4], cost, snapshot)

    def cell_done(self, rg: RowGroup, node: Any, r: int, value: Any, text: str,
                  usage: list | None = None) -> None:
        """``value`` and its JSON ``text`` from RowGroupBuffer.prepare_cell."""
        tracker = rg.tracker
        if rg.dead:
            return
        # tuple.__new__ skips NamedTuple's argument handling: 0.2 us less per cell (measured).
        event = _new_tuple(TaskEvent, (DONE, rg.id, node.name, r, CELL, text) + _EVENT_TAIL)
        if usage is not None:
            event = event._replace(usage=self._usage(node, usage))
        if self._state_idx and node.index in self._state_idx:
            event = self._stateful.with_state(rg.id, node, event)
        self._append(event)
        if tracker.dropped[r]:
            # Its record was dropped (another column failed) while it ran: the value is kept
            # all the same, so that `pipeline retry` brings the record back without paying
            # for this cell again; nothing in this run reads it.
            self._waits.pop((rg.id, node.index, r), None)
            return
        rg.buffer.put_cell(node.outputs, r, value)
        out = self._out
        tracker.complete_cell(node.index, r, out)
        if out:
            self._route(rg, out)
            out.clear()
        self.records_done[node.index] += 1
        self._succeeded(rg, node.index, r)

    def batch_done(self, rg: RowGroup, node: Any, rows: list[int], cols: dict[str, list],
                   usage: list | None = None) -> None:
        if rg.dead:
            return
        rows, cols, texts, bad = rg.buffer.prepare_batch(cols, rows)
        for r, exc in bad.items():  # a value with no exact stored form fails its own cell
            self.failed(rg, node, r, exc)
        full = rg.buffer.put_batch(cols, rows, texts)
        event = TaskEvent(DONE, rg.id, node.name, None, node.task_type, full)
        if usage is not None:
            event = event._replace(usage=self._usage(node, usage))
        if self._state_idx and node.index in self._state_idx:
            event = self._stateful.with_state(rg.id, node, event)
        self._append(event)
        out = self._out
        rg.tracker.complete_batch(node.index, out)
        if out:
            self._route(rg, out)
            out.clear()
        self.records_done[node.index] += len(rows)
        self._succeeded(rg, node.index, None)

    def _succeeded(self, rg: RowGroup, j: int, r: int | None) -> None:
        self.stats.tasks_done += 1
        if self._attempts:
            self._attempts.pop((rg.id, j, r), None)
        if self._waits:
            self._waits.pop((rg.id, j, r), None)
        self._count(False)

    # -- failures -------------------------------------------------------------------------
    def failed(self, rg: RowGroup, node: Any, r: int | None, exc: BaseException,
               usage: list | None = None) -> bool:
        """Defer (returns True) or fail for good and drop the record or row group."""
        if rg.dead or (r is not None and rg.tracker.dropped[r]):
            return False
        extra = None if usage is None else self._usage(node, usage, exc)
        key = (rg.id, node.index, r)
        if node.limit is not None and self._waits_instead(rg, node, r, key, exc, extra):
            return True
        attempts = self._attempts.get(key, 0) + 1
        retryable = is_retryable(exc)
        if retryable and attempts <= self.opts.salvage_max_rounds:
            self._attempts[key] = attempts
            delay = self.opts.retry_backoff_s * (2 ** (attempts - 1)) * (0.5 + random.random())
            retry_after = getattr(exc, "retry_after_s", None)
            if retry_after:
                delay = max(delay, min(float(retry_after), self.RESUME_WAIT_MAX_S))
            self.stats.tasks_deferred += 1
            self._append(TaskEvent(DEFERRED, rg.id, node.name, r, node.task_type, attempts=attempts,
                                   next_eligible_at=time.time() + delay, error=_describe(exc), usage=extra))
            self._defer(rg, node.index, r, self._loop.time() + delay)
            return True
        self._attempts.pop(key, None)
        self._waits.pop(key, None)
        self.stats.tasks_failed += 1
        self._append(TaskEvent(FAILED, rg.id, node.name, r, node.task_type, attempts=attempts, error=_describe(exc),
                               usage=extra))
        self.failures.failed(node.name, rg.id, r, node.task_type, attempts, exc)
        tracker = rg.tracker
        if r is not None:
            out = self._out
            if tracker.drop_record(r, out):
                self.stats.records_dropped += 1
                self._append(Dropped(rg.id, r))
            if out:
                self._route(rg, out)
                out.clear()
        else:
            newly = tracker.drop_all()
            self.stats.records_dropped += len(newly)
            self._append(Dropped(rg.id))
        if not retryable:
            self._count(True)
        return False

    def _waits_instead(self, rg: RowGroup, node: Any, r: int | None, key: TaskKey, exc: BaseException,
                       extra: Usage | None) -> bool:
        """A model-limited task that failed for a transient reason of its model waits without
        spending an attempt (True): a 429 always; an outage when the model has answered nothing
        since the task's previous try (then it is the endpoint, not the task)."""
        rate_limited = isinstance(exc, ModelRateLimitError)
        health = node.limit.health
        entry = self._waits.get(key)
        if not rate_limited:
            if health is None or not is_outage(exc) or entry is None:
                return False
            if health.answers > entry.answers:  # the endpoint answered meanwhile: this task's fault
                entry.answers = health.answers
                return False
            health.suspect()
        if entry is None:
            entry = self._waits[key] = ModelWait(0, health.answers if health is not None else 0)
        entry.waits += 1
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is None:
            # Exponential in the waits of this task, capped: a paused lane does not send
            # anyway, so the backoff only spaces the checks.
            retry_after = min(60.0, self.opts.retry_backoff_s * (2 ** min(entry.waits - 1, 7))) * (0.5 + random.random())
        # A server may ask for any wait (a year, 1e300 s): the task comes back within the cap,
        # and asks again; one that is refused throughout stops the run after model_down_s.
        retry_after = min(retry_after, self._max_wait_s)
        self.stats.tasks_deferred += 1
        self._append(TaskEvent(DEFERRED, rg.id, node.name, r, node.task_type, attempts=self._attempts.get(key, 0),
                               next_eligible_at=time.time() + retry_after, error=_describe(exc), usage=extra))
        self._defer(rg, node.index, r, self._loop.time() + retry_after)
        return True

    def _count(self, error: bool) -> None:
        """Sliding window of finished tasks; trips the run when the share of non-retryable
        failures in a full window reaches shutdown_error_rate."""
        self._finished += 1
        if not error:
            return
        self._failed_at.append(self._finished)
        window, errors = self._in_window()
        if window == self.opts.shutdown_error_window and errors >= self.opts.shutdown_error_rate * window:
            self._fail(f"{errors} of the last {window} finished tasks failed for "
                       f"good (shutdown_error_rate {self.opts.shutdown_error_rate:g})")

    def _in_window(self) -> tuple[int, int]:
        """(tasks in the window, those of them that failed for good): the last
        shutdown_error_window finished tasks, or all when fewer."""
        size, failed_at = self.opts.shutdown_error_window, self._failed_at
        while failed_at and failed_at[0] <= self._finished - size:
            failed_at.popleft()
        return min(self._finished, size), len(failed_at)

    # -- retries --------------------------------------------------------------------------
    def _defer(self, rg: RowGroup, j: int, r: int | None, due: float) -> None:
        self._retries.push(due, (rg, j, r))
        limit = self._nodes[j].limit
        if limit is not None:
            self.waiting[limit] += 1

    def _on_timer(self) -> None:
        nodes, due = self._nodes, []
        for rg, j, r in self._retries.pop_due():
            limit = nodes[j].limit
            if limit is not None:
                self.waiting[limit] -= 1
            if not rg.dead and not (r is not None and rg.tracker.dropped[r]):
                due.append((rg, j, r))
        self._requeue(due)
