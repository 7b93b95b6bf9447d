"""`pipeline retry` through the real command line: failed tasks reopened with the records and
row groups they dropped, after the bug is fixed, filtered by column or error text, on a SQLite
file and on PostgreSQL, with a worker joining; the export is the one a clean run gives, and no
cell done before is computed again.

The store method under it (reopen_failed) is in test_retry_reopen.py."""

from __future__ import annotations

import collections
import sqlite3
import textwrap
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from pipeline import api
from tests.conftest import POSTGRES_URL, cli, cli_env, cli_popen


# A pipeline whose python columns log each successful call ("column,key,pid") and fail, while an
# env var is set, for a fixed share of records (no module edit: the bug is in the environment).
FNS = '''
import asyncio, os, time, zlib


def _log(col, key):
    fd = os.open(os.environ["PIPELINE_TEST_CALLS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{col},{key},{os.getpid()}\\n".encode())
    finally:
        os.close(fd)



def _bucket(key):
    return zlib.crc32(key.encode()) % 10


async def upper(row):
    gate = os.environ.get("GATE")  # wait until the test opens it
    while gate and not os.path.exists(gate):
        await asyncio.sleep(0.01)
    await asyncio.sleep(float(os.environ.get("SLOW", "0")))
    if os.environ.get("BUGGY_UP") and _bucket(row["id"]) in (0, 1):  # about 20% of the records
        raise ValueError(f"bug in up at {row['id'][:8]}")
    _log("up", row["id"])
    return row["word"].upper() + "-" + row["id"][:4]


async def length(row):
    await asyncio.sleep(float(os.environ.get("SLOW", "0")))
    _log("len", row["id"])
    return len(row["up"]) + row["n"]


def both(row):
    if os.environ.get("BUGGY_PAIR") and _bucket(row["id"]) == 2:
        raise KeyError(f"pair broke at {row['id'][:8]}")
    _log("both", row["id"])
    return {"left": row["n"] * 2, "right": str(row["n"])}


def total(df):
    if str(df.index[0]) == os.environ.get("BUGGY_TOTAL"):
        raise RuntimeError(f"total broke at {df.index[0]}")
    _log("total", df.index[0])
    return (df["len"] + df["left"] + len(df)).tolist()  # reads the whole row group
'''


def pipeline_config(folder: Path, *, records: int = 200, rg: int = 50, in_flight: int = 32,
                    concurrent: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "retry_fns.py").write_text(FNS)
    (folder / "cfg.yaml").write_text(textwrap.dedent(f"""\
        name: buggy
        num_records: {records}
        row_group_size: {rg}
        seed: 5
        settings: {{max_in_flight_tasks: {in_flight}, max_concurrent_row_groups: {concurrent}, shutdown_error_rate: 0.95}}
        columns:
          - {{name: id, type: sampler, sampler: uuid}}
          - {{name: n, type: sampler, sampler: integer, params: {{low: 0, high: 100}}}}
          - {{name: word, type: sampler, sampler: category, params: {{values: [ant, bee, cat, dog]}}}}
          - {{name: up, type: python, function: "retry_fns:upper", requires: [word, id]}}
          - {{name: len, type: python, function: "retry_fns:length", requires: [up, n, id]}}
          - {{name: pair, type: python, function: "retry_fns:both", requires: [n, id], outputs: [left, right]}}
          - {{name: total, type: python, function: "retry_fns:total", mode: batch, requires: [len, left]}}
          - {{name: label, type: expression, expr: "{{{{ word }}}}:{{{{ total }}}}"}}
        """))
    return folder / "cfg.yaml"


def calls_of(path: Path) -> list[tuple[str, str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split(",")) for line in path.read_text().splitlines() if line]


