"""``pipeline preview``: the first N records of a config, computed in memory, nothing created.

The config runs with ``num_records = N`` and ``row_group_size = N`` on the in-memory store
(:class:`~pipeline.store.memory.MemoryStore`): one row group holding records 0..N-1, the cells
of those records only, no state store, no run folder, nothing under ``--home``. The engine's
checkpoint of that row group goes to a temporary folder outside ``--home``, removed at the end;
the records are read back from it exactly as ``export`` reads a run's files.

What equals a full run, and what does not:

- ``sampler`` values are a pure function of (seed, column, record index), ``seed_dataset`` rows
  of (record index, seed, entry name, the file), ``expression`` values of the record: records
  0..N-1 of the preview equal records 0..N-1 of a full run, whatever its ``row_group_size``.
  So do deterministic ``python`` cell functions, and stateful cell generators (they see records
  0..N-1 in order, as the first row group of a run does).
- A ``batch`` generator (python ``mode: batch``) sees the N records as its row group, where a
  full run gives it the config's ``row_group_size`` records; a batch function whose value for a
  record depends on the other records of its row group may differ.
- LLM answers are whatever the model answers this time.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError
from pipeline.states import RunStatus
from pipeline.threads import off_the_loop

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

__all__ = ["DEFAULT_RECORDS", "Preview", "compute_preview", "preview"]

DEFAULT_RECORDS = 5
_RUN_ID = "preview"


@dataclass
class Preview:
    """What a preview computed. ``records``: one dict per record in record order, columns in
    config order, exact values (as ``load_dataset`` gives them); a dropped record is left out,
    as in ``export``. ``prompts``: per record (same order), ``{llm column: rendered prompt}``
    when asked for. ``failures``: ``[{"column", "error", "count", "example"}]`` as in
    ``status --json``. ``status``: ``complete``, or ``failed`` when the share of failed tasks
    reached ``shutdown_error_rate`` or a model stayed down (``reason`` says which). ``computed``: records computed (``n``, at most the
    config's ``num_records``)."""

    columns: list[str]
    records: list[dict[str, Any]]
    status: str
    computed: int
    failures: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[dict[str, str]] | None = None
    reason: str | None = None  # why it ended 'failed' (the error rate, a model that stayed down)


def preview(config: PipelineConfig | str | os.PathLike, n: int = DEFAULT_RECORDS, *,
            check_models: bool = True) -> list[dict[str, Any]]:
    """The first ``n`` records of ``config`` (a loaded config or a path), computed in memory
    (``pipeline preview``): one dict per record, columns in config order, exact values; a
    dropped record is left out. Creates nothing (no run, no store, no file). Equal to records
    0..n-1 of a full run for deterministic cell-level generators (this module's docstring says
    what differs for batch ones). Works inside a running event loop too. ConfigError for a bad
    config; ModelCheckError for a model endpoint that refuses (unless ``check_models=False``)."""
    return compute_preview(config, n, check_models=check_models).records


def compute_preview(config: PipelineConfig | str | os.PathLike, n: int = DEFAULT_RECORDS, *,
                    check_models: bool = True, show_prompts: bool = False) -> Preview:
    """The first ``n`` records of ``config`` (a loaded config or a path) and everything the
    command shows (see :class:`Preview`). Creates nothing. ConfigError for a bad config,
    ModelCheckError for a model endpoint that refuses (unless ``check_models=False``).
    Works inside a running event loop too (a notebook): the engine then runs on a loop of its
    own in a worker thread. ``n`` above the config's ``num_records`` gives ``num_records``
    records."""
    from pipeline.config import PipelineConfig, load_config
    from pipeline.graph import build_graph

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PipelineError(f"the number of records to preview must be a whole number >= 1, not {n!r}")
    cfg = config if isinstance(config, PipelineConfig) else load_config(config)
    build_graph(cfg)  # what `run` checks, in the same order
    if check_models and cfg.used_models():
        from pipeline.llm.preflight import preflight

        off_the_loop(preflight, cfg, "preview")
    count = min(n, cfg.num_records)
    small = cfg.model_copy(update={"num_records": count, "row_group_size": count}, deep=True)
    return off_the_loop(_compute, small, show_prompts)


#: Seconds a model may answer nothing before a preview gives up on it (see _compute).
PREVIEW_MODEL_DOWN_S = 15.0


def _compute(cfg: PipelineConfig, show_prompts: bool) -> Preview:
    from pipeline.api.jobs import Job, loop_factory
    from pipeline.api.reads import failures_of
    from pipeline.dataset import read_dataset
    from pipeline.graph import build_graph
    from pipeline.store.base import ColumnSpec, NewRun
    from pipeline.store.memory import MemoryStore

    # A preview is a quick look: a model that answers nothing for 15 s ends it (a run waits
    # model_down_s, 120 s by default, since it can be resumed; a preview cannot).
    if cfg.settings.model_down_s > PREVIEW_MODEL_DOWN_S:
        cfg = cfg.model_copy(update={"settings": cfg.settings.model_copy(update={"model_down_s": PREVIEW_MODEL_DOWN_S})})
    graph = build_graph(cfg)
    store = MemoryStore()
    store.create_run(NewRun(
        run_id=_RUN_ID, name=cfg.name, num_records=cfg.num_records, row_group_size=cfg.row_group_size,
        seed=cfg.seed, config=cfg.to_json(), fingerprint="",
        columns=[ColumnSpec(c, graph.producer[c], graph.by_name[graph.producer[c]].strategy, i)
                 for i, c in enumerate(graph.columns)],
        fingerprints=[]))
    # The row group's checkpoint file goes here, never under --home; gone at the end.
    with tempfile.TemporaryDirectory(prefix="pipeline-preview-") as scratch:
        job = Job(store, _RUN_ID, cfg, Path(scratch), progress=None, trace=False, graph=graph, resumable=False)
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            status = runner.run(job.main())
        outcome = job.finish(status)
        if status not in (RunStatus.COMPLETE, RunStatus.FAILED):
            raise PipelineError(f"the preview stopped before it finished ({status})")
        records = list(read_dataset(store, _RUN_ID, Path(scratch)).records())
    prompts = _prompts(job.plan, records) if show_prompts else None
    return Preview(list(graph.columns), records, status, cfg.num_records, failures_of(store, _RUN_ID), prompts,
                   outcome.reason)


def _prompts(plan: Any, records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Per record, each LLM column's prompt rendered with that record's values: the very text
    its model was sent (templates are a pure function of the record)."""
    writers = [node for node in plan.nodes if hasattr(node.gen, "rendered_prompt")]
    return [{node.name: node.gen.rendered_prompt({c: record.get(c) for c in node.depends_on}) for node in writers}
            for record in records]
