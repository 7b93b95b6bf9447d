"""The Python API: run, resume, retry, status, export, load_dataset. The command line calls these.

``home`` (default ``$PIPELINE_HOME`` or ``./.pipeline``) holds the run folders; ``db`` (default
``$PIPELINE_DB`` or ``sqlite:///<home>/state.db``) is the state store, any SQLAlchemy URL of
SQLite or PostgreSQL.
"""

from __future__ import annotations

import json
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

from pipeline.errors import (DamagedFileError, ExportError, InvalidRunIdError, PipelineError, RunNotFoundError, RunningLoopError,
                             StoreError, UnknownColumnError)
from pipeline.store.base import ColumnSpec, Lineage, NewRun, Reopened, Store
from pipeline import surface
from pipeline.surface import command, flag

if TYPE_CHECKING:
    import asyncio

    import pandas as pd
    from sqlalchemy.engine import URL

    from pipeline.config import PipelineConfig
    from pipeline.engine.scheduler import RunStats, Scheduler

# The engine, the config models, asyncio, pandas and pyarrow are imported by the functions that
# run or export: `pipeline status`, `runs` and `sql` start in a fraction of the time without them
# (tests/test_fast_commands.py checks what `status` imports).

__all__ = ["RunResult", "delete_run", "export", "list_runs", "load_dataset", "open_state", "plan_change", "report",
           "resume", "retry", "run", "status", "validate", "validate_run_id"]

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
    """The home folder and the state store (a SQLite file upgraded on open; a PostgreSQL database
    at an older revision refused: see pipeline.store.open_store)."""
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
                               f"check {flag('--home/--db', 'home=/db=')} ({flag('`pipeline runs`', '`pipeline.list_runs()`')} "
                               "lists the runs)")


def require_store(home: str | os.PathLike | None, db: str | None) -> None:
    path = missing_store(home, db)
    if path is not None:
        raise StoreError(f"there is no state store at {path} yet; check {flag('--home/--db', 'home=/db=')}, "
                         "or start a run first")


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
    refuse_running_loop("run")
    cfg, graph = _checked_config(config, num_records, run_id)
    if reuse is not None:
        validate_run_id(reuse)
        _require_run_store(home, db, reuse)
    if check_models and cfg.used_models():
        from pipeline.llm.preflight import preflight

        preflight(cfg)
    home_path, store, rid = _create_run(cfg, graph, home, db, run_id, reuse=reuse)
    try:
        with _Signals() as signals:
            try:
                (home_path / "runs" / rid).mkdir(parents=True, exist_ok=True)
                reused = None
                if reuse is not None:
                    from pipeline.changes import reuse_cells
                    from pipeline.fingerprints import fingerprints

                    reused = reuse_cells(store, reuse, rid, cfg, graph, fingerprints(cfg, graph), home_path)
                if on_created is not None:
                    on_created(rid)
                if not start:
                    store.set_run_status(rid, "interrupted")
                    store.unregister_worker(rid)  # created only: `pipeline worker` processes run it
                    return RunResult(rid, "created", extra={"reused": reused})
                result = _execute(store, rid, cfg, home_path, progress=progress, trace=trace, graph=graph,
                                  signals=signals)
                result.extra["reused"] = reused
                return result
            except _Interrupted as stop:
                return _interrupted(store, rid, stop.signum)
    finally:
        if close_store:
            store.close()


def _checked_config(config: PipelineConfig | str | os.PathLike, num_records: int | None,
                    run_id: str | None) -> tuple[PipelineConfig, Any]:
    """The validated config (``num_records`` applied) and its graph; the run id checked."""
    from pipeline.graph import build_graph

    cfg = _load(config)
    if num_records is not None:
        cfg = cfg.with_num_records(num_records)
    if run_id is not None:
        validate_run_id(run_id)
    return cfg, build_graph(cfg)


def _load(config: PipelineConfig | str | os.PathLike) -> PipelineConfig:
    from pipeline.config import PipelineConfig, load_config

    return config if isinstance(config, PipelineConfig) else load_config(config)


