"""The SQL state store on real databases: a SQLite file and PostgreSQL (when
PIPELINE_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pipeline.errors import ReadOnlyQueryError, RunExistsError, RunNotFoundError, StoreError
from pipeline.store.usage import PACING_KEYS
from pipeline.store import SqlStore, open_store
from pipeline.store.base import (
    COMPLETE,
    DEFERRED,
    DONE,
    DROPPED,
    FAILED,
    STARTED,
    ColumnSpec,
    NewRun,
)
from pipeline.values import encode
from pipeline.workers import HOST

try:
    from conftest_store import claim_all_concurrently, db_url, postgres_session_url  # noqa: F401  (fixtures)
except ImportError:  # tests/ became a package
    from tests.conftest_store import claim_all_concurrently, db_url, postgres_session_url  # noqa: F401

COLUMNS = [
    ColumnSpec("x", "x", "cell", 0),
    ColumnSpec("y", "yz", "batch", 1),  # one batch generator with two output columns
    ColumnSpec("z", "yz", "batch", 2),
    ColumnSpec("w", "w", "cell", 3),
]


def new_run(run_id: str | None = None, *, num_records: int = 25, row_group_size: int = 10, name: str = "test"):
    return NewRun(
        run_id=run_id or f"run-{uuid.uuid4().hex[:12]}",
        name=name,
        num_records=num_records,
        row_group_size=row_group_size,
        seed=7,
        config='{"name": "test"}',
        fingerprint="f" * 16,
        columns=COLUMNS,
    )


def dead_owner() -> str:
    """An owner id of this host whose process cannot exist (a pid above pid_max)."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1
    return f"{HOST}:{pid}:12345:deadbeef"


@pytest.fixture
def store(db_url):
    s = open_store(db_url)
    yield s
    s.close()


@pytest.fixture
def other(db_url, store):
    """A second worker (another owner id) on the same database."""
    s = open_store(db_url)
    yield s
    s.close()


def claimed(store, **kwargs):
    run = new_run(**kwargs)
    store.create_run(run)
    store.claim_row_groups(run.run_id, 100, 60)
    return run.run_id


def counts(store, run_id):
    return {
        name: (c["done"], c["failed"], c["deferred"], c["in_flight"])
        for name, c in store.column_counts(run_id).items()
    }


def task_rows(store, run_id):
    _, rows = store.read_query(
        "SELECT row_group, column_name, slot, row_index, task_type, state, attempts "
        f"FROM tasks WHERE run_id = '{run_id}' ORDER BY row_group, column_name, slot"
    )
    return rows


# -- runs ----------------------------------------------------------------------------------


def test_created_run_reads_back_and_lists_newest_first(store):
    first, second = new_run(name="first"), new_run(name="second")
    store.create_run(first)
    time.sleep(0.01)
    store.create_run(second)

    info = store.get_run(first.run_id)
    assert (info.name, info.status, info.num_records, info.row_group_size, info.seed) == ("first", "running", 25, 10, 7)
    assert info.config == first.config and info.fingerprint == first.fingerprint
    assert info.finished_at is None and abs(info.created_at - time.time()) < 60
    ids = [r.run_id for r in store.list_runs()]
    assert ids.index(second.run_id) < ids.index(first.run_id)


def test_a_taken_run_id_raises_run_exists(store):
    run = new_run()
    store.create_run(run)
    with pytest.raises(RunExistsError, match=run.run_id):
        store.create_run(run)


def test_an_unknown_run_raises_run_not_found(store):
    with pytest.raises(RunNotFoundError, match="nope"):
        store.get_run("nope")
    with pytest.raises(RunNotFoundError):
        store.set_run_status("nope", "failed")


def test_complete_status_sets_finished_at(store):
    run = new_run()
    store.create_run(run)
    store.set_run_status(run.run_id, "interrupted")
    assert store.get_run(run.run_id).status == "interrupted"
    assert store.get_run(run.run_id).finished_at is None
    store.set_run_status(run.run_id, "complete")
    info = store.get_run(run.run_id)
    assert info.status == "complete" and info.finished_at is not None


