"""The `pipeline` command. Each command is a thin layer over one function of pipeline.api.

Exit codes: 0 complete; 1 the run ended failed (its error rate, a model that stayed down, a
checkpoint that cannot be written; resumable); 2 bad usage, bad config, unknown or taken run id,
a model endpoint refused by the preflight, files changed since the run started, a damaged
row-group file at export; 130 after SIGINT; 143 after SIGTERM.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import sys
import time
from typing import Any, Callable

import click

from pipeline import api, surface
from pipeline.costs import money
from pipeline.errors import PipelineError
from pipeline.redact import excepthook, redact

sys.excepthook = excepthook  # a traceback that escapes is printed redacted too

EXIT_OK, EXIT_FAILED = 0, 1  # 2 comes from PipelineError.exit_code
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
ACCEPT_CHANGES_HELP = ("Go on although a python module or seed file changed since the run started: keep every "
                       "recorded cell, compute the rest with the files as they are now (recorded in run_changes).")


def state_options(fn: Callable) -> Callable:
    """--home and --db, shared by every command."""
    fn = click.option("--db", envvar="PIPELINE_DB", default=None, metavar="URL",
                      help="State store URL (SQLite or PostgreSQL). Default: sqlite:///<home>/state.db.")(fn)
    fn = click.option("--home", envvar="PIPELINE_HOME", default=None, metavar="DIR",
                      help="Folder of run outputs and the default state store. Default: ./.pipeline.")(fn)
    return fn


def handle_errors(fn: Callable) -> Callable:
    """Every PipelineError becomes one line on stderr and its exit code (2); Ctrl-C before a run's
    own signal handling is in place exits 130."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PipelineError as exc:
            click.echo(f"error: {redact(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            # Ctrl-C before a command installs its own handlers (loading a config, importing a
            # user module, hashing files): nothing was started, and the exit code says SIGINT
            # (click would print "Aborted!" and exit 1).
            click.echo("interrupted: nothing was changed", err=True)
            sys.exit(SIGNAL_EXIT[signal.SIGINT])
    return wrapper


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
        if snap["final"]:
            self.panel.close(view)
        else:
            self.panel.update(view)


def _exit(code: int) -> None:
    """End a command that ran the engine. Everything is committed; the state store is left
    open on purpose: the last SQLite connection to close folds the WAL into the database under
    an exclusive lock, and a reader polling at that moment (`sqlite3 state.db ...`, busy_timeout
    0) would get "database is locked". The process ends as a SIGKILL would leave it, which WAL is
    built for: the next opener recovers the WAL (the kill tests exercise exactly this)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _finish(result: api.RunResult, home: str | None, db: str | None) -> None:
    """End run/resume/worker: one summary on stderr, then the exit code."""
    rid = result.run_id
    if result.status == "complete" and result.extra.get("already_complete"):
        click.echo(f"run {rid} is already complete; nothing to do", err=True)
        _exit(EXIT_OK)
    try:
        click.echo(_summary(api.status(rid, home=home, db=db), home), err=True)
    except PipelineError as exc:  # the summary is a courtesy: never let it change the exit code
        click.echo(f"(no summary: {exc})", err=True)
    if result.status == "complete":
        _exit(EXIT_OK)
    if result.signal is not None:
        click.echo(f"run {rid} interrupted; `pipeline resume {rid}` continues it", err=True)
        _exit(SIGNAL_EXIT.get(result.signal, 128 + result.signal))
    if result.status == "failed":
        reason = result.reason or "too many tasks failed for good (shutdown_error_rate)"
        click.echo(f"run {rid} failed: {reason}", err=True)
        if "shutdown_error_rate" in reason:
            click.echo(f"fix the cause, then `pipeline retry {rid}` redoes the failed tasks "
                       f"(`pipeline resume {rid}` continues what is left)", err=True)
        elif "resume" not in reason:
            click.echo(f"once the cause is gone, `pipeline resume {rid}` continues it", err=True)
    else:
        click.echo(f"run {rid} stopped ({result.status}); `pipeline resume {rid}` continues it", err=True)
    _exit(EXIT_FAILED)


def _clip(text: str | None, n: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _summary(s: dict, home: str | None) -> str:
    """Records written and dropped, failures grouped by column and error class (one example
    each), model usage, and the export command."""
    lines = [f"run {s['run_id']}: {s['records_done']:,} of {s['num_records']:,} records written, "
             f"{s['records_dropped']:,} dropped"]
    lines += _failure_lines(s["failures"])
    for alias, m in (s.get("models") or {}).items():
        cost = "" if m.get("cost") is None else f", cost {money(m['cost'])}"
        lines.append(f"model {alias}: {m['requests']:,} requests, {m['rate_limited']:,} rate-limited (429), "
                     f"{m['prompt_tokens']:,} prompt + {m['completion_tokens']:,} completion tokens{cost}")
    if s.get("cost"):
        lines.append(f"cost: {money(s['cost']['spent'])} spent")
    if s["records_done"]:
        where = f" --home {shlex.quote(home)}" if home else ""
        lines.append(f"export: pipeline export {s['run_id']} --output {s['run_id']}.parquet{where}")
    return "\n".join(lines)


def _model_lines(models: dict, cost: dict | None) -> list[str]:
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


def _failure_lines(failures: list[dict], most: int = 10) -> list[str]:
    if not failures:
        return []
    total = sum(f["count"] for f in failures)
    lines = [f"failed for good: {total:,} task(s)"]
    for f in failures[:most]:
        lines.append(f"  {f['column']}: {f['count']:,} x {f['error']}, e.g. {_clip(f['example'], 200)}")
    if len(failures) > most:
        lines.append(f"  ... {len(failures) - most} more kinds: `pipeline status RUN_ID --json` lists them")
    return lines


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline")
def main() -> None:
    """Generate datasets column by column, record by record; every result is recorded, so a
    killed run resumes exactly where it stopped."""
    surface.CLI = True  # advice in messages names flags and commands, not Python parameters


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--run-id", default=None, help="Name of the run (default: <name>-<date>-<random>).")
@click.option("--num-records", type=click.IntRange(min=1), default=None, help="Override num_records.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--create-only", is_flag=True, help="Create the run and exit; start it with `pipeline worker`.")
@click.option("--trace", is_flag=True, help="Record every task attempt in the task_traces table (pipeline report draws it).")
@click.option("--no-check-models", is_flag=True,
              help="Skip the check of the model endpoints (reachable, key and model accepted) before the run is created.")
@click.option("--reuse", default=None, metavar="RUN_ID",
              help="Take from this earlier run (same store) every cell the new run would compute identically.")
@state_options
@handle_errors
def run(config: str, run_id: str | None, num_records: int | None, quiet: bool, create_only: bool, trace: bool,
        no_check_models: bool, reuse: str | None, home: str, db: str) -> None:
    """Validate CONFIG, create a run and run it to the end.

    Prints `run_id: <id>` as the first line of stdout."""
    def created(rid: str) -> None:
        click.echo(f"run_id: {rid}")
        sys.stdout.flush()

    result = api.run(config, home=home, db=db, run_id=run_id, num_records=num_records, on_created=created,
                     progress=None if quiet else Progress(), start=not create_only, trace=trace,
                     close_store=create_only, check_models=not no_check_models, reuse=reuse)
    reused = result.extra.get("reused")
    if reused is not None:
        per = ", ".join(f"{name}: {n:,}" for name, n in reused.items() if n)
        click.echo(f"reused from run {reuse}: {sum(reused.values()):,} cell(s)" + (f" ({per})" if per else ""),
                   err=True)
    if result.status == "created":
        click.echo(f"created run {result.run_id}; start it with `pipeline worker {result.run_id}`", err=True)
        return
    _finish(result, home, db)


@main.command()
@click.argument("run_id")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--trace", is_flag=True, help="Record every task attempt in the task_traces table (pipeline report draws it).")
@click.option("--repair", is_flag=True,
              help="Check every row-group file (size, SHA-256) and compute again those missing or damaged.")
@click.option("--accept-changes", is_flag=True, help=ACCEPT_CHANGES_HELP)
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="Continue under this changed config: recompute exactly the cells of changed columns and of "
                   "the columns that read them, keep every other cell, compute new records if num_records grew.")
@click.option("--plan", is_flag=True, help="With --config: print per column the cells kept and to compute, "
              "and why; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --plan: print the plan as JSON.")
@state_options
@handle_errors
def resume(run_id: str, quiet: bool, trace: bool, repair: bool, accept_changes: bool, config: str | None, plan: bool,
           as_json: bool, home: str, db: str) -> None:
    """Continue RUN_ID exactly where it stopped (with --config: under a changed config)."""
    if (plan or as_json) and config is None:
        raise click.UsageError("--plan and --json go with --config FILE")
    if as_json and not plan:
        raise click.UsageError("--json goes with --plan")
    if plan:
        change = api.plan_change(run_id, config, home=home, db=db)
        click.echo(json.dumps(change.to_json()) if as_json else change.to_text())
        return
    result = api.resume(run_id, home=home, db=db, progress=None if quiet else Progress(), trace=trace,
                        close_store=False, repair=repair, accept_changes=accept_changes, config=config)
    change = result.extra.get("change")
    if change is not None:
        click.echo(change.to_text(), err=True)
    if repair:
        repaired = result.extra.get("repaired", [])
        for d in repaired:
            click.echo(f"recomputed row group {d['row_group']} ({d['path']}: {d['problem']})", err=True)
        if not repaired:
            click.echo(f"every row-group file of run {run_id} matches its checkpoint", err=True)
    _finish(result, home, db)


@main.command()
@click.argument("run_id")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--accept-changes", is_flag=True, help=ACCEPT_CHANGES_HELP)
@state_options
@handle_errors
def worker(run_id: str, quiet: bool, accept_changes: bool, home: str, db: str) -> None:
    """Join RUN_ID as one more worker (several may run at once)."""
    _finish(api.resume(run_id, home=home, db=db, progress=None if quiet else Progress(), close_store=False,
                       accept_changes=accept_changes), home, db)


@main.command()
@click.argument("run_id")
@click.option("--column", "columns", multiple=True, metavar="NAME",
              help="Only the failed tasks of this column or generator (repeatable).")
@click.option("--error", default=None, metavar="TEXT", help="Only the failed tasks whose last error contains TEXT.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--trace", is_flag=True, help="Record every task attempt in the task_traces table (pipeline report draws it).")
@click.option("--accept-changes", is_flag=True, help=ACCEPT_CHANGES_HELP)
@state_options
@handle_errors
def retry(run_id: str, columns: tuple[str, ...], error: str | None, quiet: bool, trace: bool, accept_changes: bool,
          home: str, db: str) -> None:
    """Reopen the failed tasks of RUN_ID (all, or those matching --column/--error) with the
    records they dropped, then continue the run as `resume` does."""
    def reopened(r: api.Reopened) -> None:
        if r.tasks:
            per = ", ".join(f"{name}: {n:,}" for name, n in r.tasks.items())
            click.echo(f"reopened {sum(r.tasks.values()):,} failed task(s) ({per}), "
                       f"{r.records:,} record(s) back in the run", err=True)
        if r.left:
            click.echo(f"left {r.left:,} matching failed task(s) as they are: their records are also dropped by "
                       f"failed tasks the filter did not select; `pipeline retry {run_id}` with no filter (or "
                       f"with those columns too) redoes them all", err=True)

    result = api.retry(run_id, columns=list(columns) or None, error=error, home=home, db=db, trace=trace,
                       progress=None if quiet else Progress(), close_store=False, on_reopened=reopened,
                       accept_changes=accept_changes)
    if result.extra.get("nothing_to_retry"):
        click.echo(f"run {run_id} has no failed task{' matching' if columns or error else ''} to retry; "
                   "nothing changed", err=True)
        _exit(EXIT_OK)
    _finish(result, home, db)


def _status_text(s: dict) -> str:
    lines = [f"run {s['run_id']} ({s['name']}): {s['status']}",
             f"records: {s['records_done']:,} of {s['num_records']:,} written, {s['records_dropped']:,} dropped",
             f"row groups: {s['row_groups']['checkpointed']} of {s['row_groups']['total']} checkpointed, "
             f"{s['row_groups']['active']} active"]
    rate = f"rate: {s['rate_records_s']:,.1f} records/s"
    if s["eta_s"] is not None and s["status"] == "running":
        rate += f", eta: {s['eta_s']:.0f}s"
    lines.append(rate)
    width = max([len(c) for c in s["columns"]] + [6])
    lines.append(f"{'column':<{width}}  {'done':>10} {'failed':>8} {'deferred':>9} {'in_flight':>9} {'truncated':>9}")
    for name, c in s["columns"].items():
        lines.append(f"{name:<{width}}  {c['done']:>10,} {c['failed']:>8,} {c['deferred']:>9,} {c['in_flight']:>9,} "
                     f"{c.get('truncated', 0):>9,}")
    lines += _failure_lines(s.get("failures") or [])
    configs = [c for c in s.get("changes") or [] if c["kind"] == "config"]
    if configs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(configs[-1]["changed_at"]))
        lines.append(f"config changed {len(configs)} time(s), last at {when}: {_clip(configs[-1]['detail'], 200)} "
                     f"(table run_changes)")
    for d in s.get("damaged_files", []):
        lines.append(f"damaged file: row group {d['row_group']}: {d['path']} ({d['problem']}); "
                     f"`pipeline resume {s['run_id']} --repair` computes it again")
    if s.get("models"):
        lines += _model_lines(s["models"], s.get("cost"))
    return "\n".join(lines)


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--watch", is_flag=True, help="Refresh until the run is no longer running.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes.")
@state_options
@handle_errors
def status(run_id: str, as_json: bool, watch: bool, interval: float, home: str, db: str) -> None:
    """Progress of RUN_ID per column and row group; works while the run is going."""
    panel = None
    if watch and not as_json and sys.stdout.isatty():  # the same live panel as `run` shows
        from pipeline.panel import LivePanel

        panel = LivePanel(stream=sys.stdout, tty=True)
    try:
        while True:
            s = api.status(run_id, home=home, db=db)
            running = s["status"] == "running"
            if panel is not None:
                panel.update(s, final=not running)
            elif as_json:
                click.echo(json.dumps(s))
            else:
                click.echo(_status_text(s))
            if not watch or not running:
                return
            time.sleep(interval)
    except KeyboardInterrupt:  # Ctrl-C ends --watch; the run itself is not affected
        sys.exit(130)
    finally:
        if panel is not None:
            panel.close()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@state_options
@handle_errors
def runs(as_json: bool, home: str, db: str) -> None:
    """The runs in the state store, newest first."""
    rows = api.list_runs(home=home, db=db)
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no runs yet; `pipeline run CONFIG` starts one", err=True)
        return
    from pipeline.tables import print_table

    print_table(["run id", "status", "created", "written / total", "dropped", "name"],
                [[r["run_id"], r["status"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])),
                  f"{r['records_done']:,} / {r['num_records']:,}", f"{r['records_dropped']:,}", r["name"]]
                 for r in rows], right=(3, 4), whole=(0, 1, 2, 3))


@main.command()
@click.argument("run_id")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@state_options
@handle_errors
def rm(run_id: str, yes: bool, home: str, db: str) -> None:
    """Delete RUN_ID: its rows in every table of the state store and its folder
    <home>/runs/RUN_ID (exports written elsewhere stay). Asks first, unless --yes. Refused
    while the run has live workers."""
    if not yes:
        s = api.status(run_id, home=home, db=db)  # unknown run: exit 2 before asking
        try:
            sure = click.confirm(f"delete run {run_id} ({s['status']}, {s['records_done']:,} of "
                                 f"{s['num_records']:,} records written) and its files?", err=True)
        except click.Abort:  # no terminal to answer (stdin closed)
            sure = False
        if not sure:
            click.echo(f"nothing deleted; `pipeline rm {run_id} --yes` deletes without asking", err=True)
            sys.exit(EXIT_FAILED)
    res = api.delete_run(run_id, home=home, db=db)
    where = f" and {res['folder']}" if res["folder"] else ""
    click.echo(f"deleted run {run_id}: {sum(res['rows'].values()):,} rows{where}", err=True)


@main.command()
@click.argument("run_id")
@click.option("--output", "-o", required=True, type=click.Path(), help="File to write (with --card: a folder, new or existing).")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv", "jsonl"]), default=None,
              help="Default: from the output's suffix, else parquet.")
@click.option("--card", is_flag=True, help="OUTPUT is a folder: data/train.<format> and a dataset card README.md.")
@state_options
@handle_errors
def export(run_id: str, output: str, fmt: str | None, card: bool, home: str, db: str) -> None:
    """Write the dataset of RUN_ID: records in order, dropped records left out. With --card,
    OUTPUT is a folder: the data in data/train.<format> and a Hugging Face dataset card in
    README.md (features and size, the config, the column graph, counts, drops by error, model
    usage)."""
    res = api.export(run_id, output, format=fmt, card=card, home=home, db=db)
    if not res["complete"]:
        click.echo(f"run {run_id} is not complete: exported the {res['records']:,} checkpointed records", err=True)
    click.echo(f"wrote {res['records']:,} records to {res['path']}", err=True)
    if card:
        click.echo(f"wrote the dataset card to {res['card']}", err=True)


@main.command()
@click.argument("run_id")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="FILE.png, FILE.svg or FILE.html (the picture), or any name with --format json.")
@click.option("--format", "fmt", type=click.Choice(["png", "svg", "html", "json"]), default=None,
              help="Default: from the output's suffix. json: the series the picture is drawn from.")
@state_options
@handle_errors
def report(run_id: str, output: str, fmt: str | None, home: str, db: str) -> None:
    """A picture of RUN_ID made from its traces (run it with --trace): one lane per column showing
    when its tasks ran, records completed over time, calls in flight per model with 429s marked,
    and each invocation of a resumed run. Works while the run is going."""
    res = api.report(run_id, output, format=fmt, home=home, db=db)
    click.echo(f"wrote the report of {res['attempts']:,} task attempts in {res['invocations']} invocation(s) "
               f"to {res['path']}", err=True)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["text", "mermaid", "json"]), default="text", show_default=True)
@state_options
@handle_errors
def graph(config: str, fmt: str, home: str, db: str) -> None:
    """The column DAG of CONFIG: each column's strategy, task count and dependencies.
    (It reads no state store: --home and --db are accepted like everywhere and not used.)"""
    from pipeline.config import load_config
    from pipeline.graph import build_graph

    cfg = load_config(config)
    g = build_graph(cfg)
    if fmt == "mermaid":
        click.echo(g.to_mermaid())
    elif fmt == "json":
        click.echo(g.to_json(cfg.num_records, cfg.row_group_size))
    else:
        click.echo(g.to_text(cfg.num_records, cfg.row_group_size))


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--check-models", is_flag=True, help="Also check that every model endpoint the config uses answers "
              "and accepts the key and the model (one cheap request each).")
@state_options
@handle_errors
def validate(config: str, check_models: bool, home: str, db: str) -> None:
    """Check CONFIG as `pipeline run` does, and create nothing. Exit 0 when it is valid, 2 when
    not. (It reads no state store: --home and --db are accepted like everywhere and not used.)"""
    s = api.validate(config, check_models=check_models)
    click.echo(f"OK: {config}: {s['name']}, {s['num_records']:,} records, {len(s['columns'])} columns: "
               + ", ".join(s["columns"]))
    for alias, m in s["models"].items():
        state = "checked" if m["checked"] and not m["warning"] else "answered with a warning" if m["checked"] \
            else "not checked (--check-models checks it)"
        click.echo(f"{m['where']}: {state}; used by {', '.join(m['columns'])}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-n", "n", type=click.IntRange(min=1), default=5, show_default=True, metavar="N",
              help="How many records (the first N of the run; at most num_records).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects, one per record.")
@click.option("--show-prompts", is_flag=True,
              help="Also show each LLM cell's rendered prompt (with --json: a key _prompts per record).")
@click.option("--no-check-models", is_flag=True, help="Skip the check of the model endpoints.")
@state_options
@handle_errors
def preview(config: str, n: int, as_json: bool, show_prompts: bool, no_check_models: bool, home: str, db: str) -> None:
    """Compute the first N records of CONFIG in memory and print them. Creates nothing: no run,
    no state store, no file under --home (accepted like everywhere, not used)."""
    from pipeline import previews

    try:
        result = previews.compute_preview(config, n, check_models=not no_check_models, show_prompts=show_prompts)
    except KeyboardInterrupt:  # nothing was created: nothing to record or resume
        click.echo("preview: interrupted", err=True)
        sys.exit(SIGNAL_EXIT[signal.SIGINT])
    if as_json:
        click.echo(previews.to_json(result))
    else:
        previews.print_table(result)
    if result.computed < n:
        click.echo(f"preview: the config has only {result.computed:,} records", err=True)
    if len(result.records) < result.computed:
        click.echo(f"preview: {result.computed - len(result.records):,} of {result.computed:,} records dropped "
                   "(left out above, as export leaves them out)", err=True)
    lines = _failure_lines(result.failures)
    if lines:
        click.echo("\n".join(lines), err=True)
    if result.status == "failed" or not result.records:
        why = result.reason or ("too many tasks failed (shutdown_error_rate)" if result.records else
                                "no record came out")
        click.echo(f"preview: {why}; fix the cause above", err=True)
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("query")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects.")
@state_options
@handle_errors
def sql(query: str, as_json: bool, home: str, db: str) -> None:
    """Run a read-only QUERY on the state store (tables: runs, row_groups, tasks, column_progress, ...)."""
    api.require_store(home, db)
    _, store = api.open_state(home, db)
    try:
        columns, rows = store.read_query(query)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([dict(zip(columns, r)) for r in rows], default=str))
        return
    click.echo("\t".join(columns))
    for r in rows:
        click.echo("\t".join("" if v is None else str(v) for v in r))


@main.group()
def db() -> None:
    """The state store's schema (Alembic migrations)."""


@db.command("upgrade")
@state_options
@handle_errors
def db_upgrade(home: str, db: str) -> None:
    """Migrate the state store to the newest schema."""
    from pipeline.store import migrate

    _, url = api.prepare(home, db)
    migrate.upgrade(url)
    click.echo(f"state store at revision {migrate.current(url)}")


@db.command("current")
@state_options
@handle_errors
def db_current(home: str, db: str) -> None:
    """Show the state store's schema revision (and the newest this version knows)."""
    from pipeline.store import migrate

    _, url = api.resolve_paths(home, db)
    missing = api.missing_store(home, db)
    current = f"(no database at {missing} yet)" if missing else (migrate.current(url) or "(empty)")
    click.echo(f"current: {current}\nhead: {migrate.head()}")


if __name__ == "__main__":  # pragma: no cover
    main()