def _create_run(cfg: PipelineConfig, graph: Any, home: str | os.PathLike | None, db: str | None,
                run_id: str | None, reuse: str | None = None) -> tuple[Path, Store, str]:
    """Create the run in the store: ``(home, store, run id)``. RunExistsError for a taken id;
    RunNotFoundError, creating nothing, when ``reuse`` names no run."""
    from pipeline.errors import RunExistsError
    from pipeline.fingerprints import fingerprints

    prints = fingerprints(cfg, graph)
    home_path, store = open_state(home, db)
    rid = run_id or _new_run_id(cfg.name)
    try:
        if reuse is not None:
            store.get_run(reuse)  # RunNotFoundError before anything is created
        store.create_run(NewRun(
            run_id=rid, name=cfg.name, num_records=cfg.num_records, row_group_size=cfg.row_group_size,
            seed=cfg.seed, config=cfg.to_json(), fingerprint=cfg.fingerprint(),
            columns=[ColumnSpec(c, graph.producer[c], graph.by_name[graph.producer[c]].strategy, i)
                     for i, c in enumerate(graph.columns)],
            fingerprints=[(kind, name, digest) for (kind, name), digest in prints.items()]))
        # This process is the run's worker from its first moment: `pipeline rm` of a run whose
        # generators are still being built is refused, not carried out under its feet.
        store.register_worker(rid)
    except RunExistsError as exc:
        store.close()
        if surface.CLI:
            raise
        raise RunExistsError(f"a run with id {rid!r} exists already; pass another run_id= (or none: a new id "
                             f"is made), or continue it with pipeline.resume({rid!r})") from exc
    except BaseException:
        store.close()
        raise
    return home_path, store, rid


def refuse_running_loop(name: str) -> None:
    """RunningLoopError when an event loop is running in this thread (Jupyter, an async
    program): the sync API runs a loop of its own, which cannot start there. Called first,
    before anything is created."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RunningLoopError(
        f"pipeline.{name}() cannot run inside a running event loop (a Jupyter notebook, an async program): "
        f"use `await pipeline.a{name}(...)` there, or call it in a thread "
        f"(`await asyncio.to_thread(pipeline.{name}, ...)`); nothing was created or changed")


def resume(run_id: str, *, home: str | os.PathLike | None = None, db: str | None = None,
           progress: Callable[[dict], None] | None = None, trace: bool = False,
           close_store: bool = True, repair: bool = False, accept_changes: bool = False,
           config: PipelineConfig | str | os.PathLike | None = None) -> RunResult:
    """Continue a run exactly where it stopped (also: join it as one more worker).

    ``config``: continue it under this config instead (CONTRACT section 11): the change is
    applied first, in one transaction (:func:`pipeline.changes.apply_change`;
    ``result.extra["change"]`` is its :class:`~pipeline.changes.ChangePlan`); RunInUseError,
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
            change: Callable[[Store, Any, Path], PipelineConfig] | None = None,
            name: str = "resume") -> RunResult:
    """resume, and retry: the changed-files check first (nothing changes if it refuses), then
    ``before(store, run info, config, home)``, which may end it with its own result. With
    ``change(store, run info, home)`` (resume --config), that applies the change and gives the
    config to run on instead of the check."""
    refuse_running_loop(name)
    home_path, store, cfg, extra, early = _open_resume(run_id, home=home, db=db, repair=repair,
                                                       accept_changes=accept_changes, before=before,
                                                       change=change, close_store=close_store)
    try:
        if early is not None:
            return early
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
        _leave(store, run_id, close_store)


def _leave(store: Store, run_id: str, close_store: bool = True) -> None:
    """The end of a resume: this process is no longer one of the run's workers."""
    import contextlib

    with contextlib.suppress(PipelineError):
        store.unregister_worker(run_id)
    if close_store:
        store.close()


