"""What the API reads about runs: status, list_runs, load_dataset, and delete_run; and what it
says about a config without running it: validate, graph. Quick to import: the config models,
pandas and pyarrow load inside the functions that need them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.api.state import missing_store, open_state, require_run_store, validate_run_id
from pipeline.errors import PipelineError, StoreError
from pipeline.states import RowGroupState, RunStatus
from pipeline.surface import flag

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.config import PipelineConfig
    from pipeline.store.base import Store

__all__ = ["as_config", "delete_run", "failures_of", "graph", "list_runs", "load_dataset", "shown_status", "status",
           "status_of", "validate"]


def as_config(config: PipelineConfig | str | os.PathLike) -> PipelineConfig:
    """``config`` itself, or the config loaded from that path (ConfigError when it is wrong)."""
    from pipeline.config import PipelineConfig, load_config

    return config if isinstance(config, PipelineConfig) else load_config(config)


def status_of(store: Store, run_id: str, home: Path | None = None) -> dict[str, Any]:
    """:func:`status`'s dict, read from an open store; with ``home``, every checkpointed
    row-group file is also looked at (``damaged_files``)."""
    info = store.get_run(run_id)
    groups = store.row_group_counts(run_id)  # counted by the store: a run may have 10**9 row groups
    damaged: list[dict] = []
    if home is not None:  # a stat per checkpointed file: missing, or not the size recorded
        from pipeline.file_checks import check_files

        damaged = check_files(home, store.row_groups(run_id))
    columns = store.column_counts(run_id)
    state, started = shown_status(store, info, groups)
    if state != info.status and state != RunStatus.INTERRUPTED:  # it ended while being read:
        return status_of(store, run_id, home)  # read again, all of it from the ended run
    done, dropped = groups["records_written"], groups["records_dropped"]
    # Rate: records whose every column is done, per second since the run was created (time it
    # spent interrupted included); the ETA assumes it holds.
    progress_records = min((c["done"] for c in columns.values()), default=0)
    until = info.finished_at if state in (RunStatus.COMPLETE, RunStatus.FAILED) and info.finished_at else time.time()
    rate = progress_records / max(until - info.created_at, 1e-6) if progress_records else 0.0
    eta = None
    if state == RunStatus.RUNNING and rate > 0:
        eta = max(0.0, (info.num_records - progress_records - dropped) / rate)
    elif state == RunStatus.COMPLETE:
        eta = 0.0
    from pipeline.costs import add_costs

    out = {
        "run_id": run_id, "name": info.name, "status": state, "started": started, "num_records": info.num_records,
        "records_done": done, "records_dropped": dropped, "columns": columns,
        "row_groups": {"total": groups["total"], "checkpointed": groups[RowGroupState.CHECKPOINTED],
                       "active": groups[RowGroupState.ACTIVE] + groups[RowGroupState.COMPLETE]},
        "rate_records_s": rate, "eta_s": eta, "models": store.model_usage(run_id), "created_at": info.created_at, "updated_at": info.updated_at,
        "finished_at": info.finished_at, "fingerprint": info.fingerprint, "damaged_files": damaged,
        "failures": failures_of(store, run_id), "leases": store.leases(run_id), "changes": store.run_changes(run_id),
    }
    add_costs(out, info.config)  # models.<alias>.projected_cost and "cost": {"spent", "projected"}
    return out


def shown_status(store: Store, info: Any, groups: dict[str, int] | None = None) -> tuple[RunStatus, bool]:
    """``(status, started)`` as ``status`` and ``runs`` show a run: a ``running`` run with no live
    worker is ``interrupted`` (its process is gone); ``started`` is False for an ``interrupted``
    run no worker has claimed a row group of yet (``run --create-only``, ``run(start=False)``,
    or stopped while its generators were being built): the store has no status of its own for
    it, so the JSON keeps ``interrupted`` and the text says "created, not started".
    ``groups``: :meth:`Store.row_group_counts`, when the caller has them."""
    state = info.status
    if state == RunStatus.RUNNING and store.live_workers(info.run_id) == 0:
        # Its process is gone, or the run ended between the two reads: the last worker records
        # the final status before it leaves, so a status read now is the ended run's.
        state = store.get_run(info.run_id).status
        if state == RunStatus.RUNNING:
            state = RunStatus.INTERRUPTED
    if state != RunStatus.INTERRUPTED:
        return state, True
    groups = groups or store.row_group_counts(info.run_id)  # row groups not created yet count as pending
    return state, groups[RowGroupState.PENDING] < groups["total"]


def failures_of(store: Store, run_id: str) -> list[dict[str, Any]]:
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
    require_run_store(home, db, run_id)
    home_path, store = open_state(home, db, read_only=True)
    try:
        return status_of(store, run_id, home_path)
    finally:
        store.close()


def list_runs(*, home: str | os.PathLike | None = None, db: str | None = None) -> list[dict[str, Any]]:
    """The runs in the state store, newest first: ``[{"run_id", "name", "status", "num_records",
    "created_at" (Unix seconds), "records_done" (written), "records_dropped"}]`` (the counts as
    in ``status``), "started"}]`` (see :func:`shown_status`). No state store yet: ``[]``, and
    nothing is created."""
    if missing_store(home, db) is not None:
        return []
    _, store = open_state(home, db, read_only=True)
    try:
        counts = store.record_counts()
        out = []
        for info in store.list_runs():
            state, started = shown_status(store, info)
            written, dropped = counts.get(info.run_id, (0, 0))
            out.append({"run_id": info.run_id, "name": info.name, "status": state, "started": started,
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
    require_run_store(home, db, run_id)
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
    require_run_store(home, db, run_id)
    from pipeline.dataset import read_dataset

    home_path, store = open_state(home, db, read_only=True)
    try:
        return read_dataset(store, run_id, home_path).to_pandas()
    finally:
        store.close()


def validate(config: PipelineConfig | str | os.PathLike, *, check_models: bool = False) -> dict[str, Any]:
    """Everything ``run`` checks before it creates a run, and nothing created: the config
    (ConfigError), and with ``check_models`` its model endpoints (ModelCheckError). Returns
    ``{"name", "num_records", "columns": [output columns], "models": {alias: {"where", "model",
    "columns", "checked", "warning"}}}`` (models in use only; ``where`` names alias and URL,
    without credentials)."""
    from pipeline.graph import build_graph

    cfg = as_config(config)
    build_graph(cfg)
    checks, models = {}, {}
    if cfg.used_models():
        from pipeline.llm.client import ModelEndpoint
        from pipeline.llm.preflight import preflight

        from pipeline.threads import off_the_loop  # a notebook may call validate inside its loop

        checks = {c.alias: c for c in off_the_loop(preflight, cfg, "validate")} if check_models else {}
        models = {alias: {"where": ModelEndpoint.from_config(alias, cfg.models[alias]).where,
                          "model": cfg.models[alias].model, "columns": users, "checked": alias in checks,
                          "warning": checks[alias].warning if alias in checks else None}
                  for alias, users in cfg.used_models().items()}
    return {"name": cfg.name, "num_records": cfg.num_records, "columns": cfg.output_columns(), "models": models}


GRAPH_FORMATS = ("text", "mermaid", "json")


def graph(config: PipelineConfig | str | os.PathLike, *, format: str = "text") -> str:
    """The column DAG of ``config`` (a loaded config or a path) as `pipeline graph` prints it:
    each column's strategy, task count and dependencies. ``format``: ``"text"`` (a table),
    ``"mermaid"`` (a ``graph TD`` chart) or ``"json"`` (``{"columns": [{"name", "strategy",
    "tasks", "depends_on", ...}]}`` as text). Reads no state store. ConfigError for a bad
    config (a cycle, an unknown column); PipelineError for another format."""
    from pipeline.graph import build_graph

    if format not in GRAPH_FORMATS:
        raise PipelineError(f"unknown graph format {format!r}: use {flag('--format', 'format=')} "
                            f"{', '.join(GRAPH_FORMATS)}")
    cfg = as_config(config)
    dag = build_graph(cfg)
    if format == "mermaid":
        return dag.to_mermaid()
    if format == "json":
        return dag.to_json(cfg.num_records, cfg.row_group_size)
    return dag.to_text(cfg.num_records, cfg.row_group_size)
