"""The Python API: every `pipeline` command is one call of a function here.

``home`` (default ``$PIPELINE_HOME`` or ``./.pipeline``) holds the run folders; ``db`` (default
``$PIPELINE_DB`` or ``sqlite:///<home>/state.db``) is the state store, any SQLAlchemy URL of
SQLite or PostgreSQL. Errors are :class:`~pipeline.errors.PipelineError` subclasses whose
message says what to do (the tree is drawn in :mod:`pipeline.errors`).

Command by command (module: functions):

- :mod:`pipeline.api.runs`: ``run`` :func:`run`; ``resume`` and ``worker`` :func:`resume`
  (``resume --plan``: :func:`plan_change`); ``retry`` :func:`retry`.
- :mod:`pipeline.api.reads`: ``status`` :func:`status`; ``runs`` :func:`list_runs`; ``rm``
  :func:`delete_run`; ``graph`` :func:`graph`; ``validate`` :func:`validate`; and
  :func:`load_dataset`.
- :mod:`pipeline.api.exports`: ``export`` :func:`export`; ``report`` :func:`report`.
- :mod:`pipeline.api.previews`: ``preview`` :func:`compute_preview` (:func:`preview`: its records).
- :mod:`pipeline.api.state`: ``sql`` :func:`query`; ``db upgrade`` :func:`db_upgrade`; ``db
  current`` :func:`db_current`; and :func:`open_state`, where the store is and opening it.

:mod:`pipeline.api.jobs` runs the engine in this process (signals, event loop, progress
snapshots); :mod:`pipeline.aio` has the async twins of run, resume and retry.

The engine, the config models, asyncio, pandas and pyarrow are imported by the functions that
run or export: `pipeline status`, `runs` and `sql` start in a fraction of the time without them
(tests/test_fast_commands.py checks what they import).
"""

from __future__ import annotations

from pipeline.api.exports import export, report
from pipeline.api.jobs import RunResult
from pipeline.api.previews import Preview, compute_preview, preview
from pipeline.api.reads import delete_run, graph, list_runs, load_dataset, status, validate
from pipeline.api.runs import plan_change, refuse_running_loop, resume, retry, run
from pipeline.api.state import (RUN_ID, db_current, db_upgrade, missing_store, open_state, prepare, query,
                                require_store, resolve_paths, validate_run_id)
from pipeline.store.base import Reopened

__all__ = ["RunResult", "db_current", "db_upgrade", "delete_run", "export", "graph", "list_runs", "load_dataset",
           "open_state", "plan_change", "preview", "query", "report", "resume", "retry", "run", "status", "validate",
           "validate_run_id"]
# Also importable from here (the command line and scripts use them; not part of `pipeline.*`):
# Preview, RUN_ID, Reopened, compute_preview, missing_store, prepare, refuse_running_loop,
# require_store, resolve_paths.
