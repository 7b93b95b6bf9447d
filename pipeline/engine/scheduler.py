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
timer, no barrier). A task that fails for good drops its record (cell) or its row group. What a
task's result or failure leads to is engine/outcomes.py (attempts, model waits, error rate); the
row groups' admission, checkpoints and leases are engine/row_groups.py. A model that answers
nothing for ``model_down_s`` while it has work stops the run (``failed``, exit 1, resumable).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.engine import collector
from pipeline.engine.buffer import normalize_batch, normalize_cell
from pipeline.engine.failures import describe
from pipeline.engine.journal import Journal
from pipeline.engine.options import RunStats, SchedulerOptions, TaskTrace
from pipeline.engine.outcomes import Outcomes, TaskKey
from pipeline.engine.row_groups import Ready, RowGroup, RowGroups
from pipeline.engine.stateful import StatefulLanes
from pipeline.engine.tracker import Plan
from pipeline.errors import EngineError, ModelRateLimitError, StoreError, is_outage
from pipeline.generators.base import task_usage
from pipeline.states import RunStatus
from pipeline.store.base import Store
from pipeline.store.events import STARTED, TaskEvent
from pipeline.surface import command

__all__ = ["Scheduler", "SchedulerOptions", "TaskTrace"]

log = logging.getLogger("pipeline.scheduler")


