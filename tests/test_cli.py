"""The command line as a user meets it: outputs, JSON shapes, exit codes, bad inputs."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, cli, cli_env

QUICKSTART = ROOT / "examples" / "quickstart.yaml"


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("cli") / "home"
    proc = cli("run", str(QUICKSTART), "--run-id", "qs", "--num-records", "300", home=home, check=True)
    return home, proc


@pytest.mark.slow
def test_run_prints_the_run_id_first_and_progress_on_stderr(done_run):
    home, proc = done_run
    assert proc.stdout.splitlines()[0] == "run_id: qs"
    assert "row groups 2/2" in proc.stderr
    assert (home / "runs" / "qs" / "row_groups" / "rg-000000-e1.parquet").exists()  # row group 0, lease epoch 1


@pytest.mark.slow
def test_status_json_has_the_contract_shape(done_run):
    home, _ = done_run
    s = json.loads(cli("status", "qs", "--json", home=home, check=True).stdout)
    assert {"run_id", "status", "num_records", "records_done", "records_dropped", "columns", "row_groups",
            "eta_s"} <= set(s)
    assert s["status"] == "complete" and s["num_records"] == 300 and s["records_done"] == 300
    assert s["row_groups"] == {"total": 2, "checkpointed": 2, "active": 0}
    assert list(s["columns"])[:3] == ["id", "product", "category"]
    assert s["columns"]["review"] == {"done": 300, "failed": 0, "deferred": 0, "in_flight": 0, "truncated": 0}
    # the rate: the run's 300 records over its wall time, in the JSON and in the text
    assert s["finished_at"] > s["created_at"]
    assert s["rate_records_s"] == pytest.approx(300 / (s["finished_at"] - s["created_at"]))
    text = cli("status", "qs", home=home, check=True).stdout
    assert "complete" in text and "review" in text
    assert f"rate: {s['rate_records_s']:,.1f} records/s" in text


@pytest.mark.slow
def test_runs_lists_newest_first(done_run, tmp_path):
    home, _ = done_run
    cli("run", str(QUICKSTART), "--run-id", "qs2", "--num-records", "10", "--quiet", home=home, check=True)
    runs = json.loads(cli("runs", "--json", home=home, check=True).stdout)
    assert [r["run_id"] for r in runs][:2] == ["qs2", "qs"]
    assert set(runs[0]) >= {"run_id", "name", "status", "num_records", "created_at"}
    assert "qs2" in cli("runs", home=home, check=True).stdout


@pytest.mark.slow
def test_export_formats_hold_the_same_records_in_order(done_run, tmp_path):
    home, _ = done_run
    frames = {}
    for fmt in ("parquet", "csv", "jsonl"):
        out = tmp_path / f"data.{fmt}"
        cli("export", "qs", "--output", str(out), "--format", fmt, home=home, check=True)
        frames[fmt] = {"parquet": pd.read_parquet, "csv": pd.read_csv,
                       "jsonl": lambda p: pd.read_json(p, lines=True)}[fmt](out)
    assert list(frames["parquet"].columns) == ["id", "product", "category", "stars", "price", "title", "review",
                                               "words", "price_rank"]
    for df in frames.values():
        assert len(df) == 300 and list(df["id"]) == list(frames["parquet"]["id"])


@pytest.mark.slow
def test_resume_of_a_complete_run_says_so_and_exits_0(done_run):
    home, _ = done_run
    proc = cli("resume", "qs", home=home)
    assert proc.returncode == 0 and "already complete" in proc.stderr


@pytest.mark.slow
def test_sql_reads_and_refuses_writes_with_exit_2(done_run):
    home, _ = done_run
    rows = json.loads(cli("sql", "select column_name, rows_done from column_progress where run_id='qs'",
                          "--json", home=home, check=True).stdout)
    assert {r["column_name"]: r["rows_done"] for r in rows}["id"] == 300 and len(rows) == 9
    for stmt in ("delete from runs", "update runs set status='failed'", "drop table tasks",
                 "insert into runs(run_id) values ('x')"):
        proc = cli("sql", stmt, home=home)
        assert proc.returncode == 2 and "read" in proc.stderr.lower(), (stmt, proc.stderr)
    assert cli("status", "qs", "--json", home=home, check=True).stdout.count('"complete"') == 1


@pytest.mark.slow
def test_graph_formats(tmp_path):
    text = cli("graph", str(QUICKSTART), check=True).stdout
    assert "review" in text and "from_scratch" in text
    mermaid = cli("graph", str(QUICKSTART), "--format", "mermaid", check=True).stdout
    assert mermaid.startswith("graph TD") and "product --> title" in mermaid
    data = json.loads(cli("graph", str(QUICKSTART), "--format", "json", check=True).stdout)
    review = next(c for c in data["columns"] if c["name"] == "review")
    assert review["strategy"] == "cell" and review["tasks"] == 2000 and set(review["depends_on"]) == {"product", "stars"}
    # like every command it takes --home and --db (it needs no store, and creates none)
    home = tmp_path / "h"
    same = cli("graph", str(QUICKSTART), "--db", f"sqlite:///{tmp_path / 'x.db'}", home=home, check=True).stdout
    assert same == text and not home.exists() and not (tmp_path / "x.db").exists()


@pytest.mark.slow
def test_db_upgrade_and_current(tmp_path):
    home = tmp_path / "h"
    up = cli("db", "upgrade", home=home, check=True)
    cur = cli("db", "current", home=home, check=True).stdout
    from pipeline.store import migrate

    head = migrate.head()
    assert head in up.stdout and f"current: {head}" in cur and f"head: {head}" in cur


def assert_nothing_created(home: Path, run_id: str | None = None) -> None:
    runs_dir = home / "runs"
    assert not runs_dir.exists() or not any(runs_dir.iterdir()), list(runs_dir.iterdir())
    db = home / "state.db"
    if db.exists():
        assert sqlite3.connect(db).execute("select count(*) from runs").fetchone()[0] == 0


@pytest.mark.parametrize("mutation, words", [
    ("num_records: 0", ["num_records"]),
    ("columns:\n  - {name: a, type: nosuch}", ["a", "type"]),
    ("columns:\n  - {name: a, type: expression, expr: '{{ b }}'}", ["a", "b"]),
    ("columns:\n  - {name: a, type: expression, expr: '{{ oops'}", ["a"]),
    ("columns:\n  - {name: a, type: expression, expr: '{{ b }}'}\n  - {name: b, type: expression, expr: '{{ a }}'}",
     ["cycle", "a", "b"]),
    ("columns:\n  - {name: a, type: expression, expr: '{{ a }}'}", ["cycle", "a -> a"]),
    ("columns:\n  - {name: n, type: sampler, sampler: uuid}\n  - {name: p, type: python, function: 'os:getcwd', "
     "requires: [n, p]}", ["cycle", "p -> p"]),
    ("columns:\n  - {name: a, type: python, function: 'nomodule:f'}", ["a", "nomodule"]),
    ("columns:\n  - {name: a, type: llm_text, model: ghost, prompt: hi}", ["a", "ghost"]),
    ("columns:\n  - {name: a, type: sampler, sampler: uuid}\n  - {name: a, type: sampler, sampler: uuid}", ["a"]),
    ("colums: []", ["colums"]),
])
@pytest.mark.slow
def test_bad_config_exits_2_names_file_and_column_and_creates_nothing(tmp_path, mutation, words):
    cfg = tmp_path / "bad.yaml"
    base = "name: bad\nnum_records: 5\n"
    if not mutation.startswith("columns") and not mutation.startswith("colums"):
        base += "columns:\n  - {name: a, type: sampler, sampler: uuid}\n"
        text = base.replace("num_records: 5", mutation) if mutation.startswith("num_records") else base + mutation
    else:
        text = base + mutation + "\n"
    cfg.write_text(text)
    home = tmp_path / "home"
    proc = cli("run", str(cfg), home=home)
    assert proc.returncode == 2, proc.stderr
    assert str(cfg) in proc.stderr and all(w in proc.stderr for w in words), proc.stderr
    assert proc.stdout == ""
    assert_nothing_created(home)


def test_unset_api_key_env_is_a_config_error(tmp_path):
    cfg = tmp_path / "llm.yaml"
    cfg.write_text("name: l\nnum_records: 2\nmodels:\n  m: {base_url: 'http://127.0.0.1:9/v1', model: x, "
                   "api_key_env: PIPELINE_TEST_UNSET_KEY}\ncolumns:\n  - {name: a, type: llm_text, model: m, prompt: hi}\n")
    proc = cli("run", str(cfg), home=tmp_path / "home")
    assert proc.returncode == 2 and "PIPELINE_TEST_UNSET_KEY" in proc.stderr
    assert_nothing_created(tmp_path / "home")


@pytest.mark.parametrize("args", [["resume", "nope"], ["worker", "nope"], ["status", "nope"],
                                  ["export", "nope", "--output", "x.parquet"]])
@pytest.mark.slow
def test_unknown_run_id_exits_2(tmp_path, args):
    proc = cli(*args, home=tmp_path / "home", cwd=tmp_path)
    assert proc.returncode == 2 and "nope" in proc.stderr and "pipeline runs" in proc.stderr


@pytest.mark.parametrize("bad", ["-leading-dash"] + [pytest.param(bad, marks=pytest.mark.slow) for bad in
                                                      ("has space", "x" * 65, "semi;colon", "../up")])
def test_invalid_run_id_exits_2_and_creates_nothing(tmp_path, bad):
    home = tmp_path / "home"
    proc = cli("run", str(QUICKSTART), "--run-id", bad, home=home)
    assert proc.returncode == 2 and "run id" in proc.stderr
    assert_nothing_created(home)
    assert cli("status", bad, home=home).returncode == 2


@pytest.mark.slow
def test_taken_run_id_exits_2_and_changes_nothing(done_run):
    home, _ = done_run
    before = cli("status", "qs", "--json", home=home, check=True).stdout
    proc = cli("run", str(QUICKSTART), "--run-id", "qs", "--num-records", "5", home=home)
    assert proc.returncode == 2 and "already" in proc.stderr
    after = cli("status", "qs", "--json", home=home, check=True).stdout
    assert json.loads(before)["records_done"] == json.loads(after)["records_done"] == 300


@pytest.mark.slow
def test_env_vars_choose_home_and_db(tmp_path):
    home = tmp_path / "envhome"
    env = cli_env(PIPELINE_HOME=str(home))
    proc = cli("run", str(QUICKSTART), "--run-id", "e1", "--num-records", "5", "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (home / "state.db").exists() and (home / "runs" / "e1").is_dir()


@pytest.mark.slow
def test_trace_records_one_row_per_task_attempt_in_the_store_and_nothing_when_off(tmp_path):
    home = tmp_path / "home"
    cli("run", str(QUICKSTART), "--run-id", "tr", "--num-records", "20", "--trace", "--quiet", home=home, check=True)
    rows = json.loads(cli("sql", "select * from task_traces where run_id = 'tr'", "--json", home=home,
                          check=True).stdout)
    # 20 records x 3 cell columns (title, review, words) + 4 from_scratch roots + 1 batch column
    assert len(rows) == 20 * 3 + 4 + 1
    assert all(t["outcome"] == "ok" and t["attempt"] == 1 and t["finished_at"] >= t["started_at"] >= t["dispatched_at"]
               for t in rows)
    assert {t["column_name"] for t in rows} >= {"title", "review", "words"}
    cli("run", str(QUICKSTART), "--run-id", "notr", "--num-records", "20", "--quiet", home=home, check=True)
    none = cli("sql", "select count(*) as n from task_traces where run_id = 'notr'", "--json", home=home, check=True)
    assert json.loads(none.stdout) == [{"n": 0}]


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(example):
    data = json.loads(cli("graph", str(example), "--format", "json", check=True).stdout)
    assert data["columns"]


@pytest.mark.slow
def test_commands_that_only_read_create_nothing_where_there_is_no_store(tmp_path):
    cwd = tmp_path / "empty"
    cwd.mkdir()
    env = cli_env()
    for args, code in [(["status", "nope"], 2), (["resume", "nope"], 2), (["worker", "nope"], 2),
                       (["export", "nope", "--output", "x.csv"], 2), (["sql", "select 1"], 2),
                       (["runs", "--json"], 0), (["db", "current"], 0)]:
        proc = cli(*args, cwd=cwd, env=env)
        assert proc.returncode == code, (args, proc.stderr)
        assert list(cwd.iterdir()) == [], f"{args} created {list(cwd.iterdir())}"
    assert cli("runs", "--json", cwd=cwd, env=env).stdout.strip() == "[]"


def test_a_postgres_url_without_its_driver_says_what_to_install(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['psycopg'] = None; "  # as if psycopg were not installed
            "sys.argv = ['pipeline', 'runs', '--db', 'postgresql+psycopg://nobody@127.0.0.1/none']; "
            "from pipeline.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=tmp_path)
    assert proc.returncode == 2 and "pip install 'psycopg[binary]'" in proc.stderr and "'.[postgres]'" in proc.stderr
