"""The scheduler: runs every task the moment its inputs exist, records every transition.

Dispatch happens on completion: when a task finishes, its result goes to the row-group buffer
and the journal, the tracker says which tasks became ready, and the scheduler starts as many as
the bounds allow, all in the same callback, with no polling loop and no rescans.

Lanes of ready work:
- the general lane, bounded by ``max_in_flight_tasks``;
- one lane per model limit (LLM generators expose ``limit``): those tasks wait for their model's
  permit without holding a general slot, so a throttled model never starves the others;
- one ordered queue per stateful generator (engine/stateful.py): one task at a time, row groups
  in order, also across workers.

A retryable failure defers the task: it returns to its lane when its backoff has elapsed (a
timer, no barrier). A task that fails for good drops its record (cell) or its row group.

Failures of a model's calls never drop a record for something transient (CONTRACT section 9):
a 429 is not an attempt (the task waits as the server asks); an outage (connection, timeout,
5xx) is an attempt only when the model answered something since the task's previous try, so a
dead endpoint spends nothing while its breaker (pipeline.llm.health) pauses the lane; a model
that answers nothing for ``model_down_s`` while it has work stops the run (``failed``, exit 1,
resumable).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.engine.buffer import RowGroupBuffer, normalize_batch, normalize_cell
from pipeline.engine.checkpoints import write_checkpoint
from pipeline.engine.journal import Journal
from pipeline.engine.options import RunStats, SchedulerOptions, TaskTrace
from pipeline.engine.retries import RetryTimers
from pipeline.engine.stateful import StatefulLanes
from pipeline.engine.tracker import Plan, RowGroupTracker
from pipeline.engine.failures import FailureLog
from pipeline.errors import EngineError, ModelRateLimitError, StoreError, is_outage, is_retryable
from pipeline.generators.base import task_usage
from pipeline.redact import redact
from pipeline.store.base import RowGroupClaim, Store
from pipeline.store.events import DEFERRED, DONE, FAILED, STARTED, Completed, Dropped, TaskEvent, Usage

__all__ = ["Scheduler", "SchedulerOptions", "TaskTrace"]

log = logging.getLogger("pipeline.scheduler")


class _RowGroup:
    __slots__ = ("id", "tracker", "buffer", "dead")

    def __init__(self, rg_id: int, tracker: RowGroupTracker, buffer: RowGroupBuffer):
        self.id = rg_id
        self.tracker = tracker
        self.buffer = buffer
        self.dead = False  # finished or abandoned (lease lost): late results are ignored


def _describe(exc: BaseException) -> str:
    text = redact(f"{type(exc).__name__}: {exc}")  # before the cut: a cut key is not recognised
    return text if len(text) <= 1000 else text[:997] + "..."


class Scheduler:
    """Runs one process's share of a run: claims row groups, runs their tasks, checkpoints them."""

    def __init__(self, plan: Plan, store: Store, run_id: str, *, num_records: int, row_group_size: int,
                 home: str, options: SchedulerOptions | None = None):
        self.plan = plan
        self.store = store
        self.run_id = run_id
        self.num_records = num_records
        self.row_group_size = row_group_size
        self.home = home
        self.opts = opts = options or SchedulerOptions()
        self.stats = RunStats()
        #: records done per generator (plan order), for the progress display
        self.records_done = [0] * len(plan.nodes)
        self.traces: list[TaskTrace] = []
        self._trace = opts.trace
        self._nodes = plan.nodes
        self._live: dict[int, _RowGroup] = {}
        self._ready: collections.deque = collections.deque()
        self._limited: dict[Any, collections.deque] = {}
        self._stateful = StatefulLanes(plan.stateful, poll_s=opts.poll_s, on_news=self._pump,
                                       look=lambda: self.journal.call(self._look_stateful)
                                       ) if plan.stateful else None
        # Stateful generators that implement state_dict() (their DONE events carry the state).
        self._state_idx = self._stateful.keeps_state if plan.stateful else frozenset()
        self._retries = RetryTimers(self._on_timer)
        self._attempts: dict[tuple, int] = {}
        # Model-limited tasks that failed without spending an attempt (429, unconfirmed
        # outage): key -> [waits so far, the model's answer count at its previous try].
        self._waits: dict[tuple, list] = {}
        self._waiting: collections.Counter = collections.Counter()  # limit -> deferred tasks
        #: The longest a model-limited task waits between tries, whatever the server asks.
        self._max_wait_s = max(1.0, min(60.0, opts.model_down_s / 2))
        self.failures = FailureLog(log)
        self._in_flight = 0
        self._max_in_flight = opts.max_in_flight_tasks
        self._running: dict[tuple, asyncio.Task] = {}
        # Tasks started since the last commit: [rg, generator, row, type, finished]. The journal
        # announces (STARTED) only those still running when it commits; a task that starts and
        # finishes between two commits costs one DONE row and nothing else.
        self._unannounced: dict[tuple, list] = {}
        self._window: collections.deque = collections.deque()
        self._window_errors = 0
        self._stopping = False
        #: Why the run stopped when it ends 'failed' (error rate, a model down, a checkpoint
        #: that cannot be written): one line for the user, set before _finish("failed").
        self.stop_reason: str | None = None
        self._crash: BaseException | None = None
        self._out: list = []
        self._checkpoints: set[asyncio.Future] = set()
        self._checkpoint_rounds: dict[int, int] = {}  # row group -> failed checkpoint rounds
        self._pool = ThreadPoolExecutor(max_workers=opts.threads or min(32, opts.max_in_flight_tasks),
                                        thread_name_prefix="pipeline-gen")
        self.journal = Journal(store, run_id, interval_s=opts.commit_interval_s, lease_s=opts.lease_s,
                               on_lost=self._on_lease_lost, announce=self._announce)
        self._append = self.journal.append
        for node in plan.nodes:
            if node.limit is not None and node.limit not in self._limited:
                self._limited[node.limit] = collections.deque()
                node.limit.on_available = self._pump

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self) -> str:
        """Run until every row group of the run is checkpointed (``complete``), or until stopped
        (``interrupted``) or tripped by the error rate (``failed``)."""
        self._loop = loop = asyncio.get_running_loop()
        self._retries.loop = loop
        self._done: asyncio.Future = loop.create_future()
        self._wake = asyncio.Event()
        self.journal.start()
        await self.journal.call(self.store.register_worker, self.run_id)
        admission = loop.create_task(self._admission())
        admission.add_done_callback(self._background_ended)
        watch = loop.create_task(self._watch_models()) if self._limited else None
        try:
            status = await self._done
        finally:
            self._stopping = True
            admission.cancel()
            if watch is not None:
                watch.cancel()
            await self._drain_tasks()
            self._retries.cancel()
            if self._stateful is not None:
                self._stateful.close()
            if self._live:  # finished row groups have left _live already
                self.journal.call(self.store.release_row_groups, self.run_id, list(self._live))
            final = self._done.result() if self._done.done() and not self._done.cancelled() else None
            if final in ("complete", "failed"):  # recorded before this worker leaves: `status` must
                # never see a finishing run with no live worker, which it shows as interrupted
                self.journal.call(self.store.set_run_status, self.run_id, final)
            self.journal.call(self.store.unregister_worker, self.run_id)
            await self.journal.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
            await asyncio.gather(admission, return_exceptions=True)
        if status == "error":
            raise StoreError(f"the state store failed: {self.journal.error}")
        if status == "crashed":
            exc = self._crash
            raise EngineError(f"run {self.run_id}: the engine failed ({type(exc).__name__}: {exc}); finished work "
                              f"is recorded, and its leases were given back") from exc
        return status

    #: The longest a deferred task waits on resume (a stored next_eligible_at), and the longest a
    #: Retry-After is honoured for other generators' retryable errors, in seconds.
    RESUME_WAIT_MAX_S = 300.0

    def _background_ended(self, task: asyncio.Task) -> None:
        """No engine coroutine dies unobserved: one that raises ends the run (its leases are
        released on the way out) and the error reaches the caller."""
        if task.cancelled() or task.exception() is None:
            return
        self._crash = task.exception()
        log.error("the engine failed: %s: %s", type(self._crash).__name__, self._crash)
        self._finish("crashed")

    async def _watch_models(self) -> None:
        """Once a second: a model that has answered nothing (or only 429s) for model_down_s
        while it still has work stops the run; nothing is dropped for it."""
        limits = [limit for limit in self._limited if getattr(limit, "health", None) is not None]
        while not self._stopping:
            await asyncio.sleep(min(1.0, self.opts.model_down_s / 4))
            now = time.monotonic()
            for limit in limits:
                health = limit.health
                since = health.failing_since
                if since is None or now - since < self.opts.model_down_s:
                    continue
                if not (self._limited[limit] or self._waiting[limit] or limit.in_use):
                    continue
                what = "answered only 429s" if not health.down else f"was unreachable ({health.last_error})"
                self.stop_reason = (f"{health.where} {what} for {now - since:.0f} s (model_down_s "
                                    f"{self.opts.model_down_s:g}); no record was dropped for it: "
                                    f"`pipeline resume {self.run_id}` continues once it answers")
                log.error("stopping: %s", self.stop_reason)
                self._finish("failed")
                return

    @property
    def tasks_running(self) -> int:
        return len(self._running)

    @property
    def live_row_groups(self) -> int:
        return len(self._live)

    @property
    def stopping(self) -> bool:
        """No more dispatching: a signal, an error rate, a model down, or the end."""
        return self._stopping

    def stop(self, *, immediate: bool = False) -> None:
        """Stop dispatching; in-flight tasks get ``grace_s`` to finish (none if immediate).
        Every finished result is recorded and the run stays resumable."""
        self._stopping = True
        if immediate:
            self.opts.grace_s = 0
            for t in list(self._running.values()):
                t.cancel()
        self._finish("interrupted")

    def _final_status(self) -> str:
        """The error rate judged once more at the end over the last finished tasks, up to
        shutdown_error_window of them, even when fewer (CONTRACT section 5)."""
        window, errors = len(self._window), self._window_errors
        if window and errors >= self.opts.shutdown_error_rate * window:
            self.stop_reason = (f"{errors} of the last {window} finished tasks failed for good "
                                f"(shutdown_error_rate {self.opts.shutdown_error_rate:g})")
            return "failed"
        return "complete"

    def _finish(self, status: str) -> None:
        self._stopping = True
        if not self._done.done():
            self._done.set_result(status)

    async def _drain_tasks(self) -> None:
        if self._running:
            pending = list(self._running.values())
            _, still = await asyncio.wait(pending, timeout=self.opts.grace_s)
            for t in still:
                t.cancel()
            if still:
                await asyncio.wait(still)

    # -- admission ------------------------------------------------------------------------
    async def _admission(self) -> None:
        opts = self.opts
        while not self._stopping:
            # Finished row groups waiting for their checkpoint still hold their values: past a
            # bound, admission waits for them, so memory stays flat even if the disk is slow.
            backlog = len(self._checkpoints) >= opts.max_concurrent_row_groups
            need = 0 if backlog else opts.max_concurrent_row_groups - len(self._live)
            claims: list[RowGroupClaim] = []
            if need > 0:
                claims = await self.journal.call(self.store.claim_row_groups, self.run_id, need, opts.lease_s)
                waiting = [c.row_group for c in claims]
                try:
                    for claim in claims:
                        loaded = None
                        if claim.state != "pending":
                            loaded = await self.journal.call(self.store.load_row_group, self.run_id, claim.row_group)
                        if self._stopping:
                            break
                        waiting.remove(claim.row_group)
                        self._admit(claim, loaded)
                finally:  # claimed, never admitted (a stop, or a row group that cannot be loaded)
                    if waiting:
                        self.journal.call(self.store.release_row_groups, self.run_id, waiting)
                self._pump()
            if not self._live and not claims and not backlog:
                if self._checkpoints:
                    await asyncio.wait(list(self._checkpoints))
                groups = await self.journal.call(self.store.row_group_counts, self.run_id)
                if groups["checkpointed"] == groups["total"]:  # row groups not created yet count
                    self._finish(self._final_status())
                    return
                await asyncio.sleep(opts.poll_s)  # the rest is leased by other workers
                continue
            self._wake.clear()
            if backlog or len(self._live) >= opts.max_concurrent_row_groups or not claims:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=None if claims else opts.poll_s)
                except asyncio.TimeoutError:
                    pass

    def _admit(self, claim: RowGroupClaim, loaded: Any) -> None:
        plan, n = self.plan, claim.num_rows
        tracker = RowGroupTracker(plan, n)
        buffer = RowGroupBuffer(claim.row_group, claim.row_group * self.row_group_size, n, plan.columns)
        rg = _RowGroup(claim.row_group, tracker, buffer)
        self._live[rg.id] = rg
        if loaded is None:
            out: list = []
            tracker.initial(out)
            self._route(rg, out)
        else:
            self._restore(rg, loaded)
        if tracker.outstanding == 0:
            self._finish_row_group(rg)

    def _restore(self, rg: _RowGroup, loaded: Any) -> None:
        """Rebuild a row group from what the store recorded (resume or takeover)."""
        index = self.plan.index
        done: set[tuple[int, int | None]] = set()
        for (name, r), value in loaded.done.items():
            j = index.get(name)
            if j is None:
                continue
            done.add((j, r))
            rg.buffer.restore(self._nodes[j].outputs, r, value)
        ready = rg.tracker.replay(lambda j, r: (j, r) in done, loaded.dropped)
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
        self._route(rg, fresh)

    # -- dispatch -------------------------------------------------------------------------
    def _route(self, rg: _RowGroup, out: list) -> None:
        nodes, ready = self._nodes, self._ready
        for j, r in out:
            node = nodes[j]
            if node.stateful:
                self._stateful.push(j, rg, r)
            elif node.limit is not None:
                self._limited[node.limit].append((rg, j, r))
            else:
                ready.append((rg, j, r))

    def _pump(self) -> None:
        if self._stopping:
            return
        ready, nodes, start = self._ready, self._nodes, self._start
        while ready and self._in_flight < self._max_in_flight:
            rg, j, r = ready.popleft()
            if rg.dead or (r is not None and rg.tracker.dropped[r]):
                continue
            start(rg, nodes[j], r, True)
        for limit, lane in self._limited.items():
            while lane:
                rg, j, r = lane[0]
                if rg.dead or (r is not None and rg.tracker.dropped[r]):
                    lane.popleft()
                    continue
                if not limit.try_acquire(nodes[j].max_tokens):  # no permit, or no room in its pace
                    break
                lane.popleft()
                start(rg, nodes[j], r, False, limit.last_reserved)
        if self._stateful is not None and self._in_flight < self._max_in_flight:
            for j, rg, r in self._stateful.take(self._live):
                try:
                    self._stateful.enter(nodes[j], rg.id)
                except Exception as exc:  # load_state_dict() failed: its next values would be wrong
                    self._crash = exc
                    log.error("%s: load_state_dict() failed: %s: %s", nodes[j].name, type(exc).__name__, exc)
                    self._finish("crashed")
                    break
                start(rg, nodes[j], r, True)
                if self._in_flight >= self._max_in_flight:
                    break

    def _start(self, rg: _RowGroup, node: Any, r: int | None, counted: bool, reserved: int = 0) -> None:
        if counted:
            self._in_flight += 1
        key = (rg.id, node.index, r)
        self._unannounced[key] = [rg.id, node.name, r, node.task_type, False]
        self._running[key] = self._loop.create_task(self._exec(rg, node, r, key, counted, reserved))

    def _announce(self) -> list[tuple]:
        """On the writer thread, before a commit: STARTED for tasks still running. Single dict
        operations are atomic under the GIL; a finished task is flagged before its result is
        appended, so a STARTED never follows its task's DONE."""
        pending = self._unannounced
        if not pending:
            return []
        out = []
        for key in list(pending):
            entry = pending.pop(key, None)
            if entry is not None and not entry[4]:
                out.append(TaskEvent(STARTED, entry[0], entry[1], entry[2], entry[3]))
        return out

    def _settle(self, key: tuple) -> None:
        entry = self._unannounced.pop(key, None)
        if entry is not None:
            entry[4] = True

    async def _exec(self, rg: _RowGroup, node: Any, r: int | None, key: tuple, counted: bool,
                    reserved: int = 0) -> None:
        trace = None
        if self._trace:
            trace = TaskTrace(node.name, rg.id, r, node.task_type, dispatched_at=time.perf_counter())
            self.traces.append(trace)
        error: BaseException | None = None
        deferred = False
        usage = None
        if not counted:  # a model-limited task: count its calls and tokens
            usage = [0, 0, 0, None, 0]  # see generators.base.task_usage
            task_usage.set(usage)
            if node.limit.health is not None and key not in self._waits:  # else: marked at its last failure
                self._waits[key] = [0, node.limit.health.answers]
        try:
            if r is not None:
                data = rg.buffer.row(r, node.depends_on)
                if trace is not None:
                    trace.started_at = time.perf_counter()
                if node.is_async:
                    result = await node.gen.agenerate(data)
                else:
                    result = await self._loop.run_in_executor(self._pool, node.gen.generate, data)
                self._settle(key)
                if not node.single:
                    result = normalize_cell(node.outputs, result, node.name)
                # Once, here: the buffer and the journal get the same value; one with no exact
                # stored form raises UnstorableValueError and fails this cell below.
                value, text = rg.buffer.prepare_cell(node.outputs, r, result)
                self._cell_done(rg, node, r, value, text, usage)
            else:
                rows = rg.tracker.live_rows()  # snapshot: drops during the await only skip rows
                data = rg.buffer.frame(rows, node.depends_on)
                if trace is not None:
                    trace.started_at = time.perf_counter()
                if node.is_async:
                    result = await node.gen.agenerate(data)
                else:
                    result = await self._loop.run_in_executor(self._pool, node.gen.generate, data)
                self._settle(key)
                self._batch_done(rg, node, rows, normalize_batch(node.outputs, result, len(rows), node.name), usage)
            if trace is not None:
                trace.status = "ok"
        except asyncio.CancelledError:
            if trace is not None:
                trace.status = "cancelled"
            raise
        except Exception as exc:
            self._settle(key)
            error = exc
            deferred = self._failed(rg, node, r, exc, usage)
            if trace is not None:
                trace.status = ("rate_limited" if isinstance(exc, ModelRateLimitError)
                                else "deferred" if deferred else "failed")
                trace.error = f"{type(exc).__name__}: {exc}"
        finally:
            if trace is not None:
                trace.finished_at = time.perf_counter()
            del self._running[key]
            self._unannounced.pop(key, None)
            if counted:
                self._in_flight -= 1
            else:
                node.limit.release(rate_limited=isinstance(error, ModelRateLimitError), outage=is_outage(error),
                                   answered=error is None or usage[0] > 0,
                                   error=None if error is None else _describe(error),
                                   reserved=reserved, requests=usage[0], tokens=usage[1] + usage[2])
            if node.stateful and not deferred:  # a deferred stateful task keeps its generator
                self._stateful.release(node.index)
            self._pump()

    # -- results --------------------------------------------------------------------------
    def _usage(self, node: Any, usage: list, exc: BaseException | None = None) -> Usage:
        """The usage of a model-limited task's event (pipeline.store.events.Usage)."""
        pacer = getattr(node.limit, "pacer", None)
        cost, snapshot = (None, None) if pacer is None else (pacer.cost(usage[1], usage[2]), pacer.snapshot())
        return Usage(node.model, usage[0], usage[1], usage[2], int(isinstance(exc, ModelRateLimitError)),
                     node.limit.limit, usage[3], 0 if exc is not None else usage[4], cost, snapshot)

    def _cell_done(self, rg: _RowGroup, node: Any, r: int, value: Any, text: str,
                   usage: list | None = None) -> None:
        """``value`` and its JSON ``text`` from RowGroupBuffer.prepare_cell."""
        tracker = rg.tracker
        if rg.dead:
            return
        event = TaskEvent(DONE, rg.id, node.name, r, "cell", text)
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

    def _batch_done(self, rg: _RowGroup, node: Any, rows: list[int], cols: dict[str, list],
                    usage: list | None = None) -> None:
        if rg.dead:
            return
        rows, cols, texts, bad = rg.buffer.prepare_batch(cols, rows)
        for r, exc in bad.items():  # a value with no exact stored form fails its own cell
            self._failed(rg, node, r, exc)
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

    def _succeeded(self, rg: _RowGroup, j: int, r: int | None) -> None:
        self.stats.tasks_done += 1
        if self._attempts:
            self._attempts.pop((rg.id, j, r), None)
        if self._waits:
            self._waits.pop((rg.id, j, r), None)
        self._count(False)
        if rg.tracker.outstanding == 0:
            self._finish_row_group(rg)

    def _failed(self, rg: _RowGroup, node: Any, r: int | None, exc: BaseException,
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
        if tracker.outstanding == 0:
            self._finish_row_group(rg)
        return False

    def _waits_instead(self, rg: _RowGroup, node: Any, r: int | None, key: tuple, exc: BaseException,
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
            if health.answers > entry[1]:  # the endpoint answered meanwhile: this task's fault
                entry[1] = health.answers
                return False
            health.suspect()
        if entry is None:
            entry = self._waits[key] = [0, health.answers if health is not None else 0]
        entry[0] += 1
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is None:
            # Exponential in the waits of this task, capped: a paused lane does not send
            # anyway, so the backoff only spaces the checks.
            retry_after = min(60.0, self.opts.retry_backoff_s * (2 ** min(entry[0] - 1, 7))) * (0.5 + random.random())
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
        window = self._window
        window.append(error)
        self._window_errors += error
        if len(window) > self.opts.shutdown_error_window:
            self._window_errors -= window.popleft()
        if (error and not self._stopping and len(window) == self.opts.shutdown_error_window
                and self._window_errors >= self.opts.shutdown_error_rate * len(window)):
            self.stop_reason = (f"{self._window_errors} of the last {len(window)} finished tasks failed for "
                                f"good (shutdown_error_rate {self.opts.shutdown_error_rate:g})")
            log.error("stopping: %s", self.stop_reason)
            self._finish("failed")

    # -- retries --------------------------------------------------------------------------
    def _defer(self, rg: _RowGroup, j: int, r: int | None, due: float) -> None:
        self._retries.push(due, (rg, j, r))
        limit = self._nodes[j].limit
        if limit is not None:
            self._waiting[limit] += 1

    def _on_timer(self) -> None:
        nodes, due = self._nodes, []
        for rg, j, r in self._retries.pop_due():
            limit = nodes[j].limit
            if limit is not None:
                self._waiting[limit] -= 1
            if not rg.dead and not (r is not None and rg.tracker.dropped[r]):
                due.append((rg, j, r))
        for rg, j, r in reversed(due):  # retries go first: they hold their row group open
            node = nodes[j]
            if node.stateful:
                self._stateful.release(j)
                self._stateful.push(j, rg, r)
            elif node.limit is not None:
                self._limited[node.limit].appendleft((rg, j, r))
            else:
                self._ready.appendleft((rg, j, r))
        self._pump()

    # -- row groups -----------------------------------------------------------------------
    def _finish_row_group(self, rg: _RowGroup) -> None:
        if rg.dead:
            return
        rg.dead = True
        del self._live[rg.id]
        if self._stateful is not None:
            self._stateful.finished(rg.id)
        self._append(Completed(rg.id))
        fut = self.journal.after_commit(self._checkpoint, rg)
        self._checkpoints.add(fut)
        fut.add_done_callback(functools.partial(self._checkpointed, rg.id))
        self._wake.set()

    #: A checkpoint that fails this many rounds (of 3 attempts each) stops the run, resumably.
    CHECKPOINT_ROUNDS = 3

    def _checkpointed(self, rg_id: int, fut: asyncio.Future) -> None:
        self._checkpoints.discard(fut)
        self._wake.set()
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            self._checkpoint_rounds.pop(rg_id, None)
            if fut.result():
                self.stats.row_groups_checkpointed += 1
            return
        # It stays 'complete'. Giving its lease back lets admission claim it again (a new epoch),
        # replay its recorded values and try once more (a resume would do the same); a cause
        # that lasts (a full disk, the folder replaced by a file) stops the run after a few
        # rounds instead of retrying for ever.
        self.journal.call(self.store.release_row_groups, self.run_id, [rg_id])
        rounds = self._checkpoint_rounds[rg_id] = self._checkpoint_rounds.get(rg_id, 0) + 1
        if rounds < self.CHECKPOINT_ROUNDS:
            log.error("%s; will try again (round %d of %d)", exc, rounds, self.CHECKPOINT_ROUNDS)
        elif not self._stopping:
            self.stop_reason = str(exc)
            log.error("stopping: %s; fix the cause, then `pipeline resume %s`", exc, self.run_id)
            self._finish("failed")

    def _checkpoint(self, rg: _RowGroup) -> bool:
        """On a side thread, after all the row group's events are committed: its file, made
        current under the lease (:func:`pipeline.engine.checkpoints.write_checkpoint`)."""
        live = rg.tracker.live_rows()  # none when every record was dropped: an empty file
        return write_checkpoint(self.store, self.run_id, self.home, rg.id,
                                lambda: rg.buffer.table(self.plan.columns, live), rg.tracker.n_dropped, _describe)

    def _look_stateful(self) -> tuple[list[dict], dict]:
        """On the writer thread, for the stateful lanes: the row groups, then the generators'
        latest states (in that order: a row group seen finished has its states committed)."""
        groups = self.store.row_groups(self.run_id)
        return groups, (self.store.generator_states(self.run_id) if self._stateful.keeps_state else {})

    def _on_lease_lost(self, row_groups: set[int] | None) -> None:
        if row_groups is None:
            log.error("the state store keeps failing; stopping (finished work is recorded)")
            self._finish("error")
            return
        for rg_id in row_groups:
            rg = self._live.pop(rg_id, None)
            if rg is not None:
                log.warning("lost the lease on row group %d to another worker; abandoning it", rg_id)
                rg.dead = True
                if self._stateful is not None:
                    self._stateful.lost(rg_id)
        self._wake.set()