class Scheduler:
    """Runs one process's share of a run: claims row groups, runs their tasks, checkpoints them."""

    #: A checkpoint that fails this many rounds stops the run (see engine/row_groups.py).
    CHECKPOINT_ROUNDS = RowGroups.CHECKPOINT_ROUNDS

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
        self.traces: list[TaskTrace] = []
        self._trace = opts.trace
        self._nodes = plan.nodes
        self._ready: collections.deque = collections.deque()
        self._limited: dict[Any, collections.deque] = {}
        self._stateful = StatefulLanes(plan.stateful, poll_s=opts.poll_s, on_news=self._pump,
                                       look=lambda: self.journal.call(self._look_stateful)
                                       ) if plan.stateful else None
        self._in_flight = 0
        self._max_in_flight = opts.max_in_flight_tasks
        self._running: dict[TaskKey, asyncio.Task] = {}
        # Tasks started since the last commit: [rg, generator, row, type, finished]. The journal
        # announces (STARTED) only those still running when it commits; a task that starts and
        # finishes between two commits costs one DONE row and nothing else.
        self._unannounced: dict[TaskKey, list] = {}
        self._stopping = False
        #: Why the run stopped when it ends 'failed' (error rate, a model down, a checkpoint
        #: that cannot be written): one line for the user, set before _finish("failed").
        self.stop_reason: str | None = None
        self._crash: BaseException | None = None
        self._pool = ThreadPoolExecutor(max_workers=opts.threads or min(32, opts.max_in_flight_tasks),
                                        thread_name_prefix="pipeline-gen")
        self.journal = Journal(store, run_id, interval_s=opts.commit_interval_s, lease_s=opts.lease_s,
                               on_lost=self._on_lease_lost, announce=self._announce)
        self._row_groups = RowGroups(plan, store, self.journal, run_id, row_group_size=row_group_size, home=home,
                                     opts=opts, stats=self.stats, stateful=self._stateful,
                                     stopping=lambda: self._stopping, admitted=self._admitted, pump=self._pump,
                                     fail=self._fail)
        self._outcomes = Outcomes(plan.nodes, self.journal, opts, self.stats, self._stateful, route=self._route,
                                  requeue=self._requeue, fail=self._fail)
        for node in plan.nodes:
            if node.limit is not None and node.limit not in self._limited:
                self._limited[node.limit] = collections.deque()
                node.limit.on_available = self._pump

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self) -> str:
        """Run until every row group of the run is checkpointed (``complete``), or until stopped
        (``interrupted``) or tripped by the error rate (``failed``)."""
        with collector.tuned():
            return await self._run()

    async def _run(self) -> str:
        self._loop = loop = asyncio.get_running_loop()
        self._outcomes.start(loop)
        self._done: asyncio.Future = loop.create_future()
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
            self._outcomes.close()
            if self._stateful is not None:
                self._stateful.close()
            self._row_groups.give_back()
            final = self._done.result() if self._done.done() and not self._done.cancelled() else None
            if final in (RunStatus.COMPLETE, RunStatus.FAILED):  # recorded before this worker leaves: `status` must
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
                if not (self._limited[limit] or self._outcomes.waiting[limit] or limit.in_use):
                    continue
                what = "answered only 429s" if not health.down else f"was unreachable ({health.last_error})"
                resume = (f"; no record was dropped for it: {command('resume', self.run_id)} continues once it "
                          "answers") if self.opts.resumable else ""
                self._fail(f"{health.where} {what} for {now - since:.0f} s (model_down_s "
                           f"{self.opts.model_down_s:g}){resume}")
                return

    @property
    def tasks_running(self) -> int:
        return len(self._running)

    @property
    def live_row_groups(self) -> int:
        return len(self._row_groups.live)

    @property
    def records_done(self) -> list[int]:
        """Records done per generator (plan order), for the progress display."""
        return self._outcomes.records_done

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
        self._finish(RunStatus.INTERRUPTED)

    def _finish(self, status: str) -> None:
        """``status``: a RunStatus, or "crashed" / "error" (which :meth:`run` raises)."""
        self._stopping = True
        if not self._done.done():
            self._done.set_result(status)

    def _fail(self, reason: str, advice: str = "") -> None:
        """End the run 'failed' for ``reason`` (one line for the user, kept in stop_reason;
        ``advice`` goes to the log only, and only for a resumable run), unless it is stopping
        already."""
        if self._stopping:
            return
        self.stop_reason = reason
        log.error("stopping: %s%s", reason, advice if self.opts.resumable else "")
        self._finish(RunStatus.FAILED)

    async def _drain_tasks(self) -> None:
        if self._running:
            pending = list(self._running.values())
            _, still = await asyncio.wait(pending, timeout=self.opts.grace_s)
            for t in still:
                t.cancel()
            if still:
                await asyncio.wait(still)

    # -- row groups -----------------------------------------------------------------------
    async def _admission(self) -> None:
        if await self._row_groups.admission():  # every row group of the run is checkpointed
            # The error rate judged once more over the last finished tasks (CONTRACT section 5).
            reason = self._outcomes.final_reason()
            if reason is not None:
                self.stop_reason = reason
            self._finish(RunStatus.COMPLETE if reason is None else RunStatus.FAILED)

    def _admitted(self, rg: RowGroup, ready: list[Ready], loaded: Any) -> None:
        """A row group admitted: its ready tasks go to their lanes; rebuilt from the store
        (``loaded``), those that were deferred wait out what is left of their backoff first."""
        self._route(rg, ready if loaded is None else self._outcomes.restore(rg, ready, loaded))

    def _on_lease_lost(self, row_groups: set[int] | None) -> None:
        if row_groups is None:
            log.error("the state store keeps failing; stopping (finished work is recorded)")
            self._finish("error")
            return
        self._row_groups.lost(row_groups)

    # -- dispatch -------------------------------------------------------------------------
    def _route(self, rg: RowGroup, out: list[Ready]) -> None:
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
            start(rg, nodes[j], r)
        for limit, lane in self._limited.items():
            while lane:
                rg, j, r = lane[0]
                if rg.dead or (r is not None and rg.tracker.dropped[r]):
                    lane.popleft()
                    continue
                if not limit.try_acquire(nodes[j].max_tokens):  # no permit, or no room in its pace
                    break
                lane.popleft()
                start(rg, nodes[j], r, limit.last_reserved)
        if self._stateful is not None and self._in_flight < self._max_in_flight:
            for j, rg, r in self._stateful.take(self._row_groups.live):
                try:
                    self._stateful.enter(nodes[j], rg.id)
                except Exception as exc:  # load_state_dict() failed: its next values would be wrong
                    self._crash = exc
                    log.error("%s: load_state_dict() failed: %s: %s", nodes[j].name, type(exc).__name__, exc)
                    self._finish("crashed")
                    break
                start(rg, nodes[j], r)
                if self._in_flight >= self._max_in_flight:
                    break

    def _start(self, rg: RowGroup, node: Any, r: int | None, reserved: int | None = None) -> None:
        """Start ``node``'s task on row ``r`` of ``rg`` (None: its batch task). ``reserved`` None:
        it holds a general slot (max_in_flight_tasks); a number: it holds a permit of its
        model's limit, with that many tokens reserved in the model's pace."""
        if reserved is None:
            self._in_flight += 1
        rg.running += 1
        key = (rg.id, node.index, r)
        self._unannounced[key] = [rg.id, node.name, r, node.task_type, False]
        self._running[key] = self._loop.create_task(self._exec(rg, node, r, key, reserved))

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

    def _settle(self, key: TaskKey) -> None:
        entry = self._unannounced.pop(key, None)
        if entry is not None:
            entry[4] = True

    async def _exec(self, rg: RowGroup, node: Any, r: int | None, key: TaskKey, reserved: int | None) -> None:
        trace = None
        if self._trace:
            trace = TaskTrace(node.name, rg.id, r, node.task_type, dispatched_at=time.perf_counter())
            self.traces.append(trace)
        error: BaseException | None = None
        deferred = False
        usage = None
        if reserved is not None:  # a model-limited task: count its calls and tokens
            usage = [0, 0, 0, None, 0]  # see generators.base.task_usage
            task_usage.set(usage)
            self._outcomes.trying(key, node.limit.health)
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
                self._outcomes.cell_done(rg, node, r, value, text, usage)
            else:
                rows = rg.tracker.live_rows()  # snapshot: drops during the await only skip rows
                data = rg.buffer.indexes(rows) if node.reads_indexes else rg.buffer.frame(rows, node.depends_on)
                if trace is not None:
                    trace.started_at = time.perf_counter()
                if node.is_async:
                    result = await node.gen.agenerate(data)
                else:
                    result = await self._loop.run_in_executor(self._pool, node.gen.generate, data)
                self._settle(key)
                self._outcomes.batch_done(rg, node, rows, normalize_batch(node.outputs, result, len(rows), node.name),
                                          usage)
            if trace is not None:
                trace.status = "ok"
        except asyncio.CancelledError:
            if trace is not None:
                trace.status = "cancelled"
            raise
        except Exception as exc:
            self._settle(key)
            error = exc
            deferred = self._outcomes.failed(rg, node, r, exc, usage)
            if trace is not None:
                trace.status = ("rate_limited" if isinstance(exc, ModelRateLimitError)
                                else "deferred" if deferred else "failed")
                trace.error = f"{type(exc).__name__}: {exc}"
        finally:
            if trace is not None:
                trace.finished_at = time.perf_counter()
            del self._running[key]
            self._unannounced.pop(key, None)
            if reserved is None:
                self._in_flight -= 1
            else:
                node.limit.release(rate_limited=isinstance(error, ModelRateLimitError), outage=is_outage(error),
                                   answered=error is None or usage[0] > 0,
                                   error=None if error is None else describe(error),
                                   reserved=reserved, requests=usage[0], tokens=usage[1] + usage[2])
            if node.stateful and not deferred:  # a deferred stateful task keeps its generator
                self._stateful.release(node.index)
            rg.running -= 1
            self._row_groups.finish_if_done(rg)
            self._pump()

    def _requeue(self, due: list[tuple[RowGroup, int, int | None]]) -> None:
        """Deferred tasks that are due go back to their lanes, first: they hold their row group open."""
        nodes = self._nodes
        for rg, j, r in reversed(due):
            node = nodes[j]
            if node.stateful:
                self._stateful.release(j)
                self._stateful.push(j, rg, r)
            elif node.limit is not None:
                self._limited[node.limit].appendleft((rg, j, r))
            else:
                self._ready.appendleft((rg, j, r))
        self._pump()

    def _look_stateful(self) -> tuple[list[dict], dict]:
        """On the writer thread, for the stateful lanes: the row groups, then the generators'
        latest states (in that order: a row group seen finished has its states committed)."""
        groups = self.store.row_groups(self.run_id)
        return groups, (self.store.generator_states(self.run_id) if self._stateful.keeps_state else {})