def _open_resume(run_id: str, *, home: str | os.PathLike | None, db: str | None, repair: bool,
                 accept_changes: bool, before: Callable[[Store, Any, PipelineConfig, Path], RunResult | None] | None,
                 change: Callable[[Store, Any, Path], PipelineConfig] | None = None,
                 close_store: bool = True) -> tuple[Path, Store, PipelineConfig, dict, RunResult | None]:
    """Everything resume does before the engine runs: ``(home, store, config, extra, early)``;
    ``early`` is the result when there is nothing to run. This process is registered as a
    worker of the run (:func:`_leave` ends that); on an error it is unregistered and the store
    closed."""
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
            from pipeline.file_checks import check_files

            damaged = check_files(home_path, store.row_groups(run_id), digest=True)
            reopened = set(store.reopen_row_groups(run_id, [d["row_group"] for d in damaged]))
            extra["repaired"] = [d for d in damaged if d["row_group"] in reopened]
        if before is not None:
            early = before(store, info, cfg, home_path)
            if early is not None:
                return home_path, store, cfg, extra, early
        counts = store.row_group_counts(run_id)  # row groups not created yet are pending
        if counts["checkpointed"] == counts["total"]:
            if not repair:  # a stat per file: a complete run whose file is gone is not complete
                from pipeline.file_checks import check_files, damage_message

                damaged = check_files(home_path, store.row_groups(run_id))
                if damaged:
                    raise DamagedFileError(damage_message(run_id, damaged))
            failed = len(store.failed_tasks(run_id)) if info.status == "failed" else 0
            if failed:  # it ended failed on its error rate: nothing to continue, but not complete
                return home_path, store, cfg, extra, RunResult(
                    run_id, "failed", resumed=True, extra={"nothing_left": True},
                    reason=f"nothing is left to run, and {failed:,} task(s) failed for good; "
                           f"{command('retry', run_id)} redoes them")
            if info.status != "complete":
                store.set_run_status(run_id, "complete")
            return home_path, store, cfg, extra, RunResult(run_id, "complete", resumed=True,
                                                           extra={"already_complete": True, **extra})
        return home_path, store, cfg, extra, None
    except BaseException:
        _leave(store, run_id, close_store)
        raise


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
            os.write(2, f"\npipeline: stopping, waiting up to {scheduler.opts.grace_s:g} s for "
                        f"{scheduler.tasks_running} task(s); Ctrl-C again stops at once\n".encode())
        delay = self.HARD_EXIT_S if immediate else scheduler.opts.grace_s + self.FIRST_SIGNAL_SLACK_S
        why = "second signal" if immediate else f"the run did not stop within {delay:g} s of the signal"
        timer = threading.Timer(delay, _hard_exit, (self.received[0], why))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)


def _hard_exit(signum: int, why: str = "second signal") -> None:
    sys.stderr.write(f"pipeline: stopped at once ({why}); finished results are recorded\n")
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
    extra: dict = {}
    result = _resume(run_id, home=home, db=db, progress=progress, trace=trace, close_store=close_store,
                     accept_changes=accept_changes, before=_reopener(run_id, columns, error, on_reopened, extra),
                     name="retry")
    result.extra.update(extra)
    return result


def _reopener(run_id: str, columns: str | list[str] | None, error: str | None,
              on_reopened: Callable[[Reopened], None] | None, extra: dict,
              ) -> Callable[[Store, Any, PipelineConfig, Path], RunResult | None]:
    """retry's step before the engine runs (``_open_resume``'s ``before``): reopen the failed
    tasks; ``extra["reopened"]`` gets the summary."""
    names = [columns] if isinstance(columns, str) else columns

    def reopen(store: Store, info: Any, cfg: PipelineConfig, home_path: Path) -> RunResult | None:
        from pipeline.changes import file_reader
        from pipeline.graph import build_graph

        graph = build_graph(cfg)
        generators = None if names is None else _generators_named(graph, names, run_id)
        reopened = store.reopen_failed(run_id, _lineage(graph), generators=generators, error=error,
                                       read_file=file_reader(home_path, run_id))
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

    return reopen


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


