"""`pipeline report`: a picture of a traced run (``--trace`` or ``settings.trace``), made from its
``task_traces`` rows (:mod:`pipeline.store.traces`) with matplotlib.

:func:`series` turns the traces into the figures the picture draws (``--format json`` writes
them as they are); :func:`draw` renders them as PNG, SVG or an HTML page holding the SVG:

- one lane per column: a bar from start (inputs read) to finish of every task attempt, coloured
  by outcome (ok, deferred, rate_limited, failed, cancelled);
- records completed over time (a record is complete when every generator has finished it: its
  cell, or the batch task of its row group);
- calls in flight per model (llm_* columns), with each 429 marked;
- each invocation (worker process) as a band: a killed and resumed run shows every one.

Times in the series are seconds since the first dispatch (``t0``, Unix seconds). Works while the
run is going (what has been traced so far; traces are written once a second).
"""

from __future__ import annotations

import collections
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from pipeline.errors import ExportError, PipelineError
from pipeline.states import RunStatus

__all__ = ["FORMATS", "OUTCOME_COLOURS", "draw", "series"]

FORMATS = ("png", "svg", "html", "json")
OUTCOME_COLOURS = {"ok": "#4C72B0", "deferred": "#DD8452", "rate_limited": "#C44E52", "failed": "#222222",
                   "cancelled": "#AAAAAA"}


def series(store: Any, run_id: str) -> dict[str, Any]:
    """The report's data: ``{"run_id", "t0", "columns": [...], "lanes": {column: [[start, end,
    outcome, worker], ...]}, "records": [[t, completed], ...], "in_flight": {model: [[t, n], ...]},
    "rate_limited": {model: [t, ...]}, "invocations": [{"worker", "start", "end", "tasks"}]}``.

    Raises PipelineError when the run has no traces (it was not traced)."""
    info = store.get_run(run_id)
    traces = store.traces(run_id)
    if not traces:
        if info.status == RunStatus.COMPLETE:  # nothing is left to resume: only a new run can be traced
            how = ("it is complete, so nothing of it is left to trace: run its config again with "
                   "`pipeline run CONFIG --trace`")
        else:
            how = f"`pipeline resume {run_id} --trace` traces what is left of it"
        raise PipelineError(f"run {run_id!r} has no traces: a report is drawn from the traces of a run made "
                            f"with --trace (or settings.trace: true); {how}")
    entries = json.loads(info.config).get("columns", [])
    columns = [e["name"] for e in entries]
    model_of = {e["name"]: e.get("model") for e in entries if str(e.get("type", "")).startswith("llm_")}
    t0 = min(t["dispatched_at"] for t in traces)

    lanes: dict[str, list[list[Any]]] = {name: [] for name in columns}
    invocations: dict[str, dict[str, Any]] = {}
    deltas: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
    rate_limited: dict[str, list[float]] = collections.defaultdict(list)
    for t in traces:
        start = (t["started_at"] or t["dispatched_at"]) - t0
        end = t["finished_at"] - t0
        lanes.setdefault(t["column_name"], []).append([round(start, 6), round(end, 6), t["outcome"], t["worker"]])
        inv = invocations.setdefault(t["worker"], {"worker": t["worker"], "start": start, "end": end, "tasks": 0})
        inv["start"], inv["end"], inv["tasks"] = min(inv["start"], start), max(inv["end"], end), inv["tasks"] + 1
        model = model_of.get(t["column_name"])
        if model is not None:
            deltas[model] += [(start, 1), (end, -1)]
            if t["outcome"] == "rate_limited":
                rate_limited[model].append(round(end, 6))
    in_flight = {}
    for model, changes in deltas.items():
        n, points = 0, []
        for at, step in sorted(changes, key=lambda c: (c[0], c[1])):  # a finish before a start at the same time
            n += step
            points.append([round(at, 6), n])
        in_flight[model] = points
    return {"run_id": run_id, "t0": t0, "columns": columns, "lanes": lanes,
            "records": _records_completed(traces, columns, t0, info.row_group_size, info.num_records),
            "in_flight": in_flight, "rate_limited": dict(rate_limited),
            "invocations": sorted(invocations.values(), key=lambda i: i["start"])}