def test_row_groups_cover_the_records_and_the_last_is_shorter(store):
    run = new_run(num_records=25, row_group_size=10)
    store.create_run(run)
    groups = store.row_groups(run.run_id)
    assert [(g["row_group"], g["num_rows"], g["state"], g["rows_dropped"]) for g in groups] == [
        (0, 10, "pending", 0),
        (1, 10, "pending", 0),
        (2, 5, "pending", 0),
    ]
    _, columns = store.read_query(
        f"SELECT column_name, generator, strategy, position FROM run_columns "
        f"WHERE run_id = '{run.run_id}' ORDER BY position"
    )
    assert columns == [("x", "x", "cell", 0), ("y", "yz", "batch", 1), ("z", "yz", "batch", 2), ("w", "w", "cell", 3)]


# -- the journal -----------------------------------------------------------------------------


def test_a_done_value_comes_back_with_its_type(store):
    run_id = claimed(store)
    stamp = dt.datetime(2024, 5, 17, 13, 45, 1, 250000)
    batch_value = {"y": [stamp, None, 3], "z": ["a", "b", "c"]}
    store.record(run_id, [(STARTED, 0, "x", 1, "cell"), (STARTED, 0, "yz", None, "batch")])
    lost = store.record(
        run_id,
        [
            (DONE, 0, "x", 1, "cell", encode(stamp)),
            (DONE, 0, "yz", None, "batch", encode(batch_value)),
            (DONE, 0, "w", 2, "cell",
             encode({"d": dt.date(2024, 1, 2), "b": b"\x00\x01", "n": decimal.Decimal("1.10")})),
        ],
    )
    assert lost == set()
    loaded = store.load_row_group(run_id, 0)
    assert loaded.num_rows == 10
    assert loaded.done[("x", 1)] == stamp and type(loaded.done[("x", 1)]) is dt.datetime
    assert loaded.done[("yz", None)] == batch_value
    assert loaded.done[("w", 2)] == {"d": dt.date(2024, 1, 2), "b": b"\x00\x01", "n": decimal.Decimal("1.10")}
    assert loaded.deferred == {} and loaded.dropped == set()


def test_an_error_text_that_is_not_valid_unicode_is_stored_with_replacement_characters(store):
    """A generator's exception may say anything: a lone surrogate in it must not fail the commit."""
    run_id = claimed(store)
    store.record(run_id, [(STARTED, 0, "x", 1, "cell"), (FAILED, 0, "x", 1, "cell", (1, "ValueError: half \ud83d")),
                          (DEFERRED, 0, "x", 2, "cell", (1, 123.5, "TimeoutError: \udc00 late"))])
    _, rows = store.read_query(f"SELECT row_index, last_error FROM tasks WHERE run_id = '{run_id}' ORDER BY row_index")
    assert rows == [(1, "ValueError: half \ufffd"), (2, "TimeoutError: \ufffd late")]


def test_events_of_one_task_in_a_batch_coalesce_to_the_last(store):
    run_id = claimed(store)
    store.record(
        run_id,
        [
            (STARTED, 0, "x", 0, "cell"),
            (DONE, 0, "x", 0, "cell", encode("first")),
            (STARTED, 0, "x", 1, "cell"),
            (DEFERRED, 0, "x", 1, "cell", (1, 123.5, "timeout")),
            (STARTED, 0, "x", 1, "cell"),
            (STARTED, 0, "x", 2, "cell"),
        ],
    )
    assert task_rows(store, run_id) == [
        (0, "x", 0, 0, "cell", "done", 0),
        (0, "x", 1, 1, "cell", "in_flight", 1),  # started again, still counting its attempt
        (0, "x", 2, 2, "cell", "in_flight", 0),
    ]
    loaded = store.load_row_group(run_id, 0)
    assert loaded.done == {("x", 0): "first"}
    assert loaded.attempts == {("x", 1): 1, ("x", 2): 0}


