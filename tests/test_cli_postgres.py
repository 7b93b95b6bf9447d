"""The same command line over PostgreSQL (a real server): workers on several machines share a run
through the database and a shared home folder."""

from __future__ import annotations

import collections
import uuid

import pandas as pd
import pytest

from tests.conftest import POSTGRES_URL, cli, cli_env, cli_popen, logged_pipeline, read_calls

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="PIPELINE_TEST_POSTGRES_URL is not set")


def export(run_id, home, tmp_path, db):
    out = tmp_path / f"{run_id}.parquet"
    cli("export", run_id, "--output", str(out), home=home, db=db, check=True)
    return pd.read_parquet(out)


@pytest.mark.slow
def test_a_run_on_postgres_exports_what_the_same_run_on_sqlite_does(tmp_path, postgres_url):
    cfg = logged_pipeline(tmp_path / "p", records=200, rg=50)
    env = cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls"))
    rid = f"pg-{uuid.uuid4().hex[:8]}"
    home = tmp_path / "home"
    proc = cli("run", str(cfg), "--run-id", rid, "--quiet", home=home, db=postgres_url, env=env)
    assert proc.returncode == 0, proc.stderr
    cli("run", str(cfg), "--run-id", "lite", "--quiet", home=home, env=env, check=True)
    pd.testing.assert_frame_equal(export(rid, home, tmp_path, postgres_url), export("lite", home, tmp_path, None))
    status = cli("status", rid, "--json", home=home, db=postgres_url, check=True).stdout
    assert '"status": "complete"' in status
    rows = cli("sql", f"select rows_done from column_progress where run_id = '{rid}'", "--json",
               home=home, db=postgres_url, check=True).stdout
    assert rows.count('"rows_done": 200') == 9
    assert cli("sql", "delete from runs", home=home, db=postgres_url).returncode == 2


@pytest.mark.slow
def test_two_workers_share_a_postgres_run_with_no_task_executed_twice(tmp_path, postgres_url):
    cfg = logged_pipeline(tmp_path / "p", records=800, rg=50, in_flight=16)
    calls = tmp_path / "calls"
    env = cli_env(PIPELINE_TEST_CALLS=str(calls))
    rid = f"pgw-{uuid.uuid4().hex[:8]}"
    home = tmp_path / "home"
    cli("run", str(cfg), "--run-id", rid, "--create-only", home=home, db=postgres_url, check=True)
    workers = [cli_popen("worker", rid, "--quiet", home=home, db=postgres_url, env=env) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    counts = collections.Counter(read_calls(calls))
    assert counts and max(counts.values()) == 1
    assert len(export(rid, home, tmp_path, postgres_url)) == 800
