"""The command line in this process (click's CliRunner), beside the subprocess tests: help and
docs of every command, and the one place where what a command raises becomes an exit code
(pipeline.cli.PipelineGroup). Commands that end through ``os._exit`` (run, resume, retry,
worker) are left to the subprocess tests."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from pipeline import api, surface
from pipeline.cli import main
from pipeline.errors import PipelineError, RunInUseError, StoreError
from tests.conftest import ROOT


@pytest.fixture
def invoke(monkeypatch):
    """``invoke(*args) -> click.testing.Result``, stdout and stderr apart. The command line sets
    surface.CLI (advice names flags) and surface.PLACE (its --home/--db); they are put back
    afterwards for the Python API's tests."""
    monkeypatch.setattr(surface, "CLI", False)
    monkeypatch.setattr(surface, "PLACE", "")
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args))


def commands(group: click.Group = main, prefix: str = "") -> dict[str, click.Command]:
    """Every command, by its full name (``db upgrade``), groups included."""
    found = {}
    for name, command in group.commands.items():
        found[prefix + name] = command
        if isinstance(command, click.Group):
            found.update(commands(command, f"{prefix}{name} "))
    return found


def test_every_command_has_help_and_is_documented_in_the_readme(invoke):
    readme = (ROOT / "README.md").read_text()
    assert {"run", "resume", "worker", "retry", "status", "runs", "rm", "export", "report", "graph", "validate",
            "preview", "sql", "db", "db upgrade", "db current"} <= set(commands())
    for name, command in commands().items():
        assert (command.help or "").strip(), f"`pipeline {name}` has no help text"
        result = invoke(*name.split(), "--help")
        assert result.exit_code == 0 and result.stdout.startswith(f"Usage: main {name}"), result.output
        assert f"`pipeline {name}" in readme, f"README.md does not document `pipeline {name}`"


def test_the_top_level_help_lists_every_command(invoke):
    result = invoke("--help")
    assert result.exit_code == 0
    listed = result.stdout.split("Commands:")[1]
    assert all(f"  {name} " in listed for name in main.commands)


def test_a_pipeline_error_is_one_redacted_line_on_stderr_and_exit_2(invoke, monkeypatch):
    def refuse(*args, **kwargs):
        raise RunInUseError("run busy is in use by 1 live worker (key sk-abcdefghijklmnopqrstuvwxyz123456)")

    monkeypatch.setattr(api, "delete_run", refuse)
    result = invoke("rm", "busy", "--yes")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == "error: run busy is in use by 1 live worker (key ***)\n"


def test_an_unknown_run_exits_2_naming_it_and_creates_nothing(invoke, tmp_path):
    home = tmp_path / "home"
    result = invoke("status", "nope", "--home", str(home))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no run with id 'nope'") and "pipeline runs" in result.stderr
    assert not home.exists()
    assert invoke("status", "bad id!", "--home", str(home)).exit_code == 2


@pytest.mark.parametrize("args, patched, line", [
    (["validate", "p.yaml"], "validate", "interrupted: nothing was changed\n"),
    (["graph", "p.yaml"], "graph", "interrupted: nothing was changed\n"),
    (["preview", "p.yaml"], "compute_preview", "preview: interrupted\n"),
    (["status", "some-run", "--watch"], "status", ""),  # Ctrl-C is how --watch ends
])
def test_ctrl_c_that_reaches_the_command_line_exits_130_with_one_line(invoke, monkeypatch, args, patched, line):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, patched, interrupted)
    result = invoke(*args)
    assert result.exit_code == 130
    assert result.stderr == line and "Aborted!" not in result.output


def test_bad_usage_exits_2_with_clicks_message(invoke):
    result = invoke("resume", "some-run", "--plan")
    assert result.exit_code == 2
    assert "--plan and --json go with --config FILE" in result.stderr
    assert invoke("no-such-command").exit_code == 2


def test_sql_prints_columns_and_rows_from_the_api(invoke, monkeypatch):
    seen = {}

    def query(sql, *, home=None, db=None):
        seen.update(sql=sql, home=home)
        return ["run_id", "n"], [("a", 1), ("b", None)]

    monkeypatch.setattr(api, "query", query)
    result = invoke("sql", "select run_id, n from x", "--home", "h")
    assert result.exit_code == 0 and result.stdout == "run_id\tn\na\t1\nb\t\n"
    assert seen == {"sql": "select run_id, n from x", "home": "h"}
    assert invoke("sql", "select 1", "--json").stdout == '[{"run_id": "a", "n": 1}, {"run_id": "b", "n": null}]\n'


def test_graph_sql_and_db_are_api_calls_that_create_nothing_until_asked(tmp_path):
    quickstart = ROOT / "examples" / "quickstart.yaml"
    assert api.graph(quickstart, format="mermaid").startswith("graph TD")
    with pytest.raises(PipelineError, match="format"):
        api.graph(quickstart, format="dot")
    home = tmp_path / "h"
    with pytest.raises(StoreError, match="no state store"):
        api.query("select 1", home=home)
    current = api.db_current(home=home)
    assert current["current"] is None and current["missing"] == str(home / "state.db")
    assert not home.exists()
    assert api.db_upgrade(home=home) == current["head"]
    assert api.db_current(home=home) == {"current": current["head"], "head": current["head"], "missing": None}
    assert api.query("select count(*) as n from runs", home=home) == (["n"], [(0,)])


def test_a_run_failed_by_the_error_rate_advises_retry_and_accept_changes_for_a_fixed_module():
    from pipeline.api.jobs import RunResult
    from pipeline.cli_text import stop_lines

    lines = stop_lines(RunResult("r1", "failed", reason="9 of the last 10 finished tasks failed for good "
                                                        "(shutdown_error_rate 0.5)"))
    assert lines[0].startswith("run r1 failed: 9 of the last 10")
    assert "`pipeline retry r1`" in lines[1] and "--accept-changes" in lines[1] and "python module" in lines[1]