def test_a_deferred_task_keeps_attempts_and_next_eligible_at(store):
    run_id = claimed(store)
    store.record(run_id, [(STARTED, 0, "x", 4, "cell"), (STARTED, 0, "yz", None, "batch")])
    store.record(
        run_id,
        [
            (DEFERRED, 0, "x", 4, "cell", (2, 1700000000.25, "HTTP 429")),
            (DEFERRED, 0, "yz", None, "batch", (1, 1700000001.5, "HTTP 503")),
        ],
    )
    loaded = store.load_row_group(run_id, 0)
    assert loaded.deferred == {("x", 4): (2, 1700000000.25, "HTTP 429"), ("yz", None): (1, 1700000001.5, "HTTP 503")}

    # Retried in a later batch: in flight again, attempts remembered for a resume.
    store.record(run_id, [(STARTED, 0, "x", 4, "cell")])
    loaded = store.load_row_group(run_id, 0)
    assert ("x", 4) not in loaded.deferred and loaded.attempts[("x", 4)] == 2

    store.record(run_id, [(FAILED, 0, "x", 4, "cell", (3, "HTTP 429 again")), (DROPPED, 0, None, 4)])
    _, rows = store.read_query(
        f"SELECT state, attempts, last_error FROM tasks WHERE run_id = '{run_id}' AND column_name = 'x'"
    )
    assert rows == [("failed", 3, "HTTP 429 again")]
    assert store.load_row_group(run_id, 0).attempts[("x", 4)] == 3


def test_dropped_records_are_counted_once_and_shown_by_the_view(store):
    run_id = claimed(store)
    store.record(run_id, [(DROPPED, 0, None, 3), (DROPPED, 0, None, 3), (DROPPED, 0, None, 5)])
    store.record(run_id, [(DROPPED, 0, None, 5), (DROPPED, 2, None, None)])
    groups = {g["row_group"]: g["rows_dropped"] for g in store.row_groups(run_id)}
    assert groups == {0: 2, 1: 0, 2: 5}
    assert store.load_row_group(run_id, 0).dropped == {3, 5}
    assert store.load_row_group(run_id, 2).dropped == {0, 1, 2, 3, 4}

    # A batch task done in row group 0 counts its kept records only.
    store.record(run_id, [(DONE, 0, "yz", None, "batch", encode({"y": [1] * 10, "z": [2] * 10}))])
    assert counts(store, run_id)["y"] == (8, 0, 0, 0)


