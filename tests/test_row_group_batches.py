"""Row-group rows are created in batches as workers reach them, so creating a run costs the same
whatever num_records; every reader counts the row groups not created yet as pending."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import uuid

import pytest

from pipeline.store import open_store
from tests.conftest import ROOT, cli, cli_env
from tests.engine_helpers import AsyncFn, dataset, make_run, spec


def test_the_engine_finishes_a_run_whose_row_groups_are_created_as_it_goes(tmp_path, db_url):
    store = open_store(db_url)
    store.row_group_batch = 1
    try:
        specs = [spec("i", "batch"), spec("double", deps=["i"])]
        gens = {"i": AsyncFn(lambda df: list(df.index), "batch"), "double": AsyncFn(lambda row: row["i"] * 2)}
        run_id = f"lazy-{uuid.uuid4().hex[:8]}"
        sched, _ = make_run(specs, gens, num_records=23, row_group_size=3, home=tmp_path, store=store,
                            run_id=run_id, max_concurrent_row_groups=2)
        assert asyncio.run(asyncio.wait_for(sched.run(), 30)) == "complete"
        counts = store.row_group_counts(run_id)
        assert counts["checkpointed"] == counts["total"] == 8
        df = dataset(store, tmp_path, run_id)
        assert list(df["i"]) == list(range(23)) and list(df["double"]) == [2 * i for i in range(23)]
    finally:
        store.close()


# -- through the command line: a huge run is created at once, and status answers -----------------

HUGE = textwrap.dedent("""\
    name: huge
    num_records: {records}
    row_group_size: {size}
    columns:
      - {{name: id, type: sampler, sampler: uuid}}
      - {{name: n, type: sampler, sampler: integer, params: {{low: 1, high: 9}}}}
    """)


def run_measured(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """`pipeline ARGS` in a subprocess; its peak RSS in kB (the children's ru_maxrss grows to the
    largest child so far, so each call gets a fresh interpreter to measure from)."""
    code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "pipeline.cli", *args],
                          capture_output=True, text=True, env=cli_env(), timeout=120, cwd=ROOT)
    *rest, peak = proc.stderr.rstrip("\n").split("\n")
    proc.stderr = "\n".join(rest)
    return proc, int(peak)


@pytest.mark.parametrize("records,size", [(10_000_000, 1), (10**12, 1000)])
@pytest.mark.slow
def test_a_run_of_any_size_is_created_at_once_and_status_answers(tmp_path, records, size):
    cfg = tmp_path / "huge.yaml"
    cfg.write_text(HUGE.format(records=records, size=size))
    home = tmp_path / "home"
    proc, peak_kb = run_measured("run", str(cfg), "--run-id", "huge", "--create-only", "--home", str(home))
    assert proc.returncode == 0, proc.stderr
    # Memory: what a small run costs (python, SQLAlchemy, pandas, ...), not ~8 GB.
    assert peak_kb < 400_000, peak_kb
    # Store: one batch of rows, whatever the run's size.
    assert (home / "state.db").stat().st_size < 5_000_000
    rows = json.loads(cli("sql", "select count(*) as n from row_groups", "--json", home=home, check=True).stdout)
    assert rows == [{"n": 1000}]
    status = json.loads(cli("status", "huge", "--json", home=home, check=True).stdout)
    assert status["num_records"] == records and status["records_done"] == 0
    assert status["row_groups"] == {"total": -(-records // size), "checkpointed": 0, "active": 0}
    assert all(c["done"] == 0 for c in status["columns"].values())


@pytest.mark.slow
def test_a_run_of_more_row_groups_than_one_batch_runs_exports_and_resumes_through_the_cli(tmp_path):
    cfg = tmp_path / "mid.yaml"
    cfg.write_text(HUGE.format(records=1_050, size=1).replace("columns:", "settings: {max_concurrent_row_groups: 8}\ncolumns:"))
    home = tmp_path / "home"
    cli("run", str(cfg), "--run-id", "mid", "--quiet", home=home, check=True)
    status = json.loads(cli("status", "mid", "--json", home=home, check=True).stdout)
    assert status["status"] == "complete" and status["records_done"] == 1_050
    assert status["row_groups"] == {"total": 1_050, "checkpointed": 1_050, "active": 0}
    out = tmp_path / "mid.csv"
    proc = cli("export", "mid", "--output", str(out), home=home, check=True)
    assert "not complete" not in proc.stderr and len(out.read_text().splitlines()) == 1 + 1_050
    proc = cli("resume", "mid", home=home, check=True)
    assert "already complete" in proc.stderr
