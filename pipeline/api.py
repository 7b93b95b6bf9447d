"""The Python API: run, resume, retry, status, export, load_dataset. The command line calls these.

``home`` (default ``$PIPELINE_HOME`` or ``./.pipeline``) holds the run folders; ``db`` (default
``$PIPELINE_DB`` or ``sqlite:///<home>/state.db``) is the state store, any SQLAlchemy URL of
SQLite or PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pipeline.errors import DamagedFileError, InvalidRunIdError, PipelineError, RunNotFoundError, StoreError, UnknownColumnError
from pipeline.store.base import ColumnSpec, Lineage, NewRun, Reopened, Store

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy.engine import URL

    from pipeline.config import PipelineConfig
    from pipeline.engine.scheduler import RunStats, Scheduler

# The engine, the config models, pandas and pyarrow are imported by the functions that run or
# export: `pipeline status`, `runs` and `sql` start in a fraction of the time without them.

__all__ = ["RunResult", "export", "list_runs", "load_dataset", "open_state", "plan_change", "resume", "retry", "run",
           "status", "validate", "validate_run_id"]

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class RunResult:
    run_id: str
    status: str  # complete | interrupted | failed
    signal: int | None = None
    stats: RunStats | None = None
    resumed: bool = False
    reason: str | None = None  # why a 'failed' run stopped (Scheduler.stop_reason)
    extra: dict = field(default_factory=dict)


def resolve_paths(home: str | os.PathLike | None, db: str | URL | None) -> tuple[Path, URL]:
    """The home folder and the state store's URL. The default store, ``<home>/state.db``, gets a
    URL built from the path (``URL.create``), so that a folder named ``50%20off`` or ``exp?a`` is
    that folder; ``db`` (or ``$PIPELINE_DB``) is parsed as a URL (``%``, ``?`` and ``#`` in a
    path there are written ``%25``, ``%3F``, ``%23``). StoreError for text that is not a URL."""
    from sqlalchemy.engine import URL

    from pipeline.store import parse_url

    home_path = Path(home or os.environ.get("PIPELINE_HOME") or ".pipeline").absolute()
    text = db or os.environ.get("PIPELINE_DB")
    if not text:
        return home_path, URL.create("sqlite", database=str(home_path / "state.db"))
    return home_path, parse_url(text)


def prepare(home: str | os.PathLike | None, db: str | URL | None) -> tuple[Path, URL]:
    """Resolve home and db; create home when the state store is a SQLite file."""
    home_path, url = resolve_paths(home, db)
    if url.get_backend_name() == "sqlite":
        home_path.mkdir(parents=True, exist_ok=True)
    return home_path, url


def open_state(home: str | os.PathLike | None = None, db: str | URL | None = None) -> tuple[Path, Store]:
    """The home folder and the state store (schema upgraded on open)."""
    from pipeline.store import open_store

    home_path, url = prepare(home, db)
    return home_path, open_store(url)


def missing_store(home: str | os.PathLike | None, db: str | URL | None) -> Path | None:
    """The SQLite file of the state store when it does not exist yet, else None. Commands that
    only read answer from this instead of creating an empty store: they change nothing."""
    _, url = resolve_paths(home, db)
    if url.get_backend_name() != "sqlite":
        return None
    from pipeline.store.sqlite import sqlite_file

    path = sqlite_file(url)
    return None if path is None or path.exists() else path


def _require_run_store(home: str | os.PathLike | None, db: str | None, run_id: str) -> None:
    path = missing_store(home, db)
    if path is not None:
        raise RunNotFoundError(f"no run with id {run_id!r}: there is no state store at {path} yet; "
                               f"check --home/--db (`pipeline runs` lists the runs)")


def require_store(home: str | os.PathLike | None, db: str | None) -> None:
    path = missing_store(home, db)
    if path is not None:
        raise StoreError(f"there is no state store at {path} yet; check --home/--db, or start a run first")


def validate_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise InvalidRunIdError(f"invalid run id {run_id!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
                                f"starting with a letter or digit")
    return run_id


def _new_run_id(name: str) -> str:
    return f"{name[:40]}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def run(config: PipelineConfig | str | os.PathLike, *, home: str | os.PathLike | None = None,
        db: str | None = None, run_id: str | None = None, num_records: int | None = None,
        progress: Callable[[dict], None] | None = None, on_created: Callable[[str], None] | None = None,
        trace: bool = False, start: bool = True, close_store: bool = True, check_models: bool = True,
        reuse: str | None = None) -> RunResult:
    """Validate ``config``, create the run and run it to the end (or until a signal).
    With ``start=False`` the run is only created (status ``interrupted``): workers start it.
    ``check_models`` first checks every model endpoint the config uses (pipeline.llm.preflight):
    one that is unreachable or refuses the key or the model raises ModelCheckError, and
    nothing is created. ``reuse``: an earlier run of the same store whose recorded cells the new
    run takes where it would compute them identically (``result.extra["reused"]``: ``{generator:
    records}``; :func:`pipeline.changes.reuse_cells`)."""
    from pipeline.config import PipelineConfig, load_config
    from pipeline.fingerprints import fingerprints
    from pipeline.graph import build_graph

    cfg = config if isinstance(config, PipelineConfig) else load_config(config)
    if num_records is not None:
        cfg = cfg.with_num_records(num_records)
    if run_id is not None:
        validate_run_id(run_id)
    if reuse is not None:
        validate_run_id(reuse)
        _require_run_store(home, db, reuse)
    graph = build_graph(cfg)
    if check_models and cfg.used_models():
        from pipeline.llm.preflight import preflight

        preflight(cfg)
    prints = fingerprints(cfg, graph)
    home_path, store = open_state(home, db)
    try:
        rid = run_id or _new_run_id(cfg.name)
        if reuse is not None:
            store.get_run(reuse)  # RunNotFoundError before anything is created
        store.create_run(NewRun(
            run_id=rid, name=cfg.name, num_records=cfg.num_records, row_group_size=cfg.row_group_size,
            seed=cfg.seed, config=cfg.to_json(), fingerprint=cfg.fingerprint(),
            columns=[ColumnSpec(c, graph.producer[c], graph.by_name[graph.producer[c]].strategy, i)
                     for i, c in enumerate(graph.columns)],
            fingerprints=[(kind, name, digest) for (kind, name), digest in prints.items()]))
        with _Signals() as signals:
            try:
                (home_path / "runs" / rid).mkdir(parents=True, exist_ok=True)
                reused = None
                if reuse is not None:
                    from pipeline.changes import reuse_cells

                    reused = reuse_cells(store, reuse, rid, cfg, graph, prints, home_path)
                if on_created is not None:
                    on_created(rid)
                if not start:
                    store.set_run_status(rid, "interrupted")
                    return RunResult(rid, "created")
                result = _execute(store, rid, cfg, home_path, progress=progress, trace=trace, graph=graph,
                                  signals=signals)
                result.extra["reused"] = reused
                return result
            except _Interrupted as stop:
                return _interrupted(store, rid, stop.signum)
    finally:
        if close_store:
            store.close()


def resume(run_id: str, *, home: str | os.PathLike | None = None, db: str | None = None,
           progress: Callable[[dict], None] | None = None, trace: bool = False,
           close_store: bool = True, repair: bool = False, accept_changes: bool = False,
           config: PipelineConfig | str | os.PathLike | None = None) -> RunResult:
    """Continue a run exactly where it stopped (also: join it as one more worker).

    ``config``: continue it under this config instead (CONTRACT section 11): the change is
    applied first, in one transaction (:func:`pipeline.changes.apply_change`;
    ``result.extra["change"]`` is its :class:`~pipeline.changes.ChangePlan`); RunBusyError,
    changing nothing, while live workers hold the run.

    ``repair``: first check every checkpointed row-group file against the size and SHA-256
    its checkpoint recorded, and compute again the row groups whose file is missing or does
    not match (``result.extra["repaired"]``: ``[{"row_group", "path", "problem"}]``).
    Raises FilesChangedError when a python module or seed file the run reads changed since it
    started, unless ``accept_changes`` (pipeline.fingerprints.check_changed_files)."""
    applied: dict = {}

    def change(store: Store, info: Any, home_path: Path) -> PipelineConfig:
        from pipeline.changes import apply_change

        new_cfg = _load(config)
        applied["change"] = apply_change(store, info, new_cfg, home_path)
        return new_cfg

    result = _resume(run_id, home=home, db=db, progress=progress, trace=trace, close_store=close_store,
                     repair=repair, accept_changes=accept_changes, change=None if config is None else change)
    result.extra.update(applied)
    return result


def _load(config: PipelineConfig | str | os.PathLike) -> PipelineConfig:
    from pipeline.config import PipelineConfig, load_config

    return config if isinstance(config, PipelineConfig) else load_config(config)


def plan_change(run_id: str, config: PipelineConfig | str | os.PathLike, *, home: str | os.PathLike | None = None,
                db: str | None = None) -> Any:
    """What ``resume(run_id, config=config)`` would keep and compute, per column
    (:class:`pipeline.changes.ChangePlan`); changes nothing."""
    from pipeline.changes import plan_change as plan

    validate_run_id(run_id)
    new_cfg = _load(config)
    _require_run_store(home, db, run_id)
    home_path, store = open_state(home, db)
    try:
        return plan(store, store.get_run(run_id), new_cfg, home_path)
    finally:
        store.close()


def _resume(run_id: str, *, home: str | os.PathLike | None, db: str | None,
            progress: Callable[[dict], None] | None, trace: bool, close_store: bool, repair: bool = False,
            accept_changes: bool = False,
            before: Callable[[Store, Any, PipelineConfig, Path], RunResult | None] | None = None,
            change: Callable[[Store, Any, Path], PipelineConfig] | None = None) -> RunResult:
    """resume, and retry: the changed-files check first (nothing changes if it refuses), then
    ``before(store, run info, config, home)``, which may end it with its own result. With
    ``change(store, run info, home)`` (resume --config), that applies the change and gives the
    config to run on instead of the check."""
    from pipeline.config import config_from_json
    from pipeline.fingerprints import check_changed_files

    validate_run_id(run_id)
    _require_run_store(home, db, run_id)
    home_path, store = open_state(home, db)
    try:
        store.get_run(run_id)  # RunNotFoundError before anything is written
        # Registered before the config is read: a config change applied from now on sees this
        # process and is refused; one applied before is in what is read below.
        store.register_worker(run_id)
        info = store.get_run(run_id)
        if change is not None:  # its fingerprints compare every file
            cfg = change(store, info, home_path)
            info = store.get_run(run_id)
        else:
            cfg = config_from_json(info.config)
            # Before anything is changed or computed; also on a complete run (CONTRACT section 9).
            check_changed_files(store, run_id, cfg, accept_changes)
        extra: dict = {}
        if repair:
            from pipeline.dataset import check_files

            damaged = check_files(home_path, store.row_groups(run_id), digest=True)
            reopened = set(store.reopen_row_groups(run_id, [d["row_group"] for d in damaged]))
            extra["repaired"] = [d for d in damaged if d["row_group"] in reopened]
        if before is not None:
            early = before(store, info, cfg, home_path)
            if early is not None:
                return early
        counts = store.row_group_counts(run_id)  # row groups not created yet are pending
        if counts["checkpointed"] == counts["total"]:
            if not repair:  # a stat per file: a complete run whose file is gone is not complete
                from pipeline.dataset import check_files, damage_message

                damaged = check_files(home_path, store.row_groups(run_id))
                if damaged:
                    raise DamagedFileError(damage_message(run_id, damaged))
            failed = len(store.failed_tasks(run_id)) if info.status == "failed" else 0
            if failed:  # it ended failed on its error rate: nothing to continue, but not complete
                return RunResult(run_id, "failed", resumed=True, extra={"nothing_left": True},
                                 reason=f"nothing is left to run, and {failed:,} task(s) failed for good; "
                                        f"`pipeline retry {run_id}` redoes them")
            if info.status != "complete":
                store.set_run_status(run_id, "complete")
            return RunResult(run_id, "complete", resumed=True, extra={"already_complete": True, **extra})
        with _Signals() as signals:
            try:
                result = _execute(store, run_id, cfg, home_path, progress=progress, trace=trace, resumed=True,
                                  signals=signals)
            except _Interrupted as stop:
                result = _interrupted(store, run_id, stop.signum)
        result.resumed = True
        result.extra.update(extra)
        return result
    finally:
        with contextlib.suppress(PipelineError):
            store.unregister_worker(run_id)
        if close_store:
            store.close()


class _Interrupted(BaseException):
    """SIGINT/SIGTERM before the engine runs (a generator's __init__, say): unwinds to the
    caller, which records the run as interrupted. A BaseException, so that user code catching
    Exception cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """SIGINT and SIGTERM from the moment the run exists (CONTRACT section 5): before the engine
    runs they unwind the set-up (:class:`_Interrupted`); while it runs, the first stops
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

    def __enter__(self) -> _Signals:
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
                raise _Interrupted(signum)
            return
        if loop.is_closed():  # the engine has finished: nothing left to stop
            return
        immediate = len(self.received) > 1
        loop.call_soon_threadsafe(lambda: scheduler.stop(immediate=immediate))
        if not immediate:  # os.write: safe inside a signal handler, and shown at once
            os.write(2, f"\npipeline: stopping; in-flight tasks get {scheduler.opts.grace_s:g} s to finish "
                        f"(press Ctrl-C again to stop at once)\n".encode())
        delay = self.HARD_EXIT_S if immediate else scheduler.opts.grace_s + self.FIRST_SIGNAL_SLACK_S
        timer = threading.Timer(delay, _hard_exit, (self.received[0],))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)


def _hard_exit(signum: int) -> None:
    sys.stderr.write("pipeline: stopped at once (second signal); finished results are recorded\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def _interrupted(store: Store, run_id: str, signum: int) -> RunResult:
    if store.live_workers(run_id) == 0:
        store.set_run_status(run_id, "interrupted")
    return RunResult(run_id, "interrupted", signal=signum)


def retry(run_id: str, *, columns: str | list[str] | None = None, error: str | None = None,
          home: str | os.PathLike | None = None, db: str | None = None,
          progress: Callable[[dict], None] | None = None, trace: bool = False, close_store: bool = True,
          on_reopened: Callable[[Reopened], None] | None = None, accept_changes: bool = False) -> RunResult:
    """Reopen the failed tasks of a run, with the records and row groups they dropped, and
    continue it as :func:`resume` does (contract section 9). ``columns``: only the failed tasks
    of these generators (a generator's name or one of its output columns); ``error``: only those
    whose ``last_error`` contains this text. ``on_reopened(Reopened)`` is called before the run
    goes on. When nothing matches, nothing changes: the result has
    ``extra["nothing_to_retry"]``. ``result.extra["reopened"]`` is the
    :class:`~pipeline.store.base.Reopened` summary. UnknownColumnError for a name the run does
    not have; RunNotFoundError for an unknown run."""
    names = [columns] if isinstance(columns, str) else columns
    extra: dict = {}

    def reopen(store: Store, info: Any, cfg: PipelineConfig, home_path: Path) -> RunResult | None:
        from pipeline.dataset import read_row_group
        from pipeline.graph import build_graph

        graph = build_graph(cfg)
        generators = None if names is None else _generators_named(graph, names, run_id)

        def read_file(path: str) -> dict[str, list]:
            try:
                return read_row_group(home_path / path)
            except (OSError, ValueError) as exc:  # pyarrow's errors are OSError/ArrowInvalid (ValueError)
                raise StoreError(f"cannot reopen run {run_id}: its row-group file {home_path / path} "
                                 f"cannot be read ({exc})") from exc

        reopened = store.reopen_failed(run_id, _lineage(graph), generators=generators, error=error,
                                       read_file=read_file)
        if generators is not None or error is not None:
            from pipeline.store.reopen import task_filter

            selected = task_filter(generators, error)
            reopened.left = sum(1 for gen, message in store.failed_tasks(run_id) if selected(gen, message))
        extra["reopened"] = reopened
        if on_reopened is not None:
            on_reopened(reopened)
        if not reopened.tasks:
            return RunResult(run_id, info.status, extra={"reopened": reopened, "nothing_to_retry": True})
        return None

    result = _resume(run_id, home=home, db=db, progress=progress, trace=trace, close_store=close_store,
                     accept_changes=accept_changes, before=reopen)
    result.extra.update(extra)
    return result


def _generators_named(graph: Any, names: list[str], run_id: str) -> set[str]:
    """Generators named by generator or output column name; UnknownColumnError otherwise."""
    out = set()
    for name in names:
        generator = name if name in graph.by_name else graph.producer.get(name)
        if generator is None:
            raise UnknownColumnError(f"run {run_id} has no column or generator {name!r}; its generators: "
                                     f"{', '.join(graph.order)}")
        out.add(generator)
    return out


def _lineage(graph: Any) -> Lineage:
    """The DAG as Store.reopen_failed needs it: transitive upstream and downstream per generator."""
    from pipeline.changes import lineage

    return lineage(graph)


def _execute(store: Store, run_id: str, cfg: PipelineConfig, home: Path, *,
             progress: Callable[[dict], None] | None, trace: bool, resumed: bool = False,
             graph: Any = None, signals: _Signals | None = None) -> RunResult:
    from pipeline.engine.scheduler import Scheduler, SchedulerOptions
    from pipeline.engine.tracker import Plan
    from pipeline.generators import build_generators
    from pipeline.graph import build_graph

    plan = Plan(graph or build_graph(cfg), build_generators(cfg))
    if resumed:  # finished model calls this resume will not make again
        counts = store.column_counts(run_id)
        store.add_calls_saved(run_id, {(n.model, n.name): counts[n.outputs[0]]["done"]
                                       for n in plan.nodes if n.limit is not None})
    options = SchedulerOptions.from_settings(cfg.settings, trace=trace)
    scheduler = Scheduler(plan, store, run_id, num_records=cfg.num_records, row_group_size=cfg.row_group_size,
                          home=str(home), options=options)
    store.set_run_status(run_id, "running")
    signals = signals or _Signals()
    received = signals.received

    async def main() -> str:
        signals.loop = loop = asyncio.get_running_loop()
        signals.scheduler = scheduler
        if received:  # a signal came while the engine was being set up
            scheduler.stop(immediate=len(received) > 1)
        reporter = loop.create_task(_report(scheduler, cfg, progress)) if progress else None
        try:
            return await scheduler.run()
        finally:
            if reporter is not None:
                reporter.cancel()
            llm = sys.modules.get("pipeline.llm")  # loaded only by llm_* columns
            if llm is not None:  # this run's HTTP pools belong to this event loop: close them
                runtimes = {id(r): r for r in (getattr(n.gen, "runtime", None) for n in plan.nodes)
                            if isinstance(r, llm.LlmRuntime)}
                for runtime in runtimes.values():
                    await runtime.aclose()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        status = runner.run(main())
    if trace:
        _write_traces(home / "runs" / run_id / "traces.jsonl", scheduler.traces)
    if status == "interrupted" and store.live_workers(run_id) > 0:
        pass  # other workers carry on: the run is still running
    else:
        store.set_run_status(run_id, status)
    if progress is not None:
        progress(_snapshot(scheduler, cfg, final=True))
    return RunResult(run_id, status, signal=received[0] if received else None, stats=scheduler.stats,
                     reason=scheduler.stop_reason)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (the default on POSIX): measured 10-20% more tasks per second,
    most on the durable path. ``PIPELINE_EVENT_LOOP=asyncio`` picks the standard loop."""
    if os.environ.get("PIPELINE_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _write_traces(path: Path, traces: list) -> None:
    """One JSON object per task attempt: column, row group, row index, type, dispatched /
    started / finished (perf_counter seconds), status and error. Appended across resumes."""
    import dataclasses
    import json

    from pipeline.redact import redact

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for t in traces:
            entry = dataclasses.asdict(t)
            entry["error"] = redact(entry.get("error"))  # the raw message: it may quote a server
            f.write(json.dumps(entry) + "\n")


def _snapshot(scheduler: Scheduler, cfg: PipelineConfig, final: bool = False) -> dict:
    s = scheduler.stats
    elapsed = max(time.monotonic() - s.started_at, 1e-9)
    per_generator = {n.name: scheduler.records_done[n.index] for n in scheduler.plan.nodes}
    # Records this process finished, judged by the slowest generator; ETA at that pace.
    slowest = min(per_generator.values(), default=0)
    total = cfg.num_records - s.records_dropped
    rate = slowest / elapsed
    eta = (max(total - slowest, 0) / rate) if rate > 0 else None
    return {"per_generator": per_generator, "records_per_s": rate, "eta_s": eta,"tasks_done": s.tasks_done, "tasks_failed": s.tasks_failed, "tasks_deferred": s.tasks_deferred,
            "records_dropped": s.records_dropped, "row_groups_checkpointed": s.row_groups_checkpointed,
            "row_groups_total": -(-cfg.num_records // cfg.row_group_size), "elapsed_s": elapsed,
            "tasks_per_s": s.tasks_done / elapsed, "in_flight": scheduler.tasks_running, "final": final,
            "live_row_groups": scheduler.live_row_groups}


async def _report(scheduler: Scheduler, cfg: PipelineConfig, progress: Callable[[dict], None]) -> None:
    while True:
        await asyncio.sleep(1.0)
        progress(_snapshot(scheduler, cfg))


# -- reading ------------------------------------------------------------------------------
def _status_of(store: Store, run_id: str, home: Path | None = None) -> dict[str, Any]:
    info = store.get_run(run_id)
    groups = store.row_group_counts(run_id)  # counted by the store: a run may have 10**9 row groups
    damaged: list[dict] = []
    if home is not None:  # a stat per checkpointed file: missing, or not the size recorded
        from pipeline.dataset import check_files

        damaged = check_files(home, store.row_groups(run_id))
    columns = store.column_counts(run_id)
    state = info.status
    if state == "running" and store.live_workers(run_id) == 0:
        state = "interrupted"  # its process is gone
    done, dropped = groups["records_written"], groups["records_dropped"]
    # Rate: records whose every column is done, per second since the run was created (time it
    # spent interrupted included); the ETA assumes it holds.
    progress_records = min((c["done"] for c in columns.values()), default=0)
    until = info.finished_at if state in ("complete", "failed") and info.finished_at else time.time()
    rate = progress_records / max(until - info.created_at, 1e-6) if progress_records else 0.0
    eta = None
    if state == "running" and rate > 0:
        eta = max(0.0, (info.num_records - progress_records - dropped) / rate)
    elif state == "complete":
        eta = 0.0
    return {
        "run_id": run_id, "name": info.name, "status": state, "num_records": info.num_records,
        "records_done": done, "records_dropped": dropped, "columns": columns,
        "row_groups": {"total": groups["total"], "checkpointed": groups["checkpointed"],
                       "active": groups["active"] + groups["complete"]},
        "rate_records_s": rate, "eta_s": eta, "models": store.model_usage(run_id), "created_at": info.created_at, "updated_at": info.updated_at,
        "finished_at": info.finished_at, "fingerprint": info.fingerprint, "damaged_files": damaged,
        "failures": _failures(store, run_id), "changes": store.run_changes(run_id),
    }


def _failures(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Failed tasks grouped by (column, error class), largest first, with one example message
    each: ``[{"column", "error", "count", "example"}]`` (``column`` is the generator's name)."""
    from pipeline.engine.failures import error_class

    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for generator, message in store.failed_tasks(run_id):
        kind = (generator, error_class(message))
        group = groups.get(kind)
        if group is None:
            groups[kind] = {"column": generator, "error": kind[1], "count": 1, "example": message}
        else:
            group["count"] += 1
    return sorted(groups.values(), key=lambda g: (-g["count"], g["column"], g["error"]))


def status(run_id: str, *, home: str | os.PathLike | None = None, db: str | None = None) -> dict[str, Any]:
    """The same data as ``pipeline status --json``."""
    validate_run_id(run_id)
    _require_run_store(home, db, run_id)
    home_path, store = open_state(home, db)
    try:
        return _status_of(store, run_id, home_path)
    finally:
        store.close()


def list_runs(*, home: str | os.PathLike | None = None, db: str | None = None) -> list[dict[str, Any]]:
    if missing_store(home, db) is not None:
        return []
    _, store = open_state(home, db)
    try:
        out = []
        for info in store.list_runs():
            state = info.status
            if state == "running" and store.live_workers(info.run_id) == 0:
                state = "interrupted"
            out.append({"run_id": info.run_id, "name": info.name, "status": state,
                        "num_records": info.num_records, "created_at": info.created_at})
        return out
    finally:
        store.close()


def load_dataset(run_id: str, *, home: str | os.PathLike | None = None, db: str | None = None) -> pd.DataFrame:
    """The dataset as a DataFrame: records in record order, dropped records left out."""
    validate_run_id(run_id)
    _require_run_store(home, db, run_id)
    from pipeline.dataset import read_dataset

    home_path, store = open_state(home, db)
    try:
        return read_dataset(store, run_id, home_path).to_pandas()
    finally:
        store.close()


def export(run_id: str, output: str | os.PathLike, *, format: str | None = None,
           home: str | os.PathLike | None = None, db: str | None = None) -> dict[str, Any]:
    """Write the dataset to ``output`` (parquet, csv or jsonl; from the suffix by default).
    Returns ``{"records", "complete", "path"}``; an incomplete run exports its checkpointed records."""
    validate_run_id(run_id)
    from pipeline.dataset import FORMATS, read_dataset

    fmt = (format or Path(output).suffix.lstrip(".") or "parquet").lower()
    if fmt not in FORMATS:
        raise PipelineError(f"unknown export format {fmt!r}: use --format parquet, csv or jsonl, "
                            "or an output name ending in .parquet, .csv or .jsonl")
    _require_run_store(home, db, run_id)
    home_path, store = open_state(home, db)
    try:
        dataset = read_dataset(store, run_id, home_path)
    finally:
        store.close()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    dataset.write(out, fmt)
    return {"records": dataset.num_rows, "complete": dataset.complete, "path": str(out), "format": fmt}


def validate(config: PipelineConfig | str | os.PathLike, *, check_models: bool = False) -> dict[str, Any]:
    """Everything ``run`` checks before it creates a run, and nothing created: the config
    (ConfigError), and with ``check_models`` its model endpoints (ModelCheckError). Returns
    ``{"name", "num_records", "columns": [output columns], "models": {alias: {"where", "model",
    "columns", "checked", "warning"}}}`` (models in use only; ``where`` names alias and URL,
    without credentials)."""
    from pipeline.config import PipelineConfig, load_config
    from pipeline.graph import build_graph

    cfg = config if isinstance(config, PipelineConfig) else load_config(config)
    build_graph(cfg)
    checks, models = {}, {}
    if cfg.used_models():
        from pipeline.llm.client import ModelEndpoint
        from pipeline.llm.preflight import preflight

        checks = {c.alias: c for c in preflight(cfg)} if check_models else {}
        models = {alias: {"where": ModelEndpoint.from_config(alias, cfg.models[alias]).where,
                          "model": cfg.models[alias].model, "columns": users, "checked": alias in checks,
                          "warning": checks[alias].warning if alias in checks else None}
                  for alias, users in cfg.used_models().items()}
    return {"name": cfg.name, "num_records": cfg.num_records, "columns": cfg.output_columns(), "models": models}