def test_column_progress_counts_records_at_every_stage(store):
    run_id = claimed(store)  # row groups of 10, 10 and 5 records
    zero = (0, 0, 0, 0)
    assert counts(store, run_id) == {"x": zero, "y": zero, "z": zero, "w": zero}

    store.record(run_id, [(STARTED, 0, "x", i, "cell") for i in range(10)] + [(STARTED, 0, "yz", None, "batch")])
    assert counts(store, run_id) == {"x": (0, 0, 0, 10), "y": (0, 0, 0, 10), "z": (0, 0, 0, 10), "w": zero}

    store.record(
        run_id,
        [(DONE, 0, "x", i, "cell", encode(i)) for i in range(8)]
        + [
            (DEFERRED, 0, "x", 8, "cell", (1, time.time() + 5, "busy")),
            (FAILED, 0, "x", 9, "cell", (1, "bad")),
            (DROPPED, 0, None, 9),
            (DONE, 0, "yz", None, "batch", encode({"y": list(range(10)), "z": list(range(10))})),
        ],
    )
    assert counts(store, run_id) == {"x": (8, 1, 1, 0), "y": (9, 0, 0, 0), "z": (9, 0, 0, 0), "w": zero}

    # w fails on record 3: that record is dropped, and its done cells stop counting everywhere.
    store.record(
        run_id,
        [(STARTED, 0, "w", i, "cell") for i in range(9)]
        + [(DONE, 0, "w", i, "cell", encode("ok")) for i in (0, 1, 2, 4, 5)]
        + [(FAILED, 0, "w", 3, "cell", (1, "bad")), (DROPPED, 0, None, 3)],
    )
    assert counts(store, run_id) == {"x": (7, 1, 1, 0), "y": (8, 0, 0, 0), "z": (8, 0, 0, 0), "w": (5, 1, 0, 3)}

    store.record(
        run_id,
        [(STARTED, 0, "x", 8, "cell"), (DONE, 0, "x", 8, "cell", encode(8))]
        + [(DONE, 0, "w", i, "cell", encode("ok")) for i in (6, 7, 8)]
        + [(COMPLETE, 0)],
    )
    assert counts(store, run_id) == {"x": (8, 1, 0, 0), "y": (8, 0, 0, 0), "z": (8, 0, 0, 0), "w": (8, 1, 0, 0)}
    assert store.row_groups(run_id)[0]["state"] == "complete"

    # Checkpoint compacts the row group's rows but its failed ones, and (for `pipeline retry`)
    # the done cells of its dropped records and its batch tasks; the counts do not move.
    assert store.checkpoint_row_group(run_id, 0, f"runs/{run_id}/rg-00000.parquet", 2)
    assert counts(store, run_id) == {"x": (8, 1, 0, 0), "y": (8, 0, 0, 0), "z": (8, 0, 0, 0), "w": (8, 1, 0, 0)}
    assert [(r[0], r[1], r[3], r[5]) for r in task_rows(store, run_id)] == [
        (0, "w", 3, "failed"), (0, "x", 3, "done"), (0, "x", 9, "failed"), (0, "yz", None, "done")]
    group = store.row_groups(run_id)[0]
    assert (group["state"], group["rows_dropped"], group["path"], group["lease_owner"]) == (
        "checkpointed",
        2,
        f"runs/{run_id}/rg-00000.parquet",
        None,
    )

    # A failed batch task drops its whole row group and counts all its records as failed.
    store.record(
        run_id,
        [(STARTED, 1, "yz", None, "batch"), (FAILED, 1, "yz", None, "batch", (1, "bad")), (DROPPED, 1, None, None)],
    )
    assert counts(store, run_id) == {"x": (8, 1, 0, 0), "y": (8, 10, 0, 0), "z": (8, 10, 0, 0), "w": (8, 1, 0, 0)}
    assert store.checkpoint_row_group(run_id, 1, f"runs/{run_id}/rg-00001.parquet", 10)
    assert counts(store, run_id) == {"x": (8, 1, 0, 0), "y": (8, 10, 0, 0), "z": (8, 10, 0, 0), "w": (8, 1, 0, 0)}

    _, rows = store.read_query(f"SELECT * FROM column_progress WHERE run_id = '{run_id}' ORDER BY column_name")
    assert rows == [
        (run_id, "w", 25, 8, 1, 0, 0),
        (run_id, "x", 25, 8, 1, 0, 0),
        (run_id, "y", 25, 8, 10, 0, 0),
        (run_id, "z", 25, 8, 10, 0, 0),
    ]


def test_column_counts_follow_config_order(store):
    run_id = claimed(store)
    assert list(store.column_counts(run_id)) == ["x", "y", "z", "w"]


# -- leases ----------------------------------------------------------------------------------


def test_claims_take_row_groups_in_order_and_move_pending_to_active(store):
    run = new_run(num_records=50, row_group_size=10)
    store.create_run(run)
    claims = store.claim_row_groups(run.run_id, 2, 30)
    assert [(c.row_group, c.num_rows, c.epoch, c.state) for c in claims] == [(0, 10, 1, "pending"), (1, 10, 1, "pending")]
    # Row groups this owner holds are not claimed again.
    assert [c.row_group for c in store.claim_row_groups(run.run_id, 2, 30)] == [2, 3]
    groups = store.row_groups(run.run_id)
    assert [g["state"] for g in groups] == ["active", "active", "active", "active", "pending"]
    assert {g["lease_owner"] for g in groups[:4]} == {store.owner}


def test_each_row_group_goes_to_one_owner_only(db_url, store, other):
    run = new_run(num_records=400, row_group_size=10)
    store.create_run(run)
    mine, theirs = claim_all_concurrently(store, other, run.run_id)
    assert not set(mine) & set(theirs)
    assert sorted(mine + theirs) == list(range(40))
    owners = {g["row_group"]: g["lease_owner"] for g in store.row_groups(run.run_id)}
    assert all(owners[rg] == store.owner for rg in mine) and all(owners[rg] == other.owner for rg in theirs)


