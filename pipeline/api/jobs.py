"""Running the engine in this process: a :class:`Job` (one process's share of a run), the
signals that stop it (:class:`Signals`), its event loop, and the snapshots its progress
callback gets. :mod:`pipeline.api.runs` (sync) and :mod:`pipeline.aio` (on the caller's loop)
drive it; :mod:`pipeline.api.previews` runs one on an in-memory store."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pipeline.errors import PipelineError
from pipeline.states import RunStatus

if TYPE_CHECKING:
    import asyncio

    from pipeline.config import PipelineConfig
    from pipeline.engine.scheduler import RunStats, Scheduler
    from pipeline.llm import LlmRuntime
    from pipeline.store.base import Store

__all__ = ["Interrupted", "Job", "RunResult", "Signals", "execute", "hard_exit", "loop_factory", "mark_interrupted"]


@dataclass
class RunResult:
    """What run, resume and retry return. ``status``: ``complete``, ``failed``, ``interrupted``
    (``signal``: the signal number that stopped it), or ``created`` (``run(start=False)``);
    ``stats``: the engine's counters of this process (None when the engine did not run);
    ``reason``: why a ``failed`` run stopped; ``extra``: what the call adds (``reused``,
    ``repaired``, ``change``, ``reopened``, ``already_complete``, ``nothing_to_retry``)."""

    run_id: str
    status: str  # a RunStatus but running, or "created" (made, not started: stored interrupted)
    signal: int | None = None
    stats: RunStats | None = None
    resumed: bool = False
    reason: str | None = None  # why a 'failed' run stopped (Scheduler.stop_reason)
    extra: dict = field(default_factory=dict)


class Interrupted(BaseException):
    """SIGINT/SIGTERM before the engine runs (a generator's __init__, say): unwinds to the
    caller, which records the run as interrupted. A BaseException, so that user code catching
    Exception cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Signals:
    """SIGINT and SIGTERM from the moment the run exists (CONTRACT section 5): before the engine
    runs they unwind the set-up (:class:`Interrupted`); while it runs, the first stops
    dispatching with a grace period and the second stops at once. Plain ``signal.signal``
    handlers, not the loop's: they run between any two bytecodes of the main thread, so a
    second signal stops the process even when user code blocks the event loop (then, after
    ``HARD_EXIT_S``, the process exits: the store holds a consistent prefix at every moment,
    exactly as after a SIGKILL). Main thread only; elsewhere signals are the caller's."""

    HARD_EXIT_S = 3.0
    #: After the first signal, past the grace period by this much, the process exits anyway:
    #: user code that blocks the event loop cannot hold a stopping run for ever.
    FIRST_SIGNAL_SLACK_S = 5.0

    def __init__(self) -> None:
        self.received: list[int] = []
        self.scheduler: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._previous: dict[int, Any] = {}
        self._timers: list[threading.Timer] = []

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for timer in self._timers:  # stopped in time: no hard exit (pipeline.run in a program)
            timer.cancel()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        scheduler, loop = self.scheduler, self.loop
        if scheduler is None or loop is None:  # still setting up: unwind
            if len(self.received) == 1:
                raise Interrupted(signum)
            return
        if loop.is_closed():  # the engine has finished: nothing left to stop
            return
        immediate = len(self.received) > 1
        loop.call_soon_threadsafe(lambda: scheduler.stop(immediate=immediate))
        if not immediate:  # os.write: safe inside a signal handler, and shown at once
            os.write(2, f"\npipeline: stopping, waiting up to {scheduler.opts.grace_s:g} s for "
                        f"{scheduler.tasks_running} task(s); Ctrl-C again stops at once\n".encode())
        delay = self.HARD_EXIT_S if immediate else scheduler.opts.grace_s + self.FIRST_SIGNAL_SLACK_S
        why = "second signal" if immediate else f"the run did not stop within {delay:g} s of the signal"
        timer = threading.Timer(delay, hard_exit, (self.received[0], why))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)


