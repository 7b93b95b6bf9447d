"""Run, resume and retry: the config checked and the run created (or reopened) in the state
store, then the engine run to its end in this process (:mod:`pipeline.api.jobs`)."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from pipeline import surface
from pipeline.api.jobs import Interrupted, RunResult, Signals, execute, mark_interrupted
from pipeline.api.reads import as_config
from pipeline.api.state import make_home_folder, open_state, require_run_store, validate_run_id
from pipeline.errors import DamagedFileError, PipelineError, RunningLoopError, UnknownColumnError
from pipeline.states import RowGroupState, RunStatus
from pipeline.store.base import ColumnSpec, Lineage, NewRun, Reopened, Store
from pipeline.surface import command

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

__all__ = ["checked_config", "create_run", "leave_run", "open_resume", "plan_change", "refuse_running_loop",
           "reopener", "resume", "retry", "run"]


def _new_run_id(name: str) -> str:
    return f"{name[:40]}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def run(config: PipelineConfig | str | os.PathLike, *, home: str | os.PathLike | None = None,
        db: str | None = None, run_id: str | None = None, num_records: int | None = None,
        progress: Callable[[dict], None] | None = None, on_created: Callable[[str], None] | None = None,
        trace: bool = False, start: bool = True, close_store: bool = True, check_models: bool = True,
        reuse: str | None = None) -> RunResult:
    """Validate ``config``, create the run and run it to the end (or until a signal).
    With ``start=False`` the run is only created (stored ``interrupted``; ``status`` and ``runs``
    give ``started: false`` and say "created, not started"): workers start it.
    ``check_models`` first checks every model endpoint the config uses (pipeline.llm.preflight):
    one that is unreachable or refuses the key or the model raises ModelCheckError, and
    nothing is created. ``reuse``: an earlier run of the same store whose recorded cells the new
    run takes where it would compute them identically (``result.extra["reused"]``: ``{generator:
    records}``; :func:`pipeline.changes.reuse_cells`)."""
    refuse_running_loop("run")
    cfg, graph = checked_config(config, num_records, run_id)
    if reuse is not None:
        validate_run_id(reuse)
        require_run_store(home, db, reuse)
    if check_models and cfg.used_models():
        from pipeline.llm.preflight import preflight

        preflight(cfg)
    home_path, store, rid = create_run(cfg, graph, home, db, run_id, reuse=reuse)
    try:
        with Signals() as signals:
            try:
                make_home_folder(home_path / "runs" / rid, home_path)
                reused = None
                if reuse is not None:
                    from pipeline.changes import reuse_cells
                    from pipeline.fingerprints import fingerprints

                    reused = reuse_cells(store, reuse, rid, cfg, graph, fingerprints(cfg, graph), home_path)
                if on_created is not None:
                    on_created(rid)
                if not start:
                    store.set_run_status(rid, RunStatus.INTERRUPTED)
                    store.unregister_worker(rid)  # created only: `pipeline worker` processes run it
                    return RunResult(rid, "created", extra={"reused": reused})
                result = execute(store, rid, cfg, home_path, progress=progress, trace=trace, graph=graph,
                                  signals=signals)
                result.extra["reused"] = reused
                return result
            except Interrupted as stop:
                return mark_interrupted(store, rid, stop.signum)
    finally:
        if close_store:
            store.close()


def checked_config(config: PipelineConfig | str | os.PathLike, num_records: int | None,
                    run_id: str | None) -> tuple[PipelineConfig, Any]:
    """The validated config (``num_records`` applied) and its graph; the run id checked."""
    from pipeline.graph import build_graph

    cfg = as_config(config)
    if num_records is not None:
        cfg = cfg.with_num_records(num_records)
    if run_id is not None:
        validate_run_id(run_id)
    return cfg, build_graph(cfg)


def create_run(cfg: PipelineConfig, graph: Any, home: str | os.PathLike | None, db: str | None,
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
        # A home that cannot hold run folders (read-only, a file in the way) is refused before
        # the run exists: a PostgreSQL store does not need the home, and would take the run.
        make_home_folder(home_path / "runs", home_path)
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

        new_cfg = as_config(config)
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
    new_cfg = as_config(config)
    require_run_store(home, db, run_id)
    home_path, store = open_state(home, db, read_only=True)
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
    home_path, store, cfg, extra, early, done_before = open_resume(
        run_id, home=home, db=db, repair=repair, accept_changes=accept_changes, before=before, change=change,
        close_store=close_store)
    try:
        if early is not None:
            return early
        with Signals() as signals:
            try:
                result = execute(store, run_id, cfg, home_path, progress=progress, trace=trace,
                                  done_before=done_before, signals=signals)
            except Interrupted as stop:
                result = mark_interrupted(store, run_id, stop.signum)
        result.resumed = True
        result.extra.update(extra)
        return result
    finally:
        leave_run(store, run_id, close_store)


def leave_run(store: Store, run_id: str, close_store: bool = True) -> None:
    """The end of a resume: this process is no longer one of the run's workers."""
    import contextlib

    with contextlib.suppress(PipelineError):
        store.unregister_worker(run_id)
    if close_store:
        store.close()


