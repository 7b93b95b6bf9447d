"""Commands that answer at once (`status`, `runs`, `sql` load neither Alembic nor pandas), the
`runs` table, `pipeline rm`, and PostgreSQL stores that refuse an out-of-date schema."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import pipeline
from pipeline.errors import RunNotFoundError
from pipeline.store import migrate
from pipeline.store.sql import make_engine
from tests.conftest import ROOT, cli, cli_env, cli_popen, logged_pipeline
from tests.test_failures import SLOW_INIT  # a generator whose __init__ touches $STUCK_FLAG, then sleeps

FNS = '''
def half(row):
    if row["n"] % 4 == 0:
        raise ValueError(f"no half of {row['n']}")
    return row["n"] / 2
'''


def small_config(folder: Path, records: int = 40) -> Path:
    """Samplers, an expression and a python column that fails for a quarter of the records (so
    that failed tasks and dropped records are kept in the store too)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rm_fns.py").write_text(FNS)
    (folder / "cfg.yaml").write_text(textwrap.dedent(f"""\
        name: small
        num_records: {records}
        row_group_size: 10
        seed: 5
        settings: {{shutdown_error_rate: 1.0}}
        columns:
          - {{name: n, type: sampler, sampler: integer, params: {{low: 0, high: 100}}}}
          - {{name: word, type: sampler, sampler: category, params: {{values: [ant, bee]}}}}
          - {{name: label, type: expression, expr: "{{{{ word }}}}-{{{{ n }}}}"}}
          - {{name: half, type: python, function: "rm_fns:half", requires: [n]}}
        """))
    return folder / "cfg.yaml"


def make_run(cfg: Path, run_id: str, home: Path, db: str | None = None) -> None:
    proc = cli("run", str(cfg), "--run-id", run_id, "--quiet", home=home, db=db)
    assert proc.returncode in (0, 1), proc.stderr  # 1: it ended failed on its failed tasks; rows are there
    assert proc.stdout.startswith(f"run_id: {run_id}")


def rows_per_table(url: str, run_id: str, home: Path) -> dict[str, int]:
    """Rows of ``run_id`` in every table of the store that has a run_id column, counted with
    `pipeline sql`."""
    engine = make_engine(url)
    try:
        inspector = sa.inspect(engine)
        tables = [t for t in inspector.get_table_names()
                  if any(c["name"] == "run_id" for c in inspector.get_columns(t))]
    finally:
        engine.dispose()
    assert {"runs", "row_groups", "tasks", "run_columns", "workers", "dropped_records"} <= set(tables)
    union = " UNION ALL ".join(f"SELECT '{t}' AS t, COUNT(*) AS n FROM {t} WHERE run_id = '{run_id}'" for t in tables)
    out = cli("sql", union, "--json", home=home, db=url, check=True).stdout
    return {row["t"]: int(row["n"]) for row in json.loads(out)}


# -- what the quick commands import ------------------------------------------------------------

HEAVY = ["alembic", "pandas", "numpy", "pyarrow", "jinja2", "aiohttp", "jsonschema_rs", "pydantic", "yaml",
         "matplotlib", "pipeline.engine.scheduler", "pipeline.generators", "pipeline.config"]

PROBE = """
import json, sys
import pipeline.cli
try:
    pipeline.cli.main(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)), file=sys.stderr)
"""