class _Job:
    """One process's share of a run, set up (generators built, scheduler made, run marked
    ``running``) and ready to go: ``main()`` runs the engine on the current event loop,
    ``finish(status)`` records the outcome. :func:`_execute` runs it on a loop of its own (the
    sync API and the CLI); :mod:`pipeline.aio` awaits it on the caller's loop."""

    def __init__(self, store: Store, run_id: str, cfg: PipelineConfig, home: Path, *,
                 progress: Callable[[dict], None] | None, trace: bool, resumed: bool = False,
                 graph: Any = None, signals: _Signals | None = None) -> None:
        from pipeline.engine.scheduler import Scheduler, SchedulerOptions
        from pipeline.engine.tracker import Plan
        from pipeline.generators import build_generators
        from pipeline.graph import build_graph

        plan = Plan(graph or build_graph(cfg), build_generators(cfg))
        if resumed:  # finished model calls this resume will not make again
            counts = store.column_counts(run_id)
            store.add_calls_saved(run_id, {(n.model, n.name): counts[n.outputs[0]]["done"]
                                           for n in plan.nodes if n.limit is not None})
        options = SchedulerOptions.from_settings(cfg.settings, trace=trace or cfg.settings.trace)
        self.store, self.run_id, self.cfg, self.home = store, run_id, cfg, home
        self.plan, self.progress, self.trace = plan, progress, trace
        self.scheduler = Scheduler(plan, store, run_id, num_records=cfg.num_records,
                                   row_group_size=cfg.row_group_size, home=str(home), options=options)
        store.set_run_status(run_id, "running")
        self.traces = None
        if options.trace:
            from pipeline.engine.tracing import TraceWriter

            self.traces = TraceWriter(self.scheduler, store, run_id)
        self.signals = signals or _Signals()

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
            llm = sys.modules.get("pipeline.llm")  # loaded only by llm_* columns
            if llm is not None:  # this run's HTTP pools belong to this event loop: close them
                runtimes = {id(r): r for r in (getattr(n.gen, "runtime", None) for n in self.plan.nodes)
                            if isinstance(r, llm.LlmRuntime)}
                for runtime in runtimes.values():
                    await runtime.aclose()

    def finish(self, status: str) -> RunResult:
        store, run_id, scheduler, received = self.store, self.run_id, self.scheduler, self.signals.received
        if self.traces is not None:
            self.traces.flush()
        if status == "interrupted" and store.live_workers(run_id) > 0:
            pass  # other workers carry on: the run is still running
        else:
            store.set_run_status(run_id, status)
        if self.progress is not None:
            snap = _snapshot(scheduler, self.cfg, final=True)
            snap["run"] = _run_view(store, run_id)
            self.progress(snap)
        return RunResult(run_id, status, signal=received[0] if received else None, stats=scheduler.stats,
                         reason=scheduler.stop_reason)


def _execute(store: Store, run_id: str, cfg: PipelineConfig, home: Path, *,
             progress: Callable[[dict], None] | None, trace: bool, resumed: bool = False,
             graph: Any = None, signals: _Signals | None = None) -> RunResult:
    import asyncio

    job = _Job(store, run_id, cfg, home, progress=progress, trace=trace, resumed=resumed, graph=graph,
               signals=signals)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        status = runner.run(job.main())
    return job.finish(status)


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
    try:
        return _status_of(store, run_id)
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


