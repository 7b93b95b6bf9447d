"""The async twins of :func:`pipeline.run`, :func:`pipeline.resume` and :func:`pipeline.retry`,
for callers whose event loop is already running (a Jupyter notebook, an async program)::

    result = await pipeline.arun("reviews.yaml")

They take the same arguments and return the same :class:`~pipeline.api.RunResult`; the engine
runs on the caller's loop. Differences from the sync functions:

- No signal handlers are installed: SIGINT/SIGTERM belong to the program that owns the loop.
  Cancelling the awaiting task (a notebook's "interrupt" does) stops the run as a first Ctrl-C
  would: dispatching stops, in-flight tasks get their grace period, every finished result is
  recorded, the run is left ``interrupted`` and resumable, and the CancelledError goes on.
- The set-up (config, model check, store) runs on the loop before the engine starts; it is short,
  but it does block the loop meanwhile (opening the state store, hashing seed files).
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import TYPE_CHECKING, Callable

from pipeline.api.jobs import Job, RunResult, mark_interrupted
from pipeline.api.runs import Opened, checked_config, create_run, leave_run, open_resume, reopener
from pipeline.api.state import make_home_folder

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.config import PipelineConfig
    from pipeline.store.base import Reopened, Store

__all__ = ["aresume", "aretry", "arun"]


async def arun(config: PipelineConfig | str | os.PathLike, *, home: str | os.PathLike | None = None,
               db: str | None = None, run_id: str | None = None, num_records: int | None = None,
               progress: Callable[[dict], None] | None = None, on_created: Callable[[str], None] | None = None,
               trace: bool = False, check_models: bool = True) -> RunResult:
    """As :func:`pipeline.run`, awaited on the running event loop. ConfigError, ModelCheckError,
    RunExistsError before anything is created, as there."""
    cfg, graph = checked_config(config, num_records, run_id)
    if check_models and cfg.used_models():
        from pipeline.llm.preflight import apreflight

        await apreflight(cfg)
    home_path, store, rid = create_run(cfg, graph, home, db, run_id)
    try:
        make_home_folder(home_path / "runs" / rid, home_path)
        if on_created is not None:
            on_created(rid)
        return await _engine(store, rid, cfg, home_path, progress=progress, trace=trace, graph=graph)
    finally:
        store.close()


async def aresume(run_id: str, *, home: str | os.PathLike | None = None, db: str | None = None,
                  progress: Callable[[dict], None] | None = None, trace: bool = False, repair: bool = False,
                  accept_changes: bool = False) -> RunResult:
    """As :func:`pipeline.resume`, awaited on the running event loop."""
    opened = open_resume(run_id, home=home, db=db, repair=repair, accept_changes=accept_changes, before=None)
    return await _continue(opened, run_id, progress=progress, trace=trace)


async def aretry(run_id: str, *, columns: str | list[str] | None = None, error: str | None = None,
                 home: str | os.PathLike | None = None, db: str | None = None,
                 progress: Callable[[dict], None] | None = None, trace: bool = False,
                 on_reopened: Callable[[Reopened], None] | None = None, accept_changes: bool = False) -> RunResult:
    """As :func:`pipeline.retry`, awaited on the running event loop."""
    reopened: dict = {}
    opened = open_resume(run_id, home=home, db=db, repair=False, accept_changes=accept_changes,
                         before=reopener(run_id, columns, error, on_reopened, reopened))
    result = await _continue(opened, run_id, progress=progress, trace=trace)
    result.extra.update(reopened)
    return result


async def _continue(opened: Opened, run_id: str, *, progress: Callable[[dict], None] | None,
                    trace: bool) -> RunResult:
    home_path, store, cfg, extra, early, done_before = opened
    try:
        if early is not None:
            return early
        result = await _engine(store, run_id, cfg, home_path, progress=progress, trace=trace,
                               done_before=done_before)
        result.resumed = True
        result.extra.update(extra)
        return result
    finally:
        leave_run(store, run_id)


async def _engine(store: Store, run_id: str, cfg: PipelineConfig, home_path: Path, *,
                  progress: Callable[[dict], None] | None, trace: bool, done_before: dict[str, int] | None = None,
                  graph: object = None) -> RunResult:
    job = Job(store, run_id, cfg, home_path, progress=progress, trace=trace, done_before=done_before, graph=graph)
    try:
        status = await job.main()
    except asyncio.CancelledError:
        # The scheduler has stopped on its way out (grace period, results recorded, leases
        # given back); the run stays resumable, as after a first Ctrl-C.
        mark_interrupted(store, run_id, signal.SIGINT)
        raise
    return job.finish(status)
