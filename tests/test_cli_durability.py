"""Durability through the real command line: SIGKILL and resume, signals, several workers, and
a reader polling progress while a run goes on."""

from __future__ import annotations

import collections
import json
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import cli, cli_env, cli_popen, logged_pipeline, read_calls


def export_frame(run_id: str, home: Path, tmp: Path, db: str | None = None) -> pd.DataFrame:
    out = tmp / f"{run_id}.parquet"
    cli("export", run_id, "--output", str(out), home=home, db=db, check=True)
    return pd.read_parquet(out)


def finish(proc, timeout: float = 300) -> tuple[int, str]:
    """Wait for the process and close its pipes; returns (exit code, stderr)."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def wait_for_line(proc, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no line starting with {prefix!r}")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_exports_the_uninterrupted_dataset(tmp_path):
    """3,000 records, row groups of 100, 32 in flight, killed 5 times: nothing lost or doubled,
    and at most 3 x 32 extra executions per kill."""
    cfg = logged_pipeline(tmp_path / "p", records=3000, rg=100, in_flight=32)
    home = tmp_path / "home"
    base_calls, calls = tmp_path / "base_calls", tmp_path / "calls"

    cli("run", str(cfg), "--run-id", "base", "--quiet", home=home, check=True, timeout=300,
        env=cli_env(PIPELINE_TEST_CALLS=str(base_calls)))
    expected = export_frame("base", home, tmp_path)
    assert len(expected) == 3000

    rng = random.Random(1234)
    env = cli_env(PIPELINE_TEST_CALLS=str(calls))
    kills = 0
    proc = cli_popen("run", str(cfg), "--run-id", "killed", "--quiet", home=home, env=env)
    assert wait_for_line(proc, "run_id:") == "run_id: killed"
    while kills < 5:
        # A random moment of the run: after a random number of further calls (of ~9,000).
        target = len(read_calls(calls)) + rng.randint(100, 900)
        while proc.poll() is None and len(read_calls(calls)) < target:
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before five kills"
        proc.send_signal(signal.SIGKILL)
        finish(proc)
        kills += 1
        status = cli("status", "killed", "--json", home=home, check=True)
        assert '"status": "interrupted"' in status.stdout  # its process is gone
        proc = cli_popen("resume", "killed", "--quiet", home=home, env=env)
    code, err = finish(proc)
    assert code == 0, err
    got = export_frame("killed", home, tmp_path)
    pd.testing.assert_frame_equal(got, expected)

    base_counts = collections.Counter(read_calls(base_calls))
    counts = collections.Counter(read_calls(calls))
    assert set(counts) == set(base_counts), "every task ran"
    extra = sum(counts.values()) - sum(base_counts.values())
    print(f"extra executions: {extra} for {kills} kills")
    # The contract: at most the tasks in flight (32) plus those finished within the last commit
    # interval run again. How many finish in that interval depends on the machine's load: quiet,
    # 8-30 per kill; loaded CI measured 71 (2 x 32 was exceeded once). 3 x 32 still catches a
    # journal that stops committing (hundreds per kill).
    assert 0 <= extra <= 3 * 32 * kills, f"{extra} extra executions for {kills} kills"


@pytest.mark.slow
def test_a_killed_run_not_yet_reaped_by_its_parent_is_interrupted_and_resumes_at_once(tmp_path):
    """SIGKILL without wait(): the process lingers as a zombie with its /proc entry. It is gone
    all the same: status says interrupted, and resume takes the leases at once (lease_s is an
    hour: a resume that waited for them to expire would not end)."""
    cfg = logged_pipeline(tmp_path / "p", records=2000, rg=100, in_flight=8, extra_settings=", lease_s: 3600")
    home = tmp_path / "home"
    calls = tmp_path / "calls"
    proc = cli_popen("run", str(cfg), "--run-id", "z", "--quiet", home=home, env=cli_env(PIPELINE_TEST_CALLS=str(calls)))
    assert wait_for_line(proc, "run_id:") == "run_id: z"
    while len(read_calls(calls)) < 200:
        assert proc.poll() is None, "the run ended before the kill"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}").exists() and time.monotonic() < deadline:
        if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.01)
    try:
        status = json.loads(cli("status", "z", "--json", home=home, check=True).stdout)
        assert status["status"] == "interrupted"
        cli("resume", "z", "--quiet", home=home, check=True, timeout=280, env=cli_env(PIPELINE_TEST_CALLS=str(calls)))
    finally:
        finish(proc)
    assert len(export_frame("z", home, tmp_path)) == 2000


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow
def test_signal_stops_with_its_exit_code_and_the_run_resumes_to_the_same_data(tmp_path, signum, code):
    cfg = logged_pipeline(tmp_path / "p", records=600, rg=50, in_flight=8)
    home = tmp_path / "home"
    env = cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls"), PIPELINE_TEST_SLEEP="0.01")
    proc = cli_popen("run", str(cfg), "--run-id", "sig", "--quiet", home=home, env=env)
    wait_for_line(proc, "run_id:")
    deadline = time.monotonic() + 120
    while len(read_calls(tmp_path / "calls")) < 20:  # working
        assert time.monotonic() < deadline and proc.poll() is None, "the run did not start working"
        time.sleep(0.01)
    proc.send_signal(signum)
    got, err = finish(proc, 120)
    assert got == code, err
    assert "pipeline resume sig" in err
    status = cli("status", "sig", "--json", home=home, check=True).stdout
    assert '"status": "interrupted"' in status
    done_before = len(read_calls(tmp_path / "calls"))
    assert done_before > 0
    assert cli("resume", "sig", "--quiet", home=home, env=env).returncode == 0
    cli("run", str(cfg), "--run-id", "ref", "--quiet", home=home, check=True, env=env)
    pd.testing.assert_frame_equal(export_frame("sig", home, tmp_path), export_frame("ref", home, tmp_path))


STATEFUL_FNS = """
import os, time