# -- reading ------------------------------------------------------------------------------
def _status_of(store: Store, run_id: str, home: Path | None = None) -> dict[str, Any]:
    info = store.get_run(run_id)
    groups = store.row_group_counts(run_id)  # counted by the store: a run may have 10**9 row groups
    damaged: list[dict] = []
    if home is not None:  # a stat per checkpointed file: missing, or not the size recorded
        from pipeline.file_checks import check_files

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
    from pipeline.costs import add_costs

    out = {
        "run_id": run_id, "name": info.name, "status": state, "num_records": info.num_records,
        "records_done": done, "records_dropped": dropped, "columns": columns,
        "row_groups": {"total": groups["total"], "checkpointed": groups["checkpointed"],
                       "active": groups["active"] + groups["complete"]},
        "rate_records_s": rate, "eta_s": eta, "models": store.model_usage(run_id), "created_at": info.created_at, "updated_at": info.updated_at,
        "finished_at": info.finished_at, "fingerprint": info.fingerprint, "damaged_files": damaged,
        "failures": _failures(store, run_id), "leases": store.leases(run_id), "changes": store.run_changes(run_id),
    }
    add_costs(out, info.config)  # models.<alias>.projected_cost and "cost": {"spent", "projected"}
    return out


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
    """The runs in the state store, newest first: ``[{"run_id", "name", "status", "num_records",
    "created_at" (Unix seconds), "records_done" (written), "records_dropped"}]`` (the counts as
    in ``status``). No state store yet: ``[]``, and nothing is created."""
    if missing_store(home, db) is not None:
        return []
    _, store = open_state(home, db)
    try:
        counts = store.record_counts()
        out = []
        for info in store.list_runs():
            state = info.status
            if state == "running" and store.live_workers(info.run_id) == 0:
                state = "interrupted"
            written, dropped = counts.get(info.run_id, (0, 0))
            out.append({"run_id": info.run_id, "name": info.name, "status": state,
                        "num_records": info.num_records, "created_at": info.created_at,
                        "records_done": written, "records_dropped": dropped})
        return out
    finally:
        store.close()


def delete_run(run_id: str, *, home: str | os.PathLike | None = None, db: str | None = None) -> dict[str, Any]:
    """Delete a run: its rows in every table of the state store (one transaction), then its
    folder ``<home>/runs/<run_id>``. Returns ``{"run_id", "rows": {table: rows deleted},
    "folder": the folder removed, or None}``. RunInUseError (nothing deleted) while the run has a
    live worker or lease; RunNotFoundError for an unknown id."""
    import shutil

    validate_run_id(run_id)
    _require_run_store(home, db, run_id)
    home_path, store = open_state(home, db)
    try:
        rows = store.delete_run(run_id)
    finally:
        store.close()
    folder = home_path / "runs" / run_id
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        folder = None
    except OSError as exc:
        raise StoreError(f"run {run_id} was deleted from the state store, but its folder {folder} could not be "
                         f"removed ({exc}); remove it by hand") from exc
    return {"run_id": run_id, "rows": rows, "folder": None if folder is None else str(folder)}


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


def export(run_id: str, output: str | os.PathLike, *, format: str | None = None, card: bool = False,
           home: str | os.PathLike | None = None, db: str | None = None) -> dict[str, Any]:
    """Write the dataset to ``output`` (parquet, csv or jsonl; from the suffix by default).
    Returns ``{"records", "complete", "path", "format"}``; an incomplete run exports its
    checkpointed records. With ``card``, ``output`` is a folder: the data goes to
    ``data/train.<format>`` in it (parquet by default) and a Hugging Face dataset card to
    ``README.md`` (:mod:`pipeline.card`); ``"card"`` in the result is its path."""
    validate_run_id(run_id)
    from pipeline.dataset import FORMATS, read_dataset

    if card:
        return _export_card(run_id, Path(output), (format or "parquet").lower(), home, db)
    fmt = (format or Path(output).suffix.lstrip(".") or "parquet").lower()
    if fmt not in FORMATS:
        raise PipelineError(f"unknown export format {fmt!r}: use {flag('--format', 'format=')} parquet, csv or jsonl, "
                            "or an output name ending in .parquet, .csv or .jsonl")
    _require_run_store(home, db, run_id)
    home_path, store = open_state(home, db)
    try:
        dataset = read_dataset(store, run_id, home_path)
    finally:
        store.close()
    out = Path(output)
    _make_folder(out.parent)
    dataset.write(out, fmt)
    return {"records": dataset.num_rows, "complete": dataset.complete, "path": str(out), "format": fmt}