def test_a_live_lease_of_this_host_is_not_claimable_until_it_expires(store, other):
    run = new_run()
    store.create_run(run)
    store.claim_row_groups(run.run_id, 3, 60)
    assert other.claim_row_groups(run.run_id, 3, 60) == []


def test_a_lease_of_another_host_waits_for_its_expiry(db_url, store):
    run = new_run()
    store.create_run(run)
    with SqlStore(db_url, owner="elsewhere.example:4242:999:cafe") as remote:
        assert len(remote.claim_row_groups(run.run_id, 3, 60)) == 3
    assert store.claim_row_groups(run.run_id, 3, 60) == []


def test_a_lease_held_by_a_dead_process_of_this_host_is_claimable_at_once(db_url, store):
    run = new_run()
    store.create_run(run)
    with SqlStore(db_url, owner=dead_owner()) as dead:
        assert len(dead.claim_row_groups(run.run_id, 3, 3600)) == 3
    claims = store.claim_row_groups(run.run_id, 3, 60)
    assert [(c.row_group, c.epoch, c.state) for c in claims] == [(0, 2, "active"), (1, 2, "active"), (2, 2, "active")]


def test_a_worker_that_lost_its_lease_records_nothing_and_cannot_checkpoint(store, other):
    run = new_run()
    store.create_run(run)
    [expired] = store.claim_row_groups(run.run_id, 1, -1)  # expired at once
    [kept] = store.claim_row_groups(run.run_id, 1, 60)
    assert (expired.row_group, kept.row_group) == (0, 1)

    [taken] = other.claim_row_groups(run.run_id, 1, 60)
    assert (taken.row_group, taken.epoch, taken.state) == (0, 2, "active")

    lost = store.record(
        run.run_id,
        [(STARTED, 0, "x", 0, "cell"), (DONE, 0, "x", 0, "cell", encode("zombie")), (DROPPED, 0, None, 1),
         (COMPLETE, 0)]
        + [(STARTED, 1, "x", 0, "cell")],
    )
    assert lost == {0}
    assert [(r[0], r[1], r[5]) for r in task_rows(store, run.run_id)] == [(1, "x", "in_flight")]
    group = store.row_groups(run.run_id)[0]
    assert (group["state"], group["rows_dropped"], group["lease_owner"]) == ("active", 0, other.owner)
    assert store.checkpoint_row_group(run.run_id, 0, "runs/x.parquet", 0) is False

    assert other.record(run.run_id, [(DONE, 0, "x", 0, "cell", encode("new owner"))]) == set()
    assert other.load_row_group(run.run_id, 0).done == {("x", 0): "new owner"}


def test_renewal_extends_leases_and_reports_the_lost_ones(store, other):
    run = new_run()
    store.create_run(run)
    store.claim_row_groups(run.run_id, 1, -1)
    store.claim_row_groups(run.run_id, 1, 5)
    other.claim_row_groups(run.run_id, 1, 60)  # takes row group 0 over
    before = store.row_groups(run.run_id)[1]["lease_expires_at"]
    assert store.renew_leases(run.run_id, 120) == {0}
    after = store.row_groups(run.run_id)[1]["lease_expires_at"]
    assert after > before + 100
    assert store.renew_leases(run.run_id, 120) == set()


def test_released_row_groups_are_claimable_at_once_and_keep_their_state(store, other):
    run = new_run()
    store.create_run(run)
    store.claim_row_groups(run.run_id, 2, 60)
    store.record(run.run_id, [(COMPLETE, 1)])
    store.release_row_groups(run.run_id, [0, 1])
    assert [g["lease_owner"] for g in store.row_groups(run.run_id)] == [None, None, None]
    claims = other.claim_row_groups(run.run_id, 3, 60)
    assert [(c.row_group, c.state) for c in claims] == [(0, "active"), (1, "complete"), (2, "pending")]
    assert store.record(run.run_id, [(STARTED, 0, "x", 0, "cell")]) == {0}


def test_checkpointed_row_groups_are_never_claimed_again(db_url, store):
    run_id = claimed(store, num_records=20)
    assert store.checkpoint_row_group(run_id, 0, "runs/a.parquet", 0)
    store.release_row_groups(run_id, [1])
    with SqlStore(db_url) as later:
        assert [c.row_group for c in later.claim_row_groups(run_id, 5, 60)] == [1]