def _records_completed(traces: list[dict], generators: list[str], t0: float, row_group_size: int,
                       num_records: int) -> list[list[float]]:
    """``[[t, records completed by t], ...]``: a record completes at the latest finish among the
    ok attempts that computed it (its cells, its row group's batch tasks), once every generator has
    one."""
    cell: dict[tuple[int, int], dict[str, float]] = collections.defaultdict(dict)
    batch: dict[int, dict[str, float]] = collections.defaultdict(dict)
    for t in traces:
        if t["outcome"] != "ok":
            continue
        if t["row_index"] is None:
            batch[t["row_group"]][t["column_name"]] = t["finished_at"]
        else:
            cell[(t["row_group"], t["row_index"])][t["column_name"]] = t["finished_at"]
    wanted = set(generators)
    done_at = []
    for rg in set(batch) | {rg for rg, _ in cell}:
        for row in range(min(row_group_size, num_records - rg * row_group_size)):  # row_index is within the row group
            finished = {**batch.get(rg, {}), **cell.get((rg, row), {})}
            if wanted <= set(finished):
                done_at.append(max(finished[g] for g in wanted) - t0)
    done_at.sort()
    return [[round(at, 6), i + 1] for i, at in enumerate(done_at)]


def draw(data: dict[str, Any], output: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write the report of :func:`series` to ``output`` as ``fmt`` (png, svg, html or json;
    default: the file's suffix). Returns the path. Raises PipelineError on an unknown format."""
    path = Path(output)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise PipelineError(f"unknown report format {fmt!r}: name the output FILE.png, FILE.svg or FILE.html, "
                            f"or pass --format {'|'.join(FORMATS)}")
    try:
        return _write(data, path, fmt)
    except OSError as exc:
        raise ExportError(f"could not write the report to {path}: {exc}; nothing was written") from exc


def _write(data: dict[str, Any], path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path.write_text(json.dumps(data), encoding="utf-8")
        return path
    figure = _figure(data)
    if fmt == "html":
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", bbox_inches="tight")
        title = html.escape(f"pipeline report: {data['run_id']}")
        rows = "".join(f"<tr><td>{html.escape(i['worker'])}</td><td>{i['start']:.1f}</td><td>{i['end']:.1f}</td>"
                       f"<td>{i['tasks']}</td></tr>" for i in data["invocations"])
        path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
                        f"<h1>{title}</h1>{buffer.getvalue()}<h2>Invocations</h2><table><tr><th>worker</th>"
                        f"<th>start (s)</th><th>end (s)</th><th>task attempts</th></tr>{rows}</table></body></html>",
                        encoding="utf-8")
    else:
        figure.savefig(path, format=fmt, dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def _figure(data: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    columns = [c for c in data["columns"] if data["lanes"].get(c)] or list(data["lanes"])
    models = list(data["in_flight"])
    rows = 2 + (1 if models else 0)
    heights = [max(2.0, 0.35 * len(columns)), 1.6] + ([1.6] if models else [])
    figure, axes = plt.subplots(rows, 1, figsize=(11, sum(heights) + 1), sharex=True,
                                gridspec_kw={"height_ratios": heights})
    lanes_ax, records_ax = axes[0], axes[1]
    for y, column in enumerate(columns):
        by_outcome: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
        for start, end, outcome, _worker in data["lanes"].get(column, []):
            by_outcome[outcome].append((start, max(end - start, 1e-4)))
        for outcome, bars in by_outcome.items():
            lanes_ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=OUTCOME_COLOURS.get(outcome, "#888888"))
    lanes_ax.set_yticks(range(len(columns)), labels=columns)
    lanes_ax.invert_yaxis()
    lanes_ax.set_title(f"run {data['run_id']}: task attempts per column", loc="left")
    # Right of the lanes, from their top down: never on the title above them, however long the
    # run id (a row above the lanes shared the title's line and covered it).
    lanes_ax.legend(handles=[Patch(color=c, label=o) for o, c in OUTCOME_COLOURS.items()], loc="upper left",
                    bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small", frameon=False)
    if data["records"]:
        xs, ys = zip(*data["records"])
        records_ax.step(xs, ys, where="post")
    records_ax.set_ylabel("records\ncompleted")
    if models:
        ax = axes[2]
        for model in models:
            xs, ys = zip(*data["in_flight"][model])
            ax.step(xs, ys, where="post", label=model)
            marks = data["rate_limited"].get(model, [])
            if marks:
                ax.plot(marks, [0] * len(marks), "x", color=OUTCOME_COLOURS["rate_limited"], label=f"{model}: 429")
        ax.set_ylabel("calls in\nflight")
        ax.legend(loc="upper right", fontsize="small")
    for i, invocation in enumerate(data["invocations"]):
        for ax in axes:
            ax.axvspan(invocation["start"], invocation["end"], color="#000000", alpha=0.04 if i % 2 else 0.0)
        lanes_ax.annotate(f"#{i + 1}", (invocation["start"], 0), xycoords=("data", "axes fraction"),
                          fontsize="small", va="bottom")
    axes[-1].set_xlabel("seconds since the first dispatch")
    figure.tight_layout()
    return figure