class Runs:
    """One home, one store, the same config; each command logs its calls to its own file."""

    def __init__(self, tmp_path: Path, db: str | None = None, **config):
        self.tmp, self.db = tmp_path, db
        self.home = tmp_path / "home"
        self.cfg = pipeline_config(tmp_path / "p", **config)
        self.prefix = uuid.uuid4().hex[:6]  # run ids unique in a shared PostgreSQL schema

    def rid(self, name: str) -> str:
        return f"{name}-{self.prefix}"

    def env(self, log: str, **extra: str) -> dict:
        return cli_env(PIPELINE_TEST_CALLS=str(self.tmp / log), **extra)

    def cli(self, *args: str, log: str = "other", env: dict | None = None, **extra: str):
        return cli(*args, home=self.home, db=self.db, env=env or self.env(log, **extra))

    def popen(self, *args: str, log: str, **extra: str):
        return cli_popen(*args, home=self.home, db=self.db, env=self.env(log, **extra))

    def run(self, name: str, log: str, **extra: str):
        return self.cli("run", str(self.cfg), "--run-id", self.rid(name), "--quiet", log=log, **extra)

    def calls(self, log: str) -> list[tuple[str, str, str]]:
        return calls_of(self.tmp / log)

    # Status and export read the store in this process (the same code as the commands).
    def status(self, name: str) -> dict:
        return api.status(self.rid(name), home=self.home, db=self.db)

    def export(self, name: str, fmt: str = "jsonl") -> str | Path:
        out = self.tmp / f"{name}.{fmt}"
        assert api.export(self.rid(name), out, home=self.home, db=self.db)["complete"]
        return out.read_text() if fmt == "jsonl" else out

    def assert_same_export(self, name: str, reference: str) -> None:
        assert self.export(name) == self.export(reference)
        pd.testing.assert_frame_equal(pd.read_parquet(self.export(name, "parquet")),
                                      pd.read_parquet(self.export(reference, "parquet")))


def cell_calls(calls) -> collections.Counter:
    return collections.Counter((col, key) for col, key, _ in calls if col != "total")


# -- the bug-fix story -----------------------------------------------------------------------


@pytest.mark.slow
def test_retry_after_the_bug_is_fixed_exports_what_a_clean_run_does_without_redoing_done_cells(tmp_path):
    runs = Runs(tmp_path)
    buggy = runs.run("buggy", "first", BUGGY_UP="1")
    assert buggy.returncode == 0, buggy.stderr
    s = runs.status("buggy")
    failed = s["columns"]["up"]["failed"]
    assert 20 <= failed <= 70 and s["records_dropped"] == failed and s["records_done"] == 200 - failed

    retry = runs.cli("retry", runs.rid("buggy"), "--quiet", log="retry")
    assert retry.returncode == 0, retry.stderr
    assert f"reopened {failed} failed task(s) (up: {failed}), {failed} record(s) back in the run" in retry.stderr
    s = runs.status("buggy")
    assert (s["status"], s["records_done"], s["records_dropped"]) == ("complete", 200, 0)
    assert all(c["failed"] == 0 and c["done"] == 200 for c in s["columns"].values())

    assert runs.run("clean", "clean").returncode == 0
    runs.assert_same_export("buggy", "clean")

    # No cell done before the failure was computed again (also a cell that was still running
    # when its record was dropped: its value is recorded all the same).
    first, again = cell_calls(runs.calls("first")), cell_calls(runs.calls("retry"))
    revived = {key for col, key in again if col == "up"}
    assert len(revived) == failed and max(first.values()) == max(again.values()) == 1
    assert not set(first) & set(again)
    assert set(first) | set(again) == set(cell_calls(runs.calls("clean")))
    # The batch column was computed again in the row groups that got records back, only.
    assert len([c for c in runs.calls("retry") if c[0] == "total"]) == 4


@pytest.mark.slow
def test_retry_reopens_a_failed_batch_task_and_its_whole_row_group(tmp_path):
    runs = Runs(tmp_path)
    assert runs.run("buggy", "first", BUGGY_TOTAL="50").returncode == 0
    s = runs.status("buggy")
    assert (s["records_done"], s["records_dropped"], s["columns"]["total"]["failed"]) == (150, 50, 50)

    retry = runs.cli("retry", runs.rid("buggy"), "--quiet", log="retry")
    assert retry.returncode == 0, retry.stderr
    assert "reopened 1 failed task(s) (total: 1), 50 record(s) back in the run" in retry.stderr
    assert runs.run("clean", "clean").returncode == 0
    runs.assert_same_export("buggy", "clean")
    assert cell_calls(runs.calls("retry")) == collections.Counter()  # the cells of row group 1 were kept
    assert [(c[0], c[1]) for c in runs.calls("retry")] == [("total", "50")]


