"""The `pipeline` command. Each command is a thin layer over one function of pipeline.api; what
it prints is made by :mod:`pipeline.cli_text`.

Exit codes: 0 complete; 1 the run ended failed (its error rate, a model that stayed down, a
checkpoint that cannot be written; resumable); 2 bad usage, bad config, unknown or taken run id,
a model endpoint refused by the preflight, files changed since the run started, a damaged
row-group file at export; 130 after SIGINT; 143 after SIGTERM. Errors become exit codes in one
place, :class:`PipelineGroup`; the end of a run becomes one in :func:`_finish`.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from typing import Any, Callable

import click
from click.core import ParameterSource

from pipeline import api, cli_text, surface
from pipeline.errors import PipelineError
from pipeline.redact import excepthook, redact
from pipeline.states import RunStatus

sys.excepthook = excepthook  # a traceback that escapes is printed redacted too

EXIT_OK, EXIT_FAILED = 0, 1  # 2 comes from PipelineError.exit_code
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
ACCEPT_CHANGES_HELP = ("Go on although a python module or seed file changed since the run started: keep every "
                       "recorded cell, compute the rest with the files as they are now (recorded in run_changes).")


def state_options(fn: Callable) -> Callable:
    """--home and --db, shared by every command (and remembered for the hints it prints)."""
    inner = fn

    @functools.wraps(inner)
    def fn(*args: Any, **kw: Any) -> Any:
        ctx = click.get_current_context()
        typed = {name: kw.get(name) if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE else None
                 for name in ("home", "db")}  # set by $PIPELINE_HOME/$PIPELINE_DB: the next command has them too
        surface.PLACE = cli_text.place(typed["home"], typed["db"])  # for every command a message advises
        return inner(*args, **kw)

    fn = click.option("--db", envvar="PIPELINE_DB", default=None, metavar="URL",
                      help="State store URL (SQLite or PostgreSQL). Default: $PIPELINE_DB, else "
                           "sqlite:///<home>/state.db.")(fn)
    fn = click.option("--home", envvar="PIPELINE_HOME", default=None, metavar="DIR",
                      help="Folder of run outputs and the default state store. Default: $PIPELINE_HOME, else "
                           "./.pipeline.")(fn)
    return fn


#: What Ctrl-C prints when it reaches the command line (None: nothing, the exit code says it).
INTERRUPTED = {"status": None, "preview": "preview: interrupted"}


class PipelineGroup(click.Group):
    """The `pipeline` command group; the one place where what a command raises becomes an exit
    code. A PipelineError is one line on stderr (redacted) and its ``exit_code`` (2). Ctrl-C
    that reaches here came before a run's own signal handling was in place (loading a config,
    importing a user module, hashing files) or in a command that only reads: nothing was
    started, and the exit code says SIGINT (click would print "Aborted!" and exit 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            _say(f"error: {exc}")
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            line = INTERRUPTED.get(ctx.invoked_subcommand or "", "interrupted: nothing was changed")
            if line is not None:
                _say(line)
            sys.exit(SIGNAL_EXIT[signal.SIGINT])


def _say(text: str, err: bool = True) -> None:
    """Print a message (stderr unless ``err=False``), redacted; the commands it advises get the
    --home/--db this command was typed with, so that they work as printed (a password in a --db
    URL is printed as ``***`` all the same: CONTRACT section 8)."""
    click.echo(redact(cli_text.with_place(text, surface.PLACE)), err=err)


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
    """End run/resume/retry/worker: one summary on stderr, then the exit code of how the run
    ended (0 complete, 130/143 after a signal, 1 otherwise)."""
    if result.status == RunStatus.COMPLETE and result.extra.get("already_complete"):
        _say(f"run {result.run_id} is already complete; nothing to do")
        _exit(EXIT_OK)
    try:
        _say(cli_text.summary(api.status(result.run_id, home=home, db=db), surface.PLACE))
    except PipelineError as exc:  # the summary is a courtesy: never let it change the exit code
        _say(f"(no summary: {exc})")
    if result.status == RunStatus.COMPLETE:
        _exit(EXIT_OK)
    for line in cli_text.stop_lines(result):
        _say(line)
    _exit(EXIT_FAILED if result.signal is None else SIGNAL_EXIT.get(result.signal, 128 + result.signal))


def _progress(quiet: bool) -> cli_text.Progress | None:
    return None if quiet else cli_text.Progress()


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
def run(config: str, run_id: str | None, num_records: int | None, quiet: bool, create_only: bool, trace: bool,
        no_check_models: bool, reuse: str | None, home: str, db: str) -> None:
    """Validate CONFIG, create a run and run it to the end.

    Prints `run_id: <id>` as the first line of stdout."""
    def created(rid: str) -> None:
        click.echo(f"run_id: {rid}")
        sys.stdout.flush()

    result = api.run(config, home=home, db=db, run_id=run_id, num_records=num_records, on_created=created,
                     progress=_progress(quiet), start=not create_only, trace=trace,
                     close_store=create_only, check_models=not no_check_models, reuse=reuse)
    if result.extra.get("reused") is not None:
        _say(cli_text.reused_line(result.extra["reused"], reuse))
    if result.status == "created":
        _say(f"created run {result.run_id}; start it with `pipeline worker {result.run_id}`")
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
    result = api.resume(run_id, home=home, db=db, progress=_progress(quiet), trace=trace,
                        close_store=False, repair=repair, accept_changes=accept_changes, config=config)
    change = result.extra.get("change")
    if change is not None:
        _say(change.to_text())
    for line in cli_text.repaired_lines(result.extra.get("repaired", []), run_id) if repair else ():
        _say(line)
    _finish(result, home, db)


@main.command()
@click.argument("run_id")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--accept-changes", is_flag=True, help=ACCEPT_CHANGES_HELP)
@state_options
def worker(run_id: str, quiet: bool, accept_changes: bool, home: str, db: str) -> None:
    """Join RUN_ID as one more worker (several may run at once)."""
    _finish(api.resume(run_id, home=home, db=db, progress=_progress(quiet), close_store=False,
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
def retry(run_id: str, columns: tuple[str, ...], error: str | None, quiet: bool, trace: bool, accept_changes: bool,
          home: str, db: str) -> None:
    """Reopen the failed tasks of RUN_ID (all, or those matching --column/--error) with the
    records they dropped, then continue the run as `resume` does."""
    def reopened(r: api.Reopened) -> None:
        for line in cli_text.reopened_lines(r, run_id):
            _say(line)

    result = api.retry(run_id, columns=list(columns) or None, error=error, home=home, db=db, trace=trace,
                       progress=_progress(quiet), close_store=False, on_reopened=reopened,
                       accept_changes=accept_changes)
    if result.extra.get("nothing_to_retry"):
        _say(f"run {run_id} has no failed task{' matching' if columns or error else ''} to retry; nothing changed")
        _exit(EXIT_OK)
    _finish(result, home, db)


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--watch", is_flag=True, help="Refresh until the run is no longer running.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes.")
@state_options
def status(run_id: str, as_json: bool, watch: bool, interval: float, home: str, db: str) -> None:
    """Progress of RUN_ID per column and row group; works while the run is going."""
    panel = None
    if watch and not as_json and sys.stdout.isatty():  # the same live panel as `run` shows
        from pipeline.panel import LivePanel

        panel = LivePanel(stream=sys.stdout, tty=True)
    try:  # Ctrl-C ends --watch (exit 130, PipelineGroup); the run itself is not affected
        while True:
            s = api.status(run_id, home=home, db=db)
            running = s["status"] == RunStatus.RUNNING
            if panel is not None:
                panel.update(s, final=not running)
            else:
                if as_json:
                    click.echo(json.dumps(s))
                else:
                    _say(cli_text.status_text(s), err=False)
            if not watch or not running:
                return
            time.sleep(interval)
    finally:
        if panel is not None:
            panel.close()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@state_options
def runs(as_json: bool, home: str, db: str) -> None:
    """The runs in the state store, newest first."""
    rows = api.list_runs(home=home, db=db)
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        _say("no runs yet; `pipeline run CONFIG` starts one")
        return
    cli_text.print_runs(rows)


@main.command()
@click.argument("run_id")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@state_options
def rm(run_id: str, yes: bool, home: str, db: str) -> None:
    """Delete RUN_ID: its rows in every table of the state store and its folder
    <home>/runs/RUN_ID (exports written elsewhere stay). Asks first, unless --yes. Refused
    while the run has live workers."""
    if not yes:
        s = api.status(run_id, home=home, db=db)  # unknown run: exit 2 before asking
        try:
            sure = click.confirm(f"delete run {run_id} ({cli_text.shown(s)}, {s['records_done']:,} of "
                                 f"{s['num_records']:,} records written) and its files?", err=True)
        except click.Abort:  # no terminal to answer (stdin closed)
            sure = False
        if not sure:
            _say(f"nothing deleted; `pipeline rm {run_id} --yes` deletes without asking")
            sys.exit(EXIT_FAILED)
    res = api.delete_run(run_id, home=home, db=db)
    where = f" and {res['folder']}" if res["folder"] else ""
    _say(f"deleted run {run_id}: {sum(res['rows'].values()):,} rows{where}")


@main.command()
@click.argument("run_id")
@click.option("--output", "-o", required=True, type=click.Path(),
              help="File to write; '-' is standard output (then only the data goes there: messages go to "
                   "stderr). With --card: a folder, new or existing.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv", "jsonl"]), default=None,
              help="Default: from the output's suffix, else parquet.")
@click.option("--card", is_flag=True, help="OUTPUT is a folder: data/train.<format> and a dataset card README.md.")
@state_options
def export(run_id: str, output: str, fmt: str | None, card: bool, home: str, db: str) -> None:
    """Write the dataset of RUN_ID: records in order, dropped records left out. With --card,
    OUTPUT is a folder: the data in data/train.<format> and a Hugging Face dataset card in
    README.md (features and size, the config, the column graph, counts, drops by error, model
    usage)."""
    res = api.export(run_id, output, format=fmt, card=card, home=home, db=db)
    if not res["complete"]:
        _say(f"run {run_id} is not complete: exported the {res['records']:,} checkpointed records")
    where = "standard output" if res["path"] == "-" else res["path"]
    suffix = os.path.splitext(res["path"])[1].lstrip(".").lower()
    if not card and res["path"] != "-" and suffix != res["format"]:  # --format csv -o x.jsonl: which one won
        where += f" as {res['format']} (--format; the name ends in .{suffix})" if suffix else f" as {res['format']}"
    _say(f"wrote {res['records']:,} records to {where}")
    if card:
        _say(f"wrote the dataset card to {res['card']}")


@main.command()
@click.argument("run_id")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="FILE.png, FILE.svg or FILE.html (the picture), or any name with --format json.")
@click.option("--format", "fmt", type=click.Choice(["png", "svg", "html", "json"]), default=None,
              help="Default: from the output's suffix. json: the series the picture is drawn from.")