def loaded_by(*args: str) -> list[str]:
    """The HEAVY modules loaded by `import pipeline.cli` and one command, in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                          env=cli_env(), cwd=ROOT, timeout=120)
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.slow
def test_status_runs_and_sql_of_a_current_store_load_neither_alembic_nor_pandas(tmp_path):
    home = tmp_path / "home"
    make_run(small_config(tmp_path / "p"), "quick", home)
    where = ["--home", str(home)]
    assert loaded_by("status", "quick", *where) == []
    assert loaded_by("status", "quick", "--json", *where) == []
    assert loaded_by("runs", *where) == []
    assert loaded_by("runs", "--json", *where) == []
    assert loaded_by("sql", "select run_id from runs", *where) == []
    assert loaded_by("--help") == []
    # export reads Parquet files (pyarrow, which loads numpy), but neither Alembic nor pandas
    for suffix in ("jsonl", "parquet"):
        out = tmp_path / f"quick.{suffix}"
        assert set(loaded_by("export", "quick", "--output", str(out), *where)) <= {"numpy", "pyarrow"}
        assert out.stat().st_size > 0


def test_reading_row_group_files_imports_neither_the_engine_nor_pandas():
    """pipeline.dataset keeps the format's JSON flag itself (the engine's buffer, which writes
    it, imports pandas); the two must agree."""
    from pipeline import dataset
    from pipeline.engine.buffer import JSON_FIELD

    assert set(JSON_FIELD) == {dataset._FLAG}
    probe = "import sys, pipeline.dataset; print(sorted(m for m in ('pandas', 'pipeline.engine') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                          timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_only_a_store_that_is_not_current_loads_alembic_which_upgrades_it(tmp_path):
    """The quick check sees a SQLite file at an old revision and lets Alembic upgrade it; the
    next command finds it current and does without Alembic."""
    home = tmp_path / "home"
    url = f"sqlite:///{home / 'state.db'}"
    migrate.upgrade(url, "0001")
    assert "alembic" in loaded_by("runs", "--home", str(home))
    assert migrate.current(url) == migrate.head()
    assert loaded_by("runs", "--home", str(home)) == []


# -- pipeline runs ---------------------------------------------------------------------------

@pytest.mark.slow
def test_runs_prints_a_table_with_a_header_status_and_record_counts(tmp_path):
    home = tmp_path / "home"
    make_run(small_config(tmp_path / "p", records=40), "counted", home)
    out = cli("runs", home=home, check=True).stdout.splitlines()
    assert out[0].split() == ["run", "id", "status", "created", "written", "/", "total", "dropped", "name"]
    row = next(line for line in out if line.startswith("counted"))
    status = json.loads(cli("status", "counted", "--json", home=home, check=True).stdout)
    assert 0 < status["records_dropped"] < 40
    written, dropped = status["records_done"], status["records_dropped"]
    assert written + dropped == 40
    assert row.split()[1] == status["status"]
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["created_at"]))
    assert created in row
    assert f"{written} / 40" in row and row.split()[-2] == str(dropped)
    listed = json.loads(cli("runs", "--json", home=home, check=True).stdout)
    assert listed == [{"run_id": "counted", "name": "small", "status": status["status"], "started": True,
                       "num_records": 40, "created_at": status["created_at"], "records_done": written,
                       "records_dropped": dropped}]


# -- pipeline rm -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.slow
def test_rm_deletes_every_row_and_the_folder_of_the_run_and_leaves_other_runs(tmp_path, backend, request):
    home = tmp_path / "home"
    db = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    url = db or f"sqlite:///{home / 'state.db'}"
    cfg = small_config(tmp_path / "p")
    make_run(cfg, "gone", home, db)
    make_run(cfg, "kept", home, db)
    before = rows_per_table(url, "gone", home)
    kept_before = rows_per_table(url, "kept", home)
    assert all(before[t] > 0 for t in ("runs", "run_columns", "row_groups", "tasks", "dropped_records"))
    assert (home / "runs" / "gone").is_dir()

    proc = cli("rm", "gone", "--yes", home=home, db=db)
    assert proc.returncode == 0, proc.stderr
    assert "deleted run gone" in proc.stderr
    assert rows_per_table(url, "gone", home) == {t: 0 for t in before}
    assert not (home / "runs" / "gone").exists()
    assert rows_per_table(url, "kept", home) == kept_before
    assert (home / "runs" / "kept").is_dir()
    assert [r["run_id"] for r in json.loads(cli("runs", "--json", home=home, db=db, check=True).stdout)] == ["kept"]
    out = tmp_path / "kept.jsonl"
    cli("export", "kept", "--output", str(out), home=home, db=db, check=True)
    assert len(out.read_text().splitlines()) == 40 - kept_before["dropped_records"]

    again = cli("rm", "gone", "--yes", home=home, db=db)
    assert again.returncode == 2 and "no run with id 'gone'" in again.stderr


@pytest.mark.slow
def test_rm_answered_no_changes_nothing(tmp_path):
    home = tmp_path / "home"
    make_run(small_config(tmp_path / "p"), "asked", home)
    url = f"sqlite:///{home / 'state.db'}"
    before = rows_per_table(url, "asked", home)
    cmd = [sys.executable, "-m", "pipeline.cli", "rm", "asked", "--home", str(home)]
    proc = subprocess.run(cmd, input="n\n", capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert "delete run asked" in proc.stderr and "[y/N]" in proc.stderr and "--yes" in proc.stderr
    assert rows_per_table(url, "asked", home) == before
    assert (home / "runs" / "asked").is_dir()
    proc = subprocess.run(cmd, input="y\n", capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert rows_per_table(url, "asked", home)["runs"] == 0


@pytest.mark.slow
def test_rm_of_an_unknown_run_exits_2_and_asks_nothing(tmp_path):
    home = tmp_path / "home"
    make_run(small_config(tmp_path / "p"), "there", home)
    proc = cli("rm", "not-there", home=home)
    assert proc.returncode == 2
    assert "no run with id 'not-there'" in proc.stderr and "[y/N]" not in proc.stderr
    assert cli("rm", "bad id!", "--yes", home=home).returncode == 2


@pytest.mark.slow
def test_rm_of_a_running_run_is_refused_until_its_worker_stops(tmp_path):
    home = tmp_path / "home"
    cfg = logged_pipeline(tmp_path / "p", records=400, rg=50, in_flight=4)
    env = cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls"), PIPELINE_TEST_SLEEP="0.5")
    proc = cli_popen("run", str(cfg), "--run-id", "busy", "--quiet", home=home, env=env)
    try:
        assert proc.stdout.readline().strip() == "run_id: busy"
        deadline = time.monotonic() + 60
        while not json.loads(cli("sql", "select owner from workers", "--json", home=home, check=True).stdout):
            assert time.monotonic() < deadline, "the run never registered its worker"
            time.sleep(0.1)
        refused = cli("rm", "busy", "--yes", home=home)
        assert refused.returncode == 2
        assert "run busy is in use by 1 live worker" in refused.stderr
        assert proc.poll() is None  # the run goes on
        assert (home / "runs" / "busy").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 143
    done = cli("rm", "busy", "--yes", home=home)
    assert done.returncode == 0, done.stderr
    assert json.loads(cli("runs", "--json", home=home, check=True).stdout) == []


def test_delete_run_in_the_api_returns_the_rows_and_folder_it_removed(tmp_path):
    home = tmp_path / "home"
    make_run(small_config(tmp_path / "p"), "api", home)
    res = pipeline.delete_run("api", home=home)
    assert res["run_id"] == "api" and res["rows"]["runs"] == 1 and res["rows"]["row_groups"] == 4
    assert res["folder"] == str(home / "runs" / "api") and not (home / "runs" / "api").exists()
    with pytest.raises(RunNotFoundError):
        pipeline.delete_run("api", home=home)


# -- PostgreSQL: the schema is upgraded on purpose ------------------------------------------------

@pytest.mark.slow
def test_a_postgres_store_at_an_older_revision_is_refused_until_db_upgrade(tmp_path, postgres_empty_url):
    url, home = postgres_empty_url, tmp_path / "home"
    migrate.upgrade(url, "0001")
    for args in (["runs"], ["status", "some-run"], ["run", str(small_config(tmp_path / "p")), "--run-id", "x"]):
        proc = cli(*args, home=home, db=url)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "schema revision 0001" in proc.stderr and f"run `pipeline db upgrade --home {home} --db " in proc.stderr
        assert migrate.current(url) == "0001"  # not upgraded behind the other workers' backs
    upgraded = cli("db", "upgrade", home=home, db=url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert migrate.current(url) == migrate.head()
    make_run(small_config(tmp_path / "p"), "after", home, url)
    assert [r["run_id"] for r in json.loads(cli("runs", "--json", home=home, db=url, check=True).stdout)] == ["after"]


@pytest.mark.slow
def test_rm_of_a_run_whose_generators_are_still_being_built_is_refused(tmp_path):
    """The gap between creating a run and its engine starting: rm used to delete the run under
    the process, which then reported 2,000 records written of a run that no longer existed."""
    (tmp_path / "slowmod.py").write_text(SLOW_INIT)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent("""\
        name: stuck
        num_records: 5
        columns:
          - {name: a, type: sampler, sampler: uuid}
          - {name: b, type: python, function: "slowmod:Slow", requires: [a]}
    """))
    home, flag = tmp_path / "home", tmp_path / "stuck.flag"
    proc = cli_popen("run", str(cfg), "--run-id", "early", "--quiet", home=home, env=cli_env(STUCK_FLAG=str(flag)))
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        refused = cli("rm", "early", "--yes", home=home)
        assert refused.returncode == 2 and "stop" in refused.stderr, refused.stderr
        assert (home / "runs" / "early").is_dir()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert cli("rm", "early", "--yes", home=home).returncode == 0  # once the process is gone
