"""What the `pipeline` command prints: text made from what :mod:`pipeline.api` returns.

Pure functions of the API's dicts and results (each returns the text or its lines; the command
decides stdout or stderr), plus :class:`Progress`, the live panel of run/resume/retry/worker.
One module, so that the commands in :mod:`pipeline.cli` stay a page each and the wording of
every message can be read in one place. Light to import: rich loads inside the functions that
draw a table.
"""

from __future__ import annotations

import re
import shlex
import time
from typing import TYPE_CHECKING, Any

from pipeline.costs import money
from pipeline.states import RunStatus

if TYPE_CHECKING:
    from pipeline.api import Preview, Reopened, RunResult

__all__ = ["CELL_CHARS", "Progress", "clip", "failure_lines", "model_lines", "preview_failure", "preview_json",
           "place", "preview_notes", "print_preview", "print_runs", "reopened_lines", "repaired_lines",
           "reused_line", "status_text", "stop_lines", "summary", "validate_lines", "with_place"]


class Progress:
    """The live panel (:mod:`pipeline.panel`) of the whole run on stderr, fed by the engine's
    snapshots: a redrawn panel on a terminal, one plain line every few seconds otherwise."""

    def __init__(self, every_s: float = 5.0):
        from pipeline.panel import LivePanel

        self.panel = LivePanel(every_s=every_s)

    def __call__(self, snap: dict) -> None:
        view = snap.get("run")
        if view is None:  # the store did not answer this time: wait for the next snapshot
            if snap["final"]:
                self.panel.close()
            return
        view = {**view, "live": snap.get("live")}
        if snap["final"]:  # a run shorter than the first snapshot: the rate of its final stats
            self.panel.close(view, rate=snap.get("records_per_s"))
        else:
            self.panel.update(view)


def clip(text: str | None, n: int) -> str:
    """``text`` on one line, cut to ``n`` characters (ending in ``...`` when cut)."""
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 3] + "..."


# -- the commands a message advises --------------------------------------------------------
#: A command in a message: ```pipeline resume ID --repair``` (backquoted, as every hint is written),
#: except those that read no state store (`preview`, `validate`, `graph`) and `sql` (named in
#: messages as what it is, "`pipeline sql` runs one statement that only reads", not advised).
_COMMAND = re.compile(r"`pipeline (?!(?:preview|validate|graph|sql)\b)[^`]*`")


def place(home: str | None, db: str | None) -> str:
    """The ``--home``/``--db`` flags a command was given, as they are typed after another command
    (`` --home DIR --db URL``, shell-quoted; empty when neither was given). A password in the URL
    is ``***`` here already: the engine's messages that carry these flags reach the live panel and
    ``RunResult.reason`` without passing the CLI's redaction."""
    from pipeline.redact import redact

    flags = [f"--{name} {shlex.quote(redact(value) if name == 'db' else value)}"
             for name, value in (("home", home), ("db", db)) if value]
    return "".join(f" {f}" for f in flags)


def with_place(text: str, flags: str) -> str:
    """``text`` with ``flags`` (:func:`place`) added to every command it advises that names no
    store of its own, so that a hint printed by ``pipeline run --home H`` works as printed."""
    if not flags:
        return text
    return _COMMAND.sub(lambda m: m[0] if " --home" in m[0] or " --db" in m[0] else m[0][:-1] + flags + "`", text)


# -- the end of run, resume, retry, worker --------------------------------------------------
def summary(s: dict, flags: str = "") -> str:
    """Records written and dropped, failures grouped by column and error class (one example
    each), model usage, and the export command (with ``flags``, :func:`place`).
    ``s``: :func:`pipeline.api.status`'s dict."""
    lines = [f"run {s['run_id']}: {s['records_done']:,} of {s['num_records']:,} records written, "
             f"{s['records_dropped']:,} dropped"]
    lines += failure_lines(s["failures"])
    for alias, m in (s.get("models") or {}).items():
        cost = "" if m.get("cost") is None else f", cost {money(m['cost'])}"
        lines.append(f"model {alias}: {m['requests']:,} requests, {m['rate_limited']:,} rate-limited (429), "
                     f"{m['prompt_tokens']:,} prompt + {m['completion_tokens']:,} completion tokens{cost}")
    if s.get("cost"):
        lines.append(f"cost: {money(s['cost']['spent'])} spent")
    if s["records_done"]:
        lines.append(f"export: pipeline export {s['run_id']} --output {s['run_id']}.parquet{flags}")
    return "\n".join(lines)