class Opened(NamedTuple):
    """What :func:`open_resume` gives the engine: ``early`` is the result when there is nothing
    to run; ``done_before`` the done cells per column when this resume began, None when this
    process joins a run other live workers hold (it saves no model calls of its own)."""

    home: Path
    store: Store
    cfg: PipelineConfig
    extra: dict
    early: RunResult | None
    done_before: dict[str, int] | None


def open_resume(run_id: str, *, home: str | os.PathLike | None, db: str | None, repair: bool,
                 accept_changes: bool, before: Callable[[Store, Any, PipelineConfig, Path], RunResult | None] | None,
                 change: Callable[[Store, Any, Path], PipelineConfig] | None = None,
                 close_store: bool = True) -> Opened:
    """Everything resume does before the engine runs (:class:`Opened`). This process is
    registered as a worker of the run (:func:`leave_run` ends that); on an error it is
    unregistered and the store closed."""
    from pipeline.config import config_from_json
    from pipeline.fingerprints import check_changed_files

    validate_run_id(run_id)
    require_run_store(home, db, run_id)
    home_path, store = open_state(home, db)
    try:
        store.get_run(run_id)  # RunNotFoundError before anything is written
        # Registered before the config is read: a config change applied from now on sees this
        # process and is refused; one applied before is in what is read below.
        begins = store.register_worker(run_id)
        # The cells done when the resume began, read at once: a worker registering after this
        # one may record cells of its own before this process has built its generators.
        done_before = ({c: n["done"] for c, n in store.column_counts(run_id).items()} if begins else None)
        info = store.get_run(run_id)
        if change is not None:  # its fingerprints compare every file
            cfg = change(store, info, home_path)
            info = store.get_run(run_id)
        else:
            cfg = config_from_json(info.config, run_id=run_id)
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
                return Opened(home_path, store, cfg, extra, early, done_before)
        counts = store.row_group_counts(run_id)  # row groups not created yet are pending
        if counts[RowGroupState.CHECKPOINTED] == counts["total"]:
            if not repair:  # a stat per file: a complete run whose file is gone is not complete
                from pipeline.file_checks import check_files, damage_message

                damaged = check_files(home_path, store.row_groups(run_id))
                if damaged:
                    raise DamagedFileError(damage_message(run_id, damaged, home_path))
            failed = len(store.failed_tasks(run_id)) if info.status == RunStatus.FAILED else 0
            if failed:  # it ended failed on its error rate: nothing to continue, but not complete
                return Opened(home_path, store, cfg, extra, RunResult(
                    run_id, RunStatus.FAILED, resumed=True, extra={"nothing_left": True},
                    reason=f"nothing is left to run, and {failed:,} task(s) failed for good; "
                           f"{command('retry', run_id)} redoes them"), done_before)
            if info.status != RunStatus.COMPLETE:
                store.set_run_status(run_id, RunStatus.COMPLETE)
            return Opened(home_path, store, cfg, extra, RunResult(run_id, RunStatus.COMPLETE, resumed=True,
                                                                  extra={"already_complete": True, **extra}),
                          done_before)
        return Opened(home_path, store, cfg, extra, None, done_before)
    except BaseException:
        leave_run(store, run_id, close_store)
        raise


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
                     accept_changes=accept_changes, before=reopener(run_id, columns, error, on_reopened, extra),
                     name="retry")
    result.extra.update(extra)
    return result


def reopener(run_id: str, columns: str | list[str] | None, error: str | None,
              on_reopened: Callable[[Reopened], None] | None, extra: dict,
              ) -> Callable[[Store, Any, PipelineConfig, Path], RunResult | None]:
    """retry's step before the engine runs (``open_resume``'s ``before``): reopen the failed
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


