"""Row-group files through the real command line: a stale worker never overwrites a checkpoint,
a lost or damaged file is named and recomputed, a checkpoint that cannot be written stops the
run resumably, and an export is whole or absent."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.errors import DamagedFileError, ExportError

from tests.conftest import cli, cli_env, cli_popen

SLOW_FNS = """
import asyncio, os, time


async def gated(row):
    # Waits until the file $PIPELINE_TEST_GATE exists (when it is set).
    gate = os.environ.get("PIPELINE_TEST_GATE")
    while gate and not os.path.exists(gate):
        await asyncio.sleep(0.01)
    return int(row["i"]) * 3

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


def make_config(folder: Path, *, records: int = 600, rg: int = 100, settings: str = "", function: str = "slow") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "slow_fns.py").write_text(SLOW_FNS)
    (folder / "ids.csv").write_text("i\n" + "".join(f"{i}\n" for i in range(records)))
    (folder / "cfg.yaml").write_text(
        f"name: files\nnum_records: {records}\nrow_group_size: {rg}\nseed: 3\n"
        f"settings: {{max_concurrent_row_groups: 2{settings}}}\n"
        "columns:\n"
        "  - {name: ids, type: seed_dataset, path: ids.csv, columns: [i], order: sequential}\n"
        "  - {name: u, type: sampler, sampler: uniform, params: {low: 0, high: 1}}\n"
        f"  - {{name: twice, type: python, function: 'slow_fns:{function}', requires: [i]}}\n"
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
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}: {err}")
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


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def complete(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A complete run ("done") of 300 records in row groups of 100, and its export. Tests that
    change it work on a copy of its home (copy_home)."""
    base = tmp_path_factory.mktemp("complete")
    home = base / "home"
    cfg = make_config(base / "p", records=300, function="gated")
    cli("run", str(cfg), "--run-id", "done", "--quiet", home=home, check=True)
    return home, export_frame("done", home, base / "original.parquet")


def copy_home(complete, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(complete[0], home)  # the state store (with its WAL) and the run's files
    return home


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip a byte"])
@pytest.mark.slow
def test_a_lost_or_damaged_row_group_file_is_named_and_repair_computes_it_again(complete, tmp_path, damage):
    home, original = copy_home(complete, tmp_path), complete[1]
    [(path,)] = query(home, "select path from row_groups where row_group = 1")
    target = home / path
    data = bytearray(target.read_bytes())
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))

    if damage == "flip a byte":  # status only stats the files (same size): export reads them
        assert json.loads(cli("status", "done", "--json", home=home, check=True).stdout)["damaged_files"] == []
    else:
        status = json.loads(cli("status", "done", "--json", home=home, check=True).stdout)
        assert [(d["row_group"], d["path"]) for d in status["damaged_files"]] == [(1, str(target))]
    if damage == "delete":
        text = cli("status", "done", home=home, check=True).stdout
        assert str(target) in text and "pipeline resume done --repair" in text

    out = tmp_path / "out.parquet"
    refused = cli("export", "done", "--output", str(out), home=home)
    assert refused.returncode == 2, refused.stderr
    assert str(target) in refused.stderr and "pipeline resume done --repair" in refused.stderr
    assert "Traceback" not in refused.stderr and not out.exists()
    with pytest.raises(DamagedFileError, match=r"pipeline\.resume\(.done., repair=True\)"):  # Python advice
        pipeline.load_dataset("done", home=home)

    repaired = cli("resume", "done", "--repair", "--quiet", home=home)
    assert repaired.returncode == 0, repaired.stderr
    assert "recomputed row group 1" in repaired.stderr
    pd.testing.assert_frame_equal(export_frame("done", home, tmp_path / "repaired.parquet"), original)
    named = {Path(p).name for (p,) in query(home, "select path from row_groups")}
    assert {f.name for f in target.parent.iterdir()} == named  # the damaged file went too
    if damage == "truncate":
        assert json.loads(cli("status", "done", "--json", home=home, check=True).stdout)["damaged_files"] == []
        again = cli("resume", "done", "--repair", "--quiet", home=home)
        assert again.returncode == 0 and "matches its checkpoint" in again.stderr


@pytest.mark.slow
def test_a_checkpoint_that_can_never_be_written_stops_the_run_with_exit_1_and_resume_finishes_it(complete, tmp_path):
    """The run's row_groups folder is replaced by a file before the first checkpoint: the run
    stops (failed, exit 1) naming the path and the error, instead of retrying for ever; once the
    folder can be made, resume finishes it with the data of a clean run."""
    cfg = make_config(tmp_path / "p", records=300, function="gated")
    home, gate = tmp_path / "home", tmp_path / "gate"
    proc = cli_popen("run", str(cfg), "--run-id", "blocked", "--quiet", home=home,
                     env=cli_env(PIPELINE_TEST_GATE=str(gate)))
    try:
        assert proc.stdout.readline().strip() == "run_id: blocked"
        folder = home / "runs" / "blocked" / "row_groups"
        folder.write_text("not a folder")  # no row group can be finished before the gate opens
        gate.touch()
        code, err = finish(proc, timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 1, err
    assert str(folder) in err and "File exists" in err and "pipeline resume blocked" in err
    assert len(err.splitlines()) < 100, "one line per attempt at most, not a flood"
    assert json.loads(cli("status", "blocked", "--json", home=home, check=True).stdout)["status"] == "failed"

    folder.unlink()
    resumed = cli("resume", "blocked", "--quiet", home=home)
    assert resumed.returncode == 0, resumed.stderr
    # `complete` is a clean run of the same config.
    pd.testing.assert_frame_equal(export_frame("blocked", home, tmp_path / "blocked.parquet"), complete[1])


def _fail_midway(fmt: str, monkeypatch) -> None:
    """Make the export's writer put part of the file down, then fail as a full disk does."""
    full = OSError(errno.ENOSPC, "No space left on device")
    if fmt == "parquet":
        def write_table(table, where, **kw):
            Path(where).write_bytes(b"PAR1 and then nothing")
            raise full
        monkeypatch.setattr(pq, "write_table", write_table)
    elif fmt == "csv":
        real = pd.DataFrame.to_csv

        def to_csv(frame, where, **kw):
            real(frame.head(5), where, **kw)
            raise full
        monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    else:
        import pipeline.dataset as dataset_module

        calls = []

        real_json = dataset_module.export_json

        def export_json(value):  # the JSONL writer's text of each record: fails mid-file
            calls.append(value)
            if len(calls) > 5:
                raise full
            return real_json(value)
        monkeypatch.setattr(dataset_module, "export_json", export_json)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
@pytest.mark.parametrize("failure", ["while writing", "at fsync"])
def test_an_export_that_fails_leaves_the_previous_file_whole_and_no_temporary_file(complete, tmp_path, monkeypatch,
                                                                                   fmt, failure):
    home = complete[0]  # only read
    out = tmp_path / "exports" / f"data.{fmt}"
    pipeline.export("done", out, home=home)
    before = out.read_bytes()
    if failure == "at fsync":  # where a full disk shows when the data was only cached
        def fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", fsync)
    else:
        _fail_midway(fmt, monkeypatch)
    with pytest.raises(ExportError, match="No space left on device") as caught:
        pipeline.export("done", out, home=home)
    assert str(out) in str(caught.value)
    assert out.read_bytes() == before
    with pytest.raises(ExportError):
        pipeline.export("done", out.with_name(f"new.{fmt}"), home=home)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary file, no new file