def stop_lines(result: RunResult) -> list[str]:
    """Why a run that is not complete stopped, and the command that goes on with it."""
    rid = result.run_id
    if result.signal is not None:
        return [f"run {rid} interrupted; `pipeline resume {rid}` continues it"]
    if result.status != RunStatus.FAILED:
        return [f"run {rid} stopped ({result.status}); `pipeline resume {rid}` continues it"]
    reason = result.reason or "too many tasks failed for good (shutdown_error_rate)"
    lines = [f"run {rid} failed: {reason}"]
    if "shutdown_error_rate" in reason:
        lines.append(f"fix the cause, then `pipeline retry {rid}` redoes the failed tasks "
                     f"(`pipeline resume {rid}` continues what is left; add --accept-changes when the fix "
                     f"changed a python module or seed file the run reads)")
    elif "resume" not in reason:
        lines.append(f"once the cause is gone, `pipeline resume {rid}` continues it")
    return lines


def reused_line(reused: dict[str, int], reuse: str) -> str:
    """What ``pipeline run --reuse`` took from the earlier run: cells per generator."""
    per = ", ".join(f"{name}: {n:,}" for name, n in reused.items() if n)
    return f"reused from run {reuse}: {sum(reused.values()):,} cell(s)" + (f" ({per})" if per else "")


def repaired_lines(repaired: list[dict], run_id: str) -> list[str]:
    """What ``pipeline resume --repair`` recomputes: one line per row group, or that all match."""
    if not repaired:
        return [f"every row-group file of run {run_id} matches its checkpoint"]
    return [f"recomputed row group {d['row_group']} ({d['path']}: {d['problem']})" for d in repaired]


def reopened_lines(r: Reopened, run_id: str) -> list[str]:
    """What ``pipeline retry`` reopened, and the matching failed tasks it left as they are."""
    lines = []
    if r.tasks:
        per = ", ".join(f"{name}: {n:,}" for name, n in r.tasks.items())
        lines.append(f"reopened {sum(r.tasks.values()):,} failed task(s) ({per}), "
                     f"{r.records:,} record(s) back in the run")
    if r.left:
        lines.append(f"left {r.left:,} matching failed task(s) as they are: their records are also dropped by "
                     f"failed tasks the filter did not select; `pipeline retry {run_id}` with no filter (or "
                     f"with those columns too) redoes them all")
    return lines


# -- status ---------------------------------------------------------------------------------
def shown(s: dict) -> str:
    """A run's status in words: an ``interrupted`` run no worker has started yet (``run
    --create-only``) is "created, not started" (its JSON keeps ``interrupted``, ``started: false``)."""
    if s["status"] == RunStatus.INTERRUPTED and s.get("started") is False:
        return "created, not started"
    return str(s["status"])