def hard_exit(signum: int, why: str = "second signal") -> None:
    """End the process now with ``128 + signum``: the store holds a consistent prefix at every
    moment, as after a SIGKILL."""
    sys.stderr.write(f"pipeline: stopped at once ({why}); finished results are recorded\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def mark_interrupted(store: Store, run_id: str, signum: int) -> RunResult:
    """The result of a run stopped by ``signum``; the run is recorded ``interrupted`` unless
    other workers carry on with it."""
    if store.live_workers(run_id) == 0:
        store.set_run_status(run_id, RunStatus.INTERRUPTED)
    return RunResult(run_id, RunStatus.INTERRUPTED, signal=signum)


class Job:
    """One process's share of a run, set up (generators built, scheduler made, run marked
    ``running``) and ready to go: ``main()`` runs the engine on the current event loop,
    ``finish(status)`` records the outcome. :func:`execute` runs it on a loop of its own (the
    sync API and the CLI); :mod:`pipeline.aio` awaits it on the caller's loop.

    The job owns the LLM runtime of its ``llm_*`` columns (``llm``: one HTTP pool and one
    adaptive limit per model alias, shared by those columns; None, and neither pipeline.llm nor
    aiohttp imported, when there are none): made here, handed to the generators as they are
    built, closed when ``main()`` ends, on the loop its pool belongs to."""

    def __init__(self, store: Store, run_id: str, cfg: PipelineConfig, home: Path, *,
                 progress: Callable[[dict], None] | None, trace: bool, done_before: dict[str, int] | None = None,
                 graph: Any = None, signals: Signals | None = None, resumable: bool = True) -> None:
        from pipeline.engine.scheduler import Scheduler, SchedulerOptions
        from pipeline.engine.tracker import Plan
        from pipeline.generators import build_generators, llm_runtime
        from pipeline.graph import build_graph

        self.llm: LlmRuntime | None = llm_runtime(cfg)
        plan = Plan(graph or build_graph(cfg), build_generators(cfg, runtime=self.llm))
        if done_before is not None:  # this process began a resume: the model calls it will not make again
            # Once per resume, not per process: a worker joining the run has no done_before. Cells
            # done when it began and still done now: repair, retry and a config change may have
            # reopened some; cells other workers recorded since do not count.
            counts = store.column_counts(run_id)
            store.add_calls_saved(run_id, {
                (n.model, n.name): min(done_before.get(n.outputs[0], 0), counts[n.outputs[0]]["done"])
                for n in plan.nodes if n.limit is not None})
        options = SchedulerOptions.from_settings(cfg.settings, trace=trace or cfg.settings.trace, resumable=resumable)
        self.store, self.run_id, self.cfg, self.home = store, run_id, cfg, home
        self.plan, self.progress, self.trace = plan, progress, trace
        self.scheduler = Scheduler(plan, store, run_id, num_records=cfg.num_records,
                                   row_group_size=cfg.row_group_size, home=str(home), options=options)
        store.set_run_status(run_id, RunStatus.RUNNING)
        self.traces = None
        if options.trace:
            from pipeline.engine.tracing import TraceWriter

            self.traces = TraceWriter(self.scheduler, store, run_id)
        self.signals = signals or Signals()

    async def main(self) -> str:
        import asyncio

        scheduler, progress, received = self.scheduler, self.progress, self.signals.received
        self.signals.loop = loop = asyncio.get_running_loop()
        self.signals.scheduler = scheduler
        if received:  # a signal came while the engine was being set up
            scheduler.stop(immediate=len(received) > 1)
        reporter = (loop.create_task(_report(scheduler, self.cfg, progress, self.store, self.run_id))
                    if progress else None)
        tracer = loop.create_task(self.traces.run()) if self.traces is not None else None
        try:
            return await scheduler.run()
        finally:
            for task in (reporter, tracer):
                if task is not None:
                    task.cancel()
            if self.llm is not None:  # its HTTP pool belongs to this event loop
                await self.llm.aclose()

    def finish(self, status: str) -> RunResult:
        store, run_id, scheduler, received = self.store, self.run_id, self.scheduler, self.signals.received
        if self.traces is not None:
            self.traces.flush()
        if status in (RunStatus.COMPLETE, RunStatus.FAILED):
            pass  # recorded by the scheduler before this worker left (Scheduler.run)
        elif status == RunStatus.INTERRUPTED and store.live_workers(run_id) > 0:
            pass  # other workers carry on: the run is still running
        else:
            store.set_run_status(run_id, status)
        if self.progress is not None:
            snap = _snapshot(scheduler, self.cfg, final=True)
            snap["run"] = _run_view(store, run_id)
            self.progress(snap)
        return RunResult(run_id, status, signal=received[0] if received else None, stats=scheduler.stats,
                         reason=scheduler.stop_reason)


def execute(store: Store, run_id: str, cfg: PipelineConfig, home: Path, *,
            progress: Callable[[dict], None] | None, trace: bool, done_before: dict[str, int] | None = None,
            graph: Any = None, signals: Signals | None = None) -> RunResult:
    """Set up a :class:`Job` and run it to its end on an event loop of its own (uvloop when
    installed, see :func:`loop_factory`); the run's outcome recorded."""
    import asyncio

    job = Job(store, run_id, cfg, home, progress=progress, trace=trace, done_before=done_before, graph=graph,
               signals=signals)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        status = runner.run(job.main())
    return job.finish(status)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (the default on POSIX): measured 10-20% more tasks per second,
    most on the durable path. ``PIPELINE_EVENT_LOOP=asyncio`` picks the standard loop."""
    if os.environ.get("PIPELINE_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _snapshot(scheduler: Scheduler, cfg: PipelineConfig, final: bool = False) -> dict:
    s = scheduler.stats
    elapsed = max(time.monotonic() - s.started_at, 1e-9)
    per_generator = {n.name: scheduler.records_done[n.index] for n in scheduler.plan.nodes}
    # Records this process finished, judged by the slowest generator; ETA at that pace.
    slowest = min(per_generator.values(), default=0)
    total = cfg.num_records - s.records_dropped
    rate = slowest / elapsed
    eta = (max(total - slowest, 0) / rate) if rate > 0 else None
    models = {n.model: {"limit": n.limit.limit} for n in scheduler.plan.nodes if n.limit is not None}
    return {"per_generator": per_generator, "records_per_s": rate, "eta_s": eta, "tasks_done": s.tasks_done,
            "tasks_failed": s.tasks_failed, "tasks_deferred": s.tasks_deferred,
            "records_dropped": s.records_dropped, "row_groups_checkpointed": s.row_groups_checkpointed,
            "row_groups_total": -(-cfg.num_records // cfg.row_group_size), "elapsed_s": elapsed,
            "tasks_per_s": s.tasks_done / elapsed, "in_flight": scheduler.tasks_running, "final": final,
            "live_row_groups": scheduler.live_row_groups,
            "live": {"in_flight": scheduler.tasks_running, "models": models,
                     "stopping": _stopping_note(scheduler) if not final else None}}


def _stopping_note(scheduler: Scheduler) -> str | None:
    if not scheduler.stopping or scheduler.tasks_running == 0:
        return None
    why = "Ctrl-C again stops at once" if scheduler.stop_reason is None else scheduler.stop_reason
    return (f"stopping: waiting up to {scheduler.opts.grace_s:g} s for {scheduler.tasks_running} task(s) in "
            f"flight to finish; {why}")


def _run_view(store: Store, run_id: str) -> dict[str, Any] | None:
    """The whole run as the store has it (every worker's share): :func:`status`'s dict, read
    without the file checks. None if the store cannot answer now (the snapshot goes on without)."""
    from pipeline.api.reads import status_of

    try:
        return status_of(store, run_id)
    except PipelineError:
        return None


async def _report(scheduler: Scheduler, cfg: PipelineConfig, progress: Callable[[dict], None],
                  store: Store, run_id: str) -> None:
    """Every second: this process's snapshot with the whole run's view under ``"run"`` (read on
    a thread of its own: a query never holds the event loop)."""
    import asyncio

    while True:
        await asyncio.sleep(1.0)
        snap = _snapshot(scheduler, cfg)
        snap["run"] = await asyncio.to_thread(_run_view, store, run_id)
        progress(snap)