def _gate():
    # Each worker's tasks wait until two workers run (on a loaded machine one could
    # otherwise take every row group before the others have started).
    folder = os.environ["PIPELINE_TEST_GATE_DIR"]
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 120
    while len(os.listdir(folder)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)


def step(row):
    # Logs when each task starts and ends, from whichever worker process runs it.
    rg, r = divmod(int(row["i"]), 10)
    log = os.environ["PIPELINE_TEST_STATEFUL_LOG"]
    with open(log, "a") as f:
        f.write(f"start {rg} {r} {time.time():.6f} {os.getpid()}\\n")
    time.sleep(0.004)
    with open(log, "a") as f:
        f.write(f"end {rg} {r} {time.time():.6f} {os.getpid()}\\n")
    return rg * 100 + r


def flaky(row):
    # Every third record fails once with a retryable error (in whichever worker runs it).
    _gate()
    if int(row["i"]) % 3 == 0:
        try:
            os.close(os.open(os.path.join(os.environ["PIPELINE_TEST_FLAKY_DIR"], str(row["i"])),
                             os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return 1
        raise TimeoutError("once")
    return 0
"""


@pytest.mark.slow
def test_a_stateful_generator_runs_one_task_at_a_time_in_row_group_order_across_workers(tmp_path):
    """Three workers share the row groups; the stateful column still runs row group by row
    group, in order, one task at a time over all processes, while other tasks are retried."""
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "stateful_fns.py").write_text(STATEFUL_FNS)
    (folder / "ids.csv").write_text("i\n" + "".join(f"{i}\n" for i in range(120)))  # record i gets i
    (folder / "cfg.yaml").write_text(
        "name: ordered\nnum_records: 120\nrow_group_size: 10\n"
        "settings: {max_concurrent_row_groups: 2, retry_backoff_s: 0.01}\n"
        "columns:\n"
        "  - {name: ids, type: seed_dataset, path: ids.csv, columns: [i], order: sequential}\n"
        "  - {name: s, type: python, function: 'stateful_fns:step', requires: [i], stateful: true}\n"
        "  - {name: f, type: python, function: 'stateful_fns:flaky', requires: [i]}\n")
    home = tmp_path / "home"
    log = tmp_path / "stateful.log"
    (tmp_path / "flaky").mkdir()  # retries (deferred tasks) go on while workers wait for each other
    (tmp_path / "gate").mkdir()
    env = cli_env(PIPELINE_TEST_STATEFUL_LOG=str(log), PIPELINE_TEST_FLAKY_DIR=str(tmp_path / "flaky"),
                  PIPELINE_TEST_GATE_DIR=str(tmp_path / "gate"))
    cli("run", str(folder / "cfg.yaml"), "--run-id", "ordered", "--create-only", home=home, check=True)
    workers = [cli_popen("worker", "ordered", "--quiet", home=home, env=env) for _ in range(3)]
    for w in workers:
        code, err = finish(w)
        assert code == 0, err
    assert len(list((tmp_path / "flaky").iterdir())) == 40
    events = sorted((float(t), kind, int(rg), int(r), pid)
                    for kind, rg, r, t, pid in (line.split() for line in log.read_text().splitlines()))
    starts = [e for e in events if e[1] == "start"]
    assert len(starts) == 120 and len({(e[2], e[3]) for e in starts}) == 120
    assert len({e[4] for e in starts}) > 1, "the row groups should have been shared by the workers"
    assert [e[2] for e in starts] == sorted(e[2] for e in starts), "row groups out of order"
    running = 0
    for _, kind, *_ in events:
        running += 1 if kind == "start" else -1
        assert running <= 1, "two tasks of the stateful generator ran at once"


@pytest.mark.slow
def test_two_workers_finish_a_run_with_no_task_executed_twice(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=1200, rg=50, in_flight=16)
    home = tmp_path / "home"
    calls = tmp_path / "calls"
    env = cli_env(PIPELINE_TEST_CALLS=str(calls))
    created = cli("run", str(cfg), "--run-id", "shared", "--create-only", home=home, check=True)
    assert created.stdout.splitlines()[0] == "run_id: shared"
    workers = [cli_popen("worker", "shared", "--quiet", home=home, env=env) for _ in range(2)]
    for w in workers:
        code, err = finish(w)
        assert code == 0, err
    counts = collections.Counter(read_calls(calls))
    assert counts and max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]
    owners = cli("sql", "select count(distinct lease_owner) from row_groups", home=home, check=True)
    df = export_frame("shared", home, tmp_path)
    assert len(df) == 1200 and df["label"].notna().all()
    status = cli("status", "shared", "--json", home=home, check=True).stdout
    assert '"status": "complete"' in status and owners.returncode == 0


@pytest.mark.slow
def test_reader_polling_progress_never_errors_and_sees_rows_done_only_grow(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=1500, rg=100, in_flight=32)
    home = tmp_path / "home"
    env = cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls"))
    proc = cli_popen("run", str(cfg), "--run-id", "watched", "--quiet", home=home, env=env)
    wait_for_line(proc, "run_id:")
    db = home / "state.db"
    seen: dict[str, list[int]] = collections.defaultdict(list)
    errors: list[Exception] = []

    def poll() -> None:
        while proc.poll() is None:
            try:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0)
                try:
                    for col, done in con.execute("select column_name, rows_done from column_progress "
                                                 "where run_id = 'watched'"):
                        seen[col].append(done)
                finally:
                    con.close()
            except Exception as exc:  # the test fails on any error
                errors.append(exc)
            time.sleep(0.1)

    reader = threading.Thread(target=poll)
    reader.start()
    code, err = finish(proc)
    reader.join()
    assert code == 0, err
    assert not errors, errors[:3]
    assert len(seen["label"]) >= 3, "the reader saw the run while it was going"
    for col, values in seen.items():
        assert values == sorted(values), f"rows_done of {col} went down: {values}"
    final = sqlite3.connect(db).execute("select column_name, rows_done from column_progress").fetchall()
    exported = len(export_frame("watched", home, tmp_path))
    assert exported == 1500 and {done for _, done in final} == {exported}


@pytest.mark.slow
def test_a_second_sigint_stops_at_once_and_the_run_stays_consistent(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=200, rg=50, in_flight=8)
    home = tmp_path / "home"
    env = cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls"), PIPELINE_TEST_SLEEP="30")  # tasks that hang
    proc = cli_popen("run", str(cfg), "--run-id", "twice", "--quiet", home=home, env=env)
    wait_for_line(proc, "run_id:")
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    code, _ = finish(proc, 30)
    assert code == 130 and time.monotonic() - t0 < 4.5, "the second SIGINT did not cut the grace period"
    status = cli("status", "twice", "--json", home=home, check=True).stdout
    assert '"status": "interrupted"' in status
    env = cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls"), PIPELINE_TEST_SLEEP="0.001")
    assert cli("resume", "twice", "--quiet", home=home, env=env).returncode == 0
    assert len(export_frame("twice", home, tmp_path)) == 200


@pytest.mark.slow
def test_status_watch_refreshes_until_the_run_ends(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=600, rg=50, in_flight=8)
    home = tmp_path / "home"
    env = cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls"), PIPELINE_TEST_SLEEP="0.01")
    proc = cli_popen("run", str(cfg), "--run-id", "watched", "--quiet", home=home, env=env)
    wait_for_line(proc, "run_id:")
    deadline = time.monotonic() + 120
    while len(read_calls(tmp_path / "calls")) < 10:  # working (its worker registered)
        assert time.monotonic() < deadline and proc.poll() is None, "the run did not start working"
        time.sleep(0.01)
    # The run holds still (a live process) until the watch has shown it running: on a loaded
    # machine the watch's start could otherwise take longer than the whole run.
    proc.send_signal(signal.SIGSTOP)
    try:
        watch = cli_popen("status", "watched", "--watch", "--json", "--interval", "0.3", home=home)
        first = watch.stdout.readline()
    finally:
        proc.send_signal(signal.SIGCONT)
    rest, err = watch.communicate(timeout=300)
    finish(proc)
    snapshots = [json.loads(line) for line in (first + rest).splitlines()]
    assert watch.returncode == 0 and len(snapshots) >= 2, (err, [s["status"] for s in snapshots])
    assert snapshots[0]["status"] == "running" and snapshots[-1]["status"] == "complete"
    done = [s["columns"]["label"]["done"] for s in snapshots]
    assert done == sorted(done) and done[-1] == 600


@pytest.mark.slow
def test_the_python_api_runs_resumes_and_loads_what_export_writes(tmp_path, monkeypatch):
    import pipeline

    cfg_path = logged_pipeline(tmp_path / "p", records=120, rg=40)
    monkeypatch.setenv("PIPELINE_TEST_CALLS", str(tmp_path / "calls"))
    home = tmp_path / "home"
    result = pipeline.run(cfg_path, home=home, run_id="api")
    assert result.status == "complete" and result.run_id == "api"
    assert pipeline.resume("api", home=home).status == "complete"
    status = pipeline.status("api", home=home)
    assert status["records_done"] == 120 and status["status"] == "complete"
    df = pipeline.load_dataset("api", home=home)
    # load_dataset gives text as object (str and None); pandas reads the Parquet file as its str dtype
    pd.testing.assert_frame_equal(df, export_frame("api", home, tmp_path), check_dtype=False)
    assert [r["run_id"] for r in pipeline.list_runs(home=home)] == ["api"]


@pytest.mark.slow
def test_when_one_worker_dies_the_other_takes_its_row_groups_over_and_finishes(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=1200, rg=50, in_flight=16)
    home = tmp_path / "home"
    calls = tmp_path / "calls"
    env = cli_env(PIPELINE_TEST_CALLS=str(calls), PIPELINE_TEST_SLEEP="0.01")
    cli("run", str(cfg), "--run-id", "takeover", "--create-only", home=home, check=True)
    doomed = cli_popen("worker", "takeover", "--quiet", home=home, env=env)
    survivor = cli_popen("worker", "takeover", "--quiet", home=home, env=env)
    while len(read_calls(calls)) < 600:
        time.sleep(0.01)
    doomed.send_signal(signal.SIGKILL)
    finish(doomed)
    code, err = finish(survivor)
    assert code == 0, err
    status = json.loads(cli("status", "takeover", "--json", home=home, check=True).stdout)
    assert status["status"] == "complete" and status["records_done"] == 1200
    cli("run", str(cfg), "--run-id", "reference", "--quiet", home=home, env=env, check=True)
    pd.testing.assert_frame_equal(export_frame("takeover", home, tmp_path), export_frame("reference", home, tmp_path))


@pytest.mark.slow
def test_the_quickstart_killed_midway_resumes_to_the_same_dataset(tmp_path):
    """Seed file (shuffled), samplers, expression, async and sync python, batch python."""
    from tests.conftest import ROOT

    cfg = ROOT / "examples" / "quickstart.yaml"
    home = tmp_path / "home"
    cli("run", str(cfg), "--run-id", "ref", "--num-records", "6000", "--quiet", home=home, check=True)
    proc = cli_popen("run", str(cfg), "--run-id", "cut", "--num-records", "6000", "--quiet", home=home)
    wait_for_line(proc, "run_id:")
    deadline = time.monotonic() + 30
    db = sqlite3.connect(home / "state.db", timeout=5)
    checkpointed = "select count(*) from row_groups where run_id = 'cut' and state = 'checkpointed'"
    while db.execute(checkpointed).fetchone()[0] < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    done = db.execute(checkpointed).fetchone()[0]
    db.close()
    assert done < 24, "killed before the end"
    assert cli("resume", "cut", "--quiet", home=home).returncode == 0
    pd.testing.assert_frame_equal(export_frame("cut", home, tmp_path), export_frame("ref", home, tmp_path))