def status_text(s: dict) -> str:
    """`pipeline status` without --json: ``s`` is :func:`pipeline.api.status`'s dict."""
    lines = [f"run {s['run_id']} ({s['name']}): {shown(s)}",
             f"records: {s['records_done']:,} of {s['num_records']:,} written, {s['records_dropped']:,} dropped",
             f"row groups: {s['row_groups']['checkpointed']} of {s['row_groups']['total']} checkpointed, "
             f"{s['row_groups']['active']} active"]
    rate = f"rate: {s['rate_records_s']:,.1f} records/s"
    if s["eta_s"] is not None and s["status"] == RunStatus.RUNNING:
        rate += f", eta: {s['eta_s']:.0f}s"
    lines.append(rate)
    if shown(s) != s["status"]:
        lines.append(f"`pipeline worker {s['run_id']}` (or `pipeline resume {s['run_id']}`) starts it")
    width = max([len(c) for c in s["columns"]] + [6])
    lines.append(f"{'column':<{width}}  {'done':>10} {'failed':>8} {'deferred':>9} {'in_flight':>9} {'truncated':>9}")
    for name, c in s["columns"].items():
        lines.append(f"{name:<{width}}  {c['done']:>10,} {c['failed']:>8,} {c['deferred']:>9,} {c['in_flight']:>9,} "
                     f"{c.get('truncated', 0):>9,}")
    lines += failure_lines(s.get("failures") or [])
    configs = [c for c in s.get("changes") or [] if c["kind"] == "config"]
    if configs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(configs[-1]["changed_at"]))
        lines.append(f"config changed {len(configs)} time(s), last at {when}: {clip(configs[-1]['detail'], 200)} "
                     f"(table run_changes)")
    for d in s.get("damaged_files", []):
        lines.append(f"damaged file: row group {d['row_group']}: {d['path']} ({d['problem']}); "
                     f"`pipeline resume {s['run_id']} --repair` computes it again")
    if s.get("models"):
        lines += model_lines(s["models"], s.get("cost"))
    return "\n".join(lines)


def model_lines(models: dict, cost: dict | None) -> list[str]:
    """The model table of ``status``: usage, concurrency, pacing, and money."""
    lines = [f"{'model':<12} {'requests':>9} {'prompt tok':>11} {'compl. tok':>11} {'429s':>6} "
             f"{'concurrency':>11} {'saved by resume':>15} {'req/min':>8} {'tok/min':>9} {'cost':>10}"]
    for alias, m in models.items():
        conc = "-" if m["concurrency"] is None else str(m["concurrency"])
        rpm = "-" if m.get("requests_per_minute") is None else f"{m['requests_per_minute']:,.0f}"
        tpm = "-" if m.get("tokens_per_minute") is None else f"{m['tokens_per_minute']:,.0f}"
        lines.append(f"{alias:<12} {m['requests']:>9,} {m['prompt_tokens']:>11,} {m['completion_tokens']:>11,} "
                     f"{m['rate_limited']:>6,} {conc:>11} {m['calls_saved']:>15,} {rpm:>8} {tpm:>9} "
                     f"{money(m.get('cost')):>10}")
        budgets = [f"{m[k]:,g} {unit}/min" for k, unit in (("max_requests_per_minute", "requests"),
                                                           ("max_tokens_per_minute", "tokens")) if m.get(k)]
        if budgets:
            lines.append(f"  {alias}: paced to {', '.join(budgets)}; waited for room {m.get('paced') or 0:,} times")
        if m.get("rate_limit_headers"):
            shown = ", ".join(f"{k.removeprefix('x-ratelimit-')}={v}" for k, v in m["rate_limit_headers"].items())
            lines.append(f"  {alias}: last rate-limit headers: {shown}")
    if cost:
        lines.append(f"cost: {money(cost['spent'])} spent, {money(cost['projected'])} projected for the run")
    return lines


def failure_lines(failures: list[dict], most: int = 10) -> list[str]:
    """Tasks failed for good, grouped as :func:`pipeline.api.status` gives them (``failures``):
    the ``most`` largest groups, one example each."""
    if not failures:
        return []
    total = sum(f["count"] for f in failures)
    lines = [f"failed for good: {total:,} task(s)"]
    for f in failures[:most]:
        lines.append(f"  {f['column']}: {f['count']:,} x {f['error']}, e.g. {clip(f['example'], 200)}")
    if len(failures) > most:
        lines.append(f"  ... {len(failures) - most} more kinds: `pipeline status RUN_ID --json` lists them")
    return lines


# -- runs, validate ---------------------------------------------------------------------------
def print_runs(rows: list[dict]) -> None:
    """`pipeline runs`: :func:`pipeline.api.list_runs`' rows as a table on stdout."""
    from pipeline.tables import print_table

    print_table(["run id", "status", "created", "written / total", "dropped", "name"],
                [[r["run_id"], shown(r), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])),
                  f"{r['records_done']:,} / {r['num_records']:,}", f"{r['records_dropped']:,}", r["name"]]
                 for r in rows], right=(3, 4), whole=(0, 1, 2, 3))