@pytest.mark.slow
def test_retry_filters_by_column_then_by_error_text(tmp_path):
    runs = Runs(tmp_path)
    assert runs.run("buggy", "first", BUGGY_UP="1", BUGGY_PAIR="1").returncode == 0
    s = runs.status("buggy")
    up_failed, pair_failed = s["columns"]["up"]["failed"], s["columns"]["left"]["failed"]
    assert up_failed and pair_failed and s["records_dropped"] == up_failed + pair_failed

    # --column takes a generator's output column too: `left` is one of pair's.
    proc = runs.cli("retry", runs.rid("buggy"), "--column", "left", "--quiet", log="retry1")
    assert proc.returncode == 0, proc.stderr
    assert f"reopened {pair_failed} failed task(s) (pair: {pair_failed})" in proc.stderr
    s = runs.status("buggy")
    assert (s["records_dropped"], s["columns"]["up"]["failed"], s["columns"]["left"]["failed"]) == (up_failed, up_failed, 0)
    # Only the records pair dropped were computed (their other cells, where not done before).
    keys = {key for col, key, _ in runs.calls("retry1") if col != "total"}
    assert keys == {key for col, key, _ in runs.calls("retry1") if col == "both"} and len(keys) == pair_failed

    proc = runs.cli("retry", runs.rid("buggy"), "--error", "no such text", log="retry2")
    assert proc.returncode == 0 and "no failed task matching" in proc.stderr and "nothing changed" in proc.stderr
    assert runs.calls("retry2") == []

    proc = runs.cli("retry", runs.rid("buggy"), "--error", "ValueError: bug in up", "--quiet", log="retry3")
    assert proc.returncode == 0, proc.stderr
    assert f"reopened {up_failed} failed task(s) (up: {up_failed})" in proc.stderr
    assert runs.run("clean", "clean").returncode == 0
    runs.assert_same_export("buggy", "clean")


@pytest.mark.slow
def test_retry_of_an_unknown_column_exits_2_and_of_nothing_failed_exits_0_changing_nothing(tmp_path):
    runs = Runs(tmp_path, records=20, rg=10)
    assert runs.run("clean", "clean").returncode == 0
    before = runs.status("clean")

    proc = runs.cli("retry", runs.rid("clean"), "--column", "nope")
    assert proc.returncode == 2
    assert "'nope'" in proc.stderr and "generators: id, n, word, up, len, pair, total, label" in proc.stderr

    proc = runs.cli("retry", runs.rid("clean"))
    assert proc.returncode == 0 and "has no failed task to retry; nothing changed" in proc.stderr
    after = runs.status("clean")
    assert (after["status"], after["updated_at"]) == (before["status"], before["updated_at"])

    assert runs.cli("retry", "no-such-run").returncode == 2


# -- PostgreSQL and workers ------------------------------------------------------------------


@pytest.mark.skipif(not POSTGRES_URL, reason="PIPELINE_TEST_POSTGRES_URL is not set")
@pytest.mark.slow
def test_retry_on_postgres_exports_what_a_clean_run_does(tmp_path, postgres_url):
    runs = Runs(tmp_path, db=postgres_url)
    assert runs.run("buggy", "first", BUGGY_UP="1").returncode == 0
    failed = runs.status("buggy")["records_dropped"]
    assert failed > 0
    proc = runs.cli("retry", runs.rid("buggy"), "--quiet", log="retry")
    assert proc.returncode == 0, proc.stderr
    assert f"{failed} record(s) back in the run" in proc.stderr
    assert runs.run("clean", "clean").returncode == 0
    runs.assert_same_export("buggy", "clean")
    again = cell_calls(runs.calls("retry"))
    assert not set(cell_calls(runs.calls("first"))) & set(again)


