"""Row-group files through the real command line: a stale worker never overwrites a checkpoint,
a lost or damaged file is named and recomputed, a checkpoint that cannot be written stops the
run resumably, and an export is whole or absent."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from tests.conftest import cli, cli_env, cli_popen

SLOW_FNS = """
import os, time

def slow(row):
    # The first call for record 0 (in whichever worker makes it) waits, then fails late.
    i = int(row["i"])
    folder = os.environ["PIPELINE_TEST_FLAGS"]
    if i == 0:
        try:
            os.close(os.open(os.path.join(folder, "claimed"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            with open(os.path.join(folder, "started.tmp"), "w") as f:
                f.write(f"{os.getpid()} {time.time()}")
            os.replace(os.path.join(folder, "started.tmp"), os.path.join(folder, "started"))
            time.sleep(float(os.environ.get("PIPELINE_TEST_SLOW_S", "3")))
            raise ValueError("a late failure")
    return i * 2
"""


def make_config(folder: Path, *, records: int = 600, rg: int = 100, settings: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "slow_fns.py").write_text(SLOW_FNS)
    (folder / "ids.csv").write_text("i\n" + "".join(f"{i}\n" for i in range(records)))
    (folder / "cfg.yaml").write_text(
        f"name: files\nnum_records: {records}\nrow_group_size: {rg}\nseed: 3\n"
        f"settings: {{max_concurrent_row_groups: 2{settings}}}\n"
        "columns:\n"
        "  - {name: ids, type: seed_dataset, path: ids.csv, columns: [i], order: sequential}\n"
        "  - {name: u, type: sampler, sampler: uniform, params: {low: 0, high: 1}}\n"
        "  - {name: twice, type: python, function: 'slow_fns:slow', requires: [i]}\n"
        "  - {name: label, type: expression, expr: 'r{{ i }}'}\n")
    return folder / "cfg.yaml"


def finish(proc, timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def poll(condition, what: str, timeout: float = 30.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def query(home: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def stop_outside_a_transaction(proc, home: Path) -> None:
    """SIGSTOP a worker at a moment it does not hold SQLite's write lock (it renews its leases
    every lease_s / 3; stopped inside that transaction it would lock every other worker out)."""
    for _ in range(50):
        proc.send_signal(signal.SIGSTOP)
        con = sqlite3.connect(home / "state.db", timeout=0.5, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            proc.send_signal(signal.SIGCONT)
        finally:
            con.close()
    raise AssertionError("the worker always held the write lock")


def export_frame(run_id: str, home: Path, out: Path) -> pd.DataFrame:
    cli("export", run_id, "--output", str(out), home=home, check=True)
    return pd.read_parquet(out)


def test_a_stale_worker_never_overwrites_the_checkpoint_of_the_worker_that_took_over(tmp_path):
    """Worker A holds row group 0 with one cell in flight and is stopped (SIGSTOP) past its
    lease; worker B takes row group 0 over and checkpoints it; A continues, its late cell fails,
    and A finishes the row group as well. Its file must never become the row group's file.

    The race is widened without touching A: while A is continued, the test holds SQLite's write
    lock until A has logged its late failure, so A's lease renewal (which would tell it the
    lease is gone) waits, and A finishes the row group first, as a worker slowed by a busy
    database would."""
    cfg = make_config(tmp_path / "p", settings=", lease_s: 3")
    home, flags = tmp_path / "home", tmp_path / "flags"
    flags.mkdir()
    env = cli_env(PIPELINE_TEST_FLAGS=str(flags), PIPELINE_TEST_SLOW_S="3")
    cli("run", str(cfg), "--run-id", "stale", "--create-only", home=home, check=True)
    a_log = tmp_path / "a.log"
    with open(a_log, "w") as log:
        a = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker", "stale", "--quiet", "--home", str(home)],
                             stdout=subprocess.DEVNULL, stderr=log, env=env)
    b = None
    try:
        poll(lambda: (flags / "started").exists(), "A's slow cell to start", proc=a)
        started_at = float((flags / "started").read_text().split()[1])
        # Every other task is recorded: the slow cell of record 0 is all that is left.
        done = ("select count(*) from tasks where row_group = 0 and state = 'done' "
                "and column_name in ('twice', 'label')")
        poll(lambda: query(home, done)[0][0] == 199, "row group 0's other tasks to be recorded", proc=a)
        checkpointed = "select count(*) from row_groups where state = 'checkpointed'"
        poll(lambda: query(home, checkpointed)[0][0] == 5, "A to checkpoint the other row groups", proc=a)
        stop_outside_a_transaction(a, home)
        b = cli_popen("worker", "stale", "--quiet", home=home, env=env)
        code, err = finish(b)
        assert code == 0, err
        # B took row group 0 over (A's lease expired) and checkpointed it with every record.
        [(path, epoch)] = query(home, "select path, lease_epoch from row_groups where row_group = 0")
        assert epoch >= 2 and pq.read_table(home / path).num_rows == 100
        # A's slow cell has slept its time out while A was stopped: it fails as soon as A goes on.
        poll(lambda: time.time() >= started_at + 3.0, "A's slow cell to be due")
        lock = sqlite3.connect(home / "state.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            a.send_signal(signal.SIGCONT)
            poll(lambda: "a late failure" in a_log.read_text(), "A's late cell to fail", proc=a)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert a.wait(timeout=60) == 0, a_log.read_text()
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.communicate()
    status = json.loads(cli("status", "stale", "--json", home=home, check=True).stdout)
    assert (status["records_done"], status["records_dropped"], status["damaged_files"]) == (600, 0, [])
    df = export_frame("stale", home, tmp_path / "stale.parquet")
    assert len(df) == 600 and df["twice"].tolist() == [2 * i for i in range(600)]
    [(path,)] = query(home, "select path from row_groups where row_group = 0")
    pd.testing.assert_frame_equal(pq.read_table(home / path).to_pandas(), df.iloc[:100])
    # The folder holds exactly the files the store names: A removed its own, B the older ones.
    named = {Path(p).name for (p,) in query(home, "select path from row_groups")}
    assert {f.name for f in (home / "runs" / "stale" / "row_groups").iterdir()} == named