def validate_lines(config: str, s: dict) -> list[str]:
    """`pipeline validate`: ``OK`` with the columns, then one line per model in use."""
    lines = [f"OK: {config}: {s['name']}, {s['num_records']:,} records, {len(s['columns'])} columns: "
             + ", ".join(s["columns"])]
    for m in s["models"].values():
        state = "checked" if m["checked"] and not m["warning"] else "answered with a warning" if m["checked"] \
            else "not checked (--check-models checks it)"
        lines.append(f"{m['where']}: {state}; used by {', '.join(m['columns'])}")
    return lines


# -- preview --------------------------------------------------------------------------------
#: A value longer than this is cut in the table (``--json`` gives every value whole).
CELL_CHARS = 300
#: Below this many characters a table column gets hard to read: the side-by-side table is used
#: only when every column can have at least its values' width up to this.
_NARROWEST = 12


def preview_notes(result: Preview, n: int) -> list[str]:
    """The lines on stderr after a preview's records: fewer than asked, records dropped, the
    failures."""
    lines = []
    if result.computed < n:
        lines.append(f"preview: the config has only {result.computed:,} records")
    if len(result.records) < result.computed:
        lines.append(f"preview: {result.computed - len(result.records):,} of {result.computed:,} records dropped "
                     "(left out above, as export leaves them out)")
    if result.prompts is not None and result.records and not any(result.prompts):
        lines.append("preview: no llm_* column, so no prompt to show (--show-prompts shows what an "
                     "LLM column's model is sent)")
    failures = failure_lines(result.failures)
    if failures:
        lines.append("\n".join(failures))
    return lines


def preview_failure(result: Preview) -> str | None:
    """Why a preview failed (exit 1): the error rate was reached, or no record came out."""
    if result.status != RunStatus.FAILED and result.records:
        return None
    why = result.reason or ("too many tasks failed (shutdown_error_rate)" if result.records else
                            "no record came out")
    return f"preview: {why}; fix the cause above"


def preview_json(result: Preview) -> str:
    """A JSON list with one object per record, columns in config order; values as JSONL export
    writes them. With prompts, each object also has ``"_prompts": {llm column: text}``."""
    from pipeline.dataset import export_json

    items = []
    for i, record in enumerate(result.records):
        if result.prompts is not None:
            record = {**record, "_prompts": result.prompts[i]}
        items.append(export_json(record))
    return "[" + ", ".join(items) + "]"


def print_preview(result: Preview, file: Any = None) -> None:
    """The records as a table that fits the terminal (rich; 80 columns when not a terminal, or
    ``$COLUMNS``): one row per record when the columns fit side by side, else one two-column
    table (column, value) per record. With prompts, each record's prompts after it."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, highlight=False, soft_wrap=False)
    if not result.records:
        console.print("(no records)")
        return
    cells = [[_cell(record.get(c)) for c in result.columns] for record in result.records]
    wide = sum(min(max(len(name), *(len(row[i].plain) for row in cells)), _NARROWEST) + 3
               for i, name in enumerate(result.columns))
    if wide <= console.width:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for name in result.columns:
            table.add_column(name, overflow="fold")
        for row in cells:
            table.add_row(*row)
        console.print(table)
    for i, row in enumerate(cells):
        if wide > console.width:
            table = Table(box=box.SIMPLE, show_header=False, pad_edge=False, title=f"record {i + 1}",
                          title_justify="left")
            table.add_column(style="bold", no_wrap=True, max_width=max(8, console.width // 3))
            table.add_column(overflow="fold")
            for name, value in zip(result.columns, row):
                table.add_row(name, value)
            console.print(table)
        if result.prompts is not None:
            for column, text in result.prompts[i].items():
                console.rule(f"record {i + 1}: prompt of {column}", align="left")
                console.print(text, markup=False, highlight=False)


def _cell(value: Any) -> Any:
    from rich.text import Text

    from pipeline.dataset import export_json

    text = value if isinstance(value, str) else export_json(value)
    if len(text) > CELL_CHARS:
        text = text[:CELL_CHARS - 3] + "..."
    return Text(text)  # never markup: a value may hold [brackets]