# -- workers ---------------------------------------------------------------------------------


def test_live_workers_count_running_processes_and_fresh_heartbeats(db_url, store):
    run = new_run()
    store.create_run(run)
    assert store.live_workers(run.run_id) == 0
    store.register_worker(run.run_id)
    with SqlStore(db_url, owner=dead_owner()) as dead, SqlStore(db_url, owner="far.example:1:1:ab") as remote:
        dead.register_worker(run.run_id)
        remote.register_worker(run.run_id)
        assert store.live_workers(run.run_id) == 2  # this process and the fresh remote one
        remote.renew_leases(run.run_id, 30)
    store.unregister_worker(run.run_id)
    assert store.live_workers(run.run_id) == 1


# -- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO runs (run_id) VALUES ('x')",
        "UPDATE runs SET status = 'failed'",
        "DELETE FROM tasks",
        "DROP TABLE tasks",
        "DROP VIEW column_progress",
        "CREATE TABLE evil (a INTEGER)",
    ],
)
def test_read_query_refuses_statements_that_write(store, statement):
    run_id = claimed(store)
    with pytest.raises(ReadOnlyQueryError, match="only reads"):
        store.read_query(statement)
    assert store.get_run(run_id).status == "running"
    assert len(store.row_groups(run_id)) == 3


def test_read_query_returns_columns_and_rows(store):
    run_id = claimed(store)
    names, rows = store.read_query(
        f"SELECT row_group, num_rows FROM row_groups WHERE run_id = '{run_id}' AND state LIKE 'act%' ORDER BY 1"
    )
    assert names == ["row_group", "num_rows"] and rows == [(0, 10), (1, 10), (2, 5)]


def test_read_query_reports_sql_errors_with_the_database_message(store):
    with pytest.raises(StoreError, match="no_such_table"):
        store.read_query("SELECT * FROM no_such_table")


def test_read_query_cannot_switch_sqlite_journal_mode(tmp_path):
    with open_store(f"sqlite:///{tmp_path}/state.db") as s:
        with pytest.raises(ReadOnlyQueryError):
            s.read_query("PRAGMA journal_mode = DELETE")
        assert s.read_query("PRAGMA journal_mode")[1] == [("wal",)]
        assert s.read_query("PRAGMA table_info(runs)")[1]


# A reader like `sqlite3 state.db "select * from column_progress"` run in a loop: no busy
# timeout, and now and then a read transaction held open for a while.
POLLER = r"""
import os, sqlite3, sys, time
path, stop = sys.argv[1], sys.argv[2]
polls, errors = 0, []
conn = sqlite3.connect(path, timeout=0, isolation_level=None)
print("ready", flush=True)
while not os.path.exists(stop):
    try:
        if polls % 10 == 5:
            conn.execute("BEGIN")
            conn.execute("SELECT * FROM column_progress").fetchall()
            time.sleep(0.02)
            conn.execute("SELECT count(*) FROM tasks").fetchall()
            conn.execute("COMMIT")
        else:
            conn.execute("SELECT * FROM column_progress").fetchall()
    except sqlite3.Error as exc:
        errors.append(repr(exc))
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    polls += 1
    time.sleep(0.002)
conn.close()
print(polls, len(errors), errors[:3], flush=True)
"""