@pytest.mark.slow
def test_retry_with_a_worker_joining_finishes_with_the_same_export(tmp_path):
    # One row group at a time per process; the reopened cells wait for a gate that opens once
    # the worker has joined, so both processes take reopened row groups.
    runs = Runs(tmp_path, records=200, rg=20, in_flight=2, concurrent=1)
    assert runs.run("buggy", "first", BUGGY_UP="1").returncode == 0
    assert runs.status("buggy")["records_dropped"] > 0
    gate = tmp_path / "gate"
    slow = {"SLOW": "0.01", "GATE": str(gate)}

    def wait_for_workers(n: int, procs) -> None:
        """Until n processes hold a lease: a worker registers before it reads its config, so
        being registered is not yet taking a row group (on a loaded machine the first process
        would take them all once the gate opens)."""
        deadline = time.monotonic() + 60
        while True:
            with sqlite3.connect(runs.home / "state.db") as conn:
                (live,) = conn.execute("select count(distinct lease_owner) from row_groups where run_id = ? "
                                       "and state = 'active' and lease_owner is not null", (runs.rid("buggy"),)).fetchone()
            if live >= n:
                return
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, f"{n} worker(s) never joined"
            time.sleep(0.05)

    retry = runs.popen("retry", runs.rid("buggy"), "--quiet", log="retry", **slow)
    worker = None
    try:
        wait_for_workers(1, [retry])
        worker = runs.popen("worker", runs.rid("buggy"), "--quiet", log="retry", **slow)
        wait_for_workers(2, [retry, worker])
    finally:
        gate.touch()  # a failed wait must not leave the processes waiting for it
    for proc in (retry, worker):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert runs.status("buggy")["status"] == "complete"
    assert runs.run("clean", "clean").returncode == 0
    runs.assert_same_export("buggy", "clean")
    calls = runs.calls("retry")
    assert {pid for _, _, pid in calls} == {str(retry.pid), str(worker.pid)}
    again = cell_calls(calls)
    assert max(again.values()) == 1  # no cell twice across the two processes
    assert not set(cell_calls(runs.calls("first"))) & set(again)


# -- a cell still running when its record is dropped ------------------------------------------

STRAGGLER_FNS = '''
import asyncio, os, zlib
from pathlib import Path

HERE = Path(os.environ["MARKS"])


def _log(col, key):
    with open(os.environ["PIPELINE_TEST_CALLS"], "a") as f:
        f.write(f"{col},{key},{os.getpid()}\\n")


def _buggy(key):
    return os.environ.get("BUG") and zlib.crc32(key.encode()) % 2 == 0


async def fail_some(row):
    if _buggy(row["id"]):
        (HERE / row["id"]).touch()  # the cell of `slow` on this record may end now
        raise ValueError("bug")
    _log("a", row["id"])
    return 1


async def slow(row):
    while _buggy(row["id"]) and not (HERE / row["id"]).exists():
        await asyncio.sleep(0.01)
    _log("b", row["id"])
    return 2
'''


@pytest.mark.parametrize("records,rg", [(8, 8), (16, 4)], ids=["last-row-group", "row-groups"])
def test_a_cell_running_when_its_record_is_dropped_is_kept_even_if_its_row_group_ends_first(tmp_path, records, rg):
    """The cell of `b` on a record that `a` drops is still running when the row group has no
    other task left: the row group (and the run, when it is the last) waits for it, so that
    `retry` does not pay for it again."""
    (tmp_path / "marks").mkdir()
    (tmp_path / "strag.py").write_text(STRAGGLER_FNS)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: straggle
        num_records: {records}
        row_group_size: {rg}
        seed: 3
        settings: {{shutdown_error_rate: 1.0}}
        columns:
          - {{name: id, type: sampler, sampler: uuid}}
          - {{name: a, type: python, function: "strag:fail_some", requires: [id]}}
          - {{name: b, type: python, function: "strag:slow", requires: [id]}}
        """))
    home, calls = tmp_path / "home", tmp_path / "calls"
    env = cli_env(PIPELINE_TEST_CALLS=str(calls), MARKS=str(tmp_path / "marks"), PYTHONPATH=f"{tmp_path}:{cli_env()['PYTHONPATH']}")
    first = cli("run", str(cfg), "--run-id", "s", "--quiet", home=home, env={**env, "BUG": "1"})
    assert first.returncode == 0, first.stderr
    dropped = api.status("s", home=home)["records_dropped"]
    assert 0 < dropped < records
    assert len(calls_of(calls)) == 2 * records - dropped  # every b, and the a that passed

    retry = cli("retry", "s", "--quiet", home=home, env=env)
    assert retry.returncode == 0, retry.stderr
    s = api.status("s", home=home)
    assert (s["status"], s["records_done"], s["records_dropped"]) == ("complete", records, 0)
    b = collections.Counter(key for col, key, _ in calls_of(calls) if col == "b")
    assert len(b) == records and max(b.values()) == 1  # no b cell computed twice