@state_options
def report(run_id: str, output: str, fmt: str | None, home: str, db: str) -> None:
    """A picture of RUN_ID made from its traces (run it with --trace): one lane per column showing
    when its tasks ran, records completed over time, calls in flight per model with 429s marked,
    and each invocation of a resumed run. Works while the run is going."""
    res = api.report(run_id, output, format=fmt, home=home, db=db)
    _say(f"wrote the report of {res['attempts']:,} task attempts in {res['invocations']} invocation(s) "
         f"to {res['path']}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["text", "mermaid", "json"]), default="text", show_default=True)
@state_options
def graph(config: str, fmt: str, home: str, db: str) -> None:
    """The column DAG of CONFIG: each column's strategy, task count and dependencies.
    (It reads no state store: --home and --db are accepted like everywhere and not used.)"""
    click.echo(api.graph(config, format=fmt))


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--check-models", is_flag=True, help="Also check that every model endpoint the config uses answers "
              "and accepts the key and the model (one cheap request each).")
@state_options
def validate(config: str, check_models: bool, home: str, db: str) -> None:
    """Check CONFIG as `pipeline run` does, and create nothing. Exit 0 when it is valid, 2 when
    not. (It reads no state store: --home and --db are accepted like everywhere and not used.)"""
    for line in cli_text.validate_lines(config, api.validate(config, check_models=check_models)):
        click.echo(line)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-n", "n", type=click.IntRange(min=1), default=5, show_default=True, metavar="N",
              help="How many records (the first N of the run; at most num_records).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects, one per record.")