def test_readers_polling_the_view_never_fail_the_writer(tmp_path):
    path = tmp_path / "state.db"
    stop_file = tmp_path / "stop"
    thread_errors: list[BaseException] = []
    thread_polls = 0

    def poll_in_a_thread():
        nonlocal thread_polls
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as conn:
                while not stop_file.exists():
                    conn.execute("SELECT * FROM column_progress").fetchall()
                    thread_polls += 1
                    time.sleep(0.001)
        except BaseException as exc:
            thread_errors.append(exc)

    with open_store(f"sqlite:///{path}") as store:
        run_id = claimed(store, num_records=13_000, row_group_size=1000)
        process = subprocess.Popen(
            [sys.executable, "-c", POLLER, str(path), str(stop_file)], stdout=subprocess.PIPE, text=True
        )
        thread = threading.Thread(target=poll_in_a_thread)
        try:
            assert process.stdout.readline().strip() == "ready"
            thread.start()
            events = 0
            for rg in range(13):
                for column in ("x", "w"):
                    # small batches, STARTED and DONE apart
                    for start in range(0, 500, 100):
                        rows = range(start, start + 100)
                        events += len(store.record(run_id, [(STARTED, rg, column, i, "cell") for i in rows]) or rows)
                        done = [(DONE, rg, column, i, "cell", encode(f"v{i}")) for i in rows]
                        events += len(store.record(run_id, done) or rows)
                    # and one large batch
                    batch = [(STARTED, rg, column, i, "cell") for i in range(500, 1000)]
                    batch += [(DONE, rg, column, i, "cell", encode(i)) for i in range(500, 1000)]
                    assert store.record(run_id, batch) == set()
                    events += len(batch)
                store.record(run_id, [(STARTED, rg, "yz", None, "batch")])
                store.record(run_id, [(DONE, rg, "yz", None, "batch", encode({"y": [1] * 1000, "z": [2] * 1000})),
                                      (COMPLETE, rg)])
                events += 3
        finally:
            stop_file.touch()
            output, _ = process.communicate(timeout=30)
            if thread.ident is not None:
                thread.join()
        assert events >= 50_000
        polls, reader_errors, first_errors = output.split(" ", 2)
        assert (int(reader_errors), first_errors.strip()) == (0, "[]")
        assert int(polls) > 10
        assert thread_errors == [] and thread_polls > 10
        assert counts(store, run_id)["x"] == (13_000, 0, 0, 0)
        assert counts(store, run_id)["y"] == (13_000, 0, 0, 0)


def test_load_row_group_of_an_unknown_row_group_raises_store_error(store):
    run_id = claimed(store)
    with pytest.raises(StoreError, match="row group 9"):
        store.load_row_group(run_id, 9)


def test_unsupported_urls_are_refused(tmp_path):
    with pytest.raises(StoreError, match="unsupported"):
        SqlStore("mysql://u@h/db")
    with pytest.raises(StoreError, match="file"):
        SqlStore("sqlite:///:memory:")


def test_model_usage_is_recorded_with_each_transition_and_a_zombie_adds_nothing(store, other):
    run = new_run()
    store.create_run(run)
    [expired] = store.claim_row_groups(run.run_id, 1, -1)
    [kept] = store.claim_row_groups(run.run_id, 1, 60)
    other.claim_row_groups(run.run_id, 1, 60)  # takes row group 0 over
    usage = ("writer", 1, 10, 4, 0, 8, "stop", 0, None, None)
    lost = store.record(run.run_id, [
        (DONE, 1, "x", 0, "cell", encode("a"), usage),
        (DEFERRED, 1, "x", 1, "cell", (1, 0.0, "429"), ("writer", 1, 0, 0, 1, 4, None, 0, None, None)),
        (DONE, 1, "x", 1, "cell", encode("b"), usage),
        (DONE, 0, "x", 0, "cell", encode("zombie"), usage),
    ])
    assert lost == {0}
    assert store.model_usage(run.run_id) == {"writer": {"requests": 3, "prompt_tokens": 20, "completion_tokens": 8,
                                                        "rate_limited": 1, "concurrency": 8, "calls_saved": 0,
                                                        "cost": None, **dict.fromkeys(PACING_KEYS)}}
    _, rows = store.read_query(f"SELECT row_index, requests, prompt_tokens FROM tasks WHERE run_id = '{run.run_id}' "
                               "ORDER BY row_index")
    assert [tuple(r) for r in rows] == [(0, 1, 10), (1, 2, 10)]
    store.add_calls_saved(run.run_id, {("writer", "x"): 5})
    assert store.model_usage(run.run_id)["writer"]["calls_saved"] == 5