def _make_folder(folder: Path) -> None:
    """The output's folder, made if needed; ExportError (exit 2) when it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"could not make the folder {folder}: {exc}; nothing was written") from exc


def _export_card(run_id: str, folder: Path, fmt: str, home: Any, db: Any) -> dict[str, Any]:
    from pipeline import card
    from pipeline.config import PipelineConfig
    from pipeline.dataset import FORMATS, read_dataset
    from pipeline.graph import build_graph

    if fmt not in FORMATS:
        raise PipelineError(f"unknown export format {fmt!r}: use --format parquet, csv or jsonl")
    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"--card writes a folder, and {folder} is a file: name a folder (new or existing)")
    _require_run_store(home, db, run_id)
    home_path, store = open_state(home, db)
    try:
        dataset = read_dataset(store, run_id, home_path)
        info = store.get_run(run_id)
        state = _status_of(store, run_id)
    finally:
        store.close()
    # The stored config as it is (its modules were folded in when the run started): no module
    # is imported and no seed file read to describe it.
    raw = json.loads(info.config)
    cfg = PipelineConfig.model_validate({**raw, "base_dir": raw.get("base_dir") or os.getcwd()})
    graph = build_graph(cfg)
    generator_of = {out: column for column in cfg.columns for out in column.outputs}
    data_rel = card.DATA_FILE.format(fmt=fmt)
    data_path = folder / data_rel
    _make_folder(data_path.parent)
    dataset.write(data_path, fmt)
    columns = [{"name": name, "type": generator_of[name].type, "generator": generator_of[name].name}
               for name in dataset.columns]
    text = card.card_text(status=state, config_json=info.config, schema=dataset.to_arrow().schema,
                          records=dataset.num_rows, data_path=data_rel, data_bytes=data_path.stat().st_size,
                          mermaid=graph.to_mermaid(), columns=columns)
    readme = folder / "README.md"
    tmp = folder / f".README.md.{os.getpid()}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, readme)
    except OSError as exc:
        raise ExportError(f"could not write {readme}: {exc}") from exc
    return {"records": dataset.num_rows, "complete": dataset.complete, "path": str(data_path), "format": fmt,
            "card": str(readme)}


def report(run_id: str, output: str | os.PathLike, *, format: str | None = None,
           home: str | os.PathLike | None = None, db: str | None = None) -> dict[str, Any]:
    """Draw the traced run's report (:mod:`pipeline.reporting`) to ``output``: PNG, SVG, HTML, or
    with ``format="json"`` the series it is drawn from. Returns ``{"path", "format",
    "attempts", "invocations"}``. PipelineError when the run was not traced or the format is
    unknown; works on a run still going."""
    validate_run_id(run_id)
    from pipeline import reporting

    fmt = (format or Path(output).suffix.lstrip(".")).lower()
    if fmt not in reporting.FORMATS:
        raise PipelineError(f"unknown report format {fmt!r}: name the output FILE.png, FILE.svg or FILE.html, "
                            f"or pass --format {'|'.join(reporting.FORMATS)}")
    _require_run_store(home, db, run_id)
    _, store = open_state(home, db)
    try:
        data = reporting.series(store, run_id)
    finally:
        store.close()
    path = reporting.draw(data, output, fmt)
    return {"path": str(path), "format": fmt, "attempts": sum(len(v) for v in data["lanes"].values()),
            "invocations": len(data["invocations"])}


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

        from pipeline.threads import off_the_loop  # a notebook may call validate inside its loop

        checks = {c.alias: c for c in off_the_loop(preflight, cfg)} if check_models else {}
        models = {alias: {"where": ModelEndpoint.from_config(alias, cfg.models[alias]).where,
                          "model": cfg.models[alias].model, "columns": users, "checked": alias in checks,
                          "warning": checks[alias].warning if alias in checks else None}
                  for alias, users in cfg.used_models().items()}
    return {"name": cfg.name, "num_records": cfg.num_records, "columns": cfg.output_columns(), "models": models}