@click.option("--show-prompts", is_flag=True,
              help="Also show each LLM cell's rendered prompt (with --json: a key _prompts per record).")
@click.option("--no-check-models", is_flag=True, help="Skip the check of the model endpoints.")
@state_options
def preview(config: str, n: int, as_json: bool, show_prompts: bool, no_check_models: bool, home: str, db: str) -> None:
    """Compute the first N records of CONFIG in memory and print them. Creates nothing: no run,
    no state store, no file under --home (accepted like everywhere, not used)."""
    result = api.compute_preview(config, n, check_models=not no_check_models, show_prompts=show_prompts)
    if as_json:
        click.echo(cli_text.preview_json(result))
    else:
        cli_text.print_preview(result)
    for line in cli_text.preview_notes(result, n):
        _say(line)
    failure = cli_text.preview_failure(result)
    if failure is not None:
        _say(failure)
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("query")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects.")
@state_options
def sql(query: str, as_json: bool, home: str, db: str) -> None:
    """Run a read-only QUERY on the state store (tables: runs, row_groups, tasks, column_progress, ...)."""
    columns, rows = api.query(query, home=home, db=db)
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
def db_upgrade(home: str, db: str) -> None:
    """Migrate the state store to the newest schema."""
    click.echo(f"state store at revision {api.db_upgrade(home=home, db=db)}")


@db.command("current")
@state_options
def db_current(home: str, db: str) -> None:
    """Show the state store's schema revision (and the newest this version knows)."""
    rev = api.db_current(home=home, db=db)
    current = f"(no database at {rev['missing']} yet)" if rev["missing"] else (rev["current"] or "(empty)")
    click.echo(f"current: {current}\nhead: {rev['head']}")


if __name__ == "__main__":  # pragma: no cover
    main()