def test_model_usage_adds_up_the_cost_and_keeps_the_latest_pacing_snapshot(store):
    run = new_run()
    store.create_run(run)
    [claim] = store.claim_row_groups(run.run_id, 1, 60)
    rg = claim.row_group
    first = {"requests_per_minute": 60.0, "tokens_per_minute": 600.0, "max_requests_per_minute": 100,
             "max_tokens_per_minute": None, "paced": 1, "headers": {"x-ratelimit-remaining-requests": "5"},
             "headers_at": 1.0}
    later = dict(first, tokens_per_minute=900.0, headers={"x-ratelimit-remaining-requests": "4"})
    store.record(run.run_id, [(DONE, rg, "x", 0, "cell", encode("a"), ("writer", 1, 10, 4, 0, 8, None, 0, 0.25, first))])
    store.record(run.run_id, [(DONE, rg, "x", 1, "cell", encode("b"), ("writer", 1, 10, 4, 0, 8, None, 0, 0.5, later)),
                              (DONE, rg, "y", 1, "cell", encode("c"), ("writer", 1, 10, 4, 0, 8, None, 0, None, None))])
    m = store.model_usage(run.run_id)["writer"]
    assert m["cost"] == pytest.approx(0.75)
    assert m["tokens_per_minute"] == 900.0 and m["max_requests_per_minute"] == 100
    assert m["rate_limit_headers"] == {"x-ratelimit-remaining-requests": "4"}


def truncated_usage(finish_reason, truncated=0):
    return ("writer", 1, 10, 4, 0, 8, finish_reason, truncated, None, None)


def test_finish_reason_is_kept_per_task_and_truncated_answers_are_counted_through_compaction(store):
    run = new_run(num_records=20, row_group_size=10)
    store.create_run(run)
    store.claim_row_groups(run.run_id, 2, 60)
    store.record(run.run_id, [
        (DONE, 0, "x", 0, "cell", encode("cut"), truncated_usage("length", 1)),
        (DONE, 0, "x", 1, "cell", encode("whole"), truncated_usage("stop")),
        # a 429 (no answer: None) then a failure: the finish_reason of the last answer stays
        (DEFERRED, 0, "x", 2, "cell", (1, 0.0, "bad"), truncated_usage("length")),
        (DEFERRED, 0, "x", 2, "cell", (1, 0.0, "429"), truncated_usage(None)),
        (FAILED, 0, "x", 2, "cell", (2, "ModelOutputError: cut"), truncated_usage(None)),
        (DONE, 1, "x", 0, "cell", encode("cut too"), truncated_usage("length", 1)),
    ])
    query = (f"SELECT row_group, row_index, state, finish_reason FROM tasks WHERE run_id = '{run.run_id}' "
             "ORDER BY row_group, row_index")
    _, rows = store.read_query(query)
    assert [tuple(r) for r in rows] == [(0, 0, "done", "length"), (0, 1, "done", "stop"), (0, 2, "failed", "length"),
                                        (1, 0, "done", "length")]
    assert store.column_counts(run.run_id)["x"]["truncated"] == 2
    assert {c["truncated"] for name, c in store.column_counts(run.run_id).items() if name != "x"} == {0}
    assert store.checkpoint_row_group(run.run_id, 0, f"runs/{run.run_id}/rg-00000.parquet", 1)
    _, rows = store.read_query(query)
    assert [tuple(r) for r in rows] == [(0, 2, "failed", "length"), (1, 0, "done", "length")]
    assert store.column_counts(run.run_id)["x"]["truncated"] == 2  # the count outlives the rows


def test_the_memory_store_counts_truncated_answers_and_keeps_finish_reason():
    from pipeline.store.memory import MemoryStore

    store = MemoryStore()
    run = new_run(num_records=10, row_group_size=10)
    store.create_run(run)
    store.claim_row_groups(run.run_id, 1, 60)
    store.record(run.run_id, [
        (DONE, 0, "x", 0, "cell", encode("cut"), truncated_usage("length", 1)),
        (FAILED, 0, "x", 1, "cell", (1, "ModelOutputError: cut"), truncated_usage("length")),
    ])
    assert store.column_counts(run.run_id)["x"]["truncated"] == 1
    assert store.column_counts(run.run_id)["w"]["truncated"] == 0
    assert store._run(run.run_id)["tasks"][(0, "x", 1)]["finish_reason"] == "length"
