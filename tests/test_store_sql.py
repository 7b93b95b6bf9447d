"""What only the SQL state store has, on real databases (a SQLite file, and PostgreSQL when
PIPELINE_TEST_POSTGRES_URL is set): its tables and view as SQL reads them, `read_query`, readers
beside the writer. What every store answers is in tests/store/test_contract.py."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pipeline.errors import ReadOnlyQueryError, StoreError
from pipeline.store import SqlStore, open_store
from pipeline.store.base import ColumnSpec, NewRun
from tests.conftest_store import complete, deferred, done, dropped, failed, started

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


@pytest.fixture
def store(db_url):
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


# -- tables and view ---------------------------------------------------------------------------


def test_tables_and_the_column_progress_view_show_what_the_store_counts(store):
    run_id = claimed(store)
    _, columns = store.read_query(
        f"SELECT column_name, generator, strategy, position FROM run_columns "
        f"WHERE run_id = '{run_id}' ORDER BY position"
    )
    assert columns == [("x", "x", "cell", 0), ("y", "yz", "batch", 1), ("z", "yz", "batch", 2), ("w", "w", "cell", 3)]
    usage = ("writer", 1, 10, 4, 0, 8, "stop", 0, None, None)
    store.record(run_id, [
        started(0, "x", 0), done(0, "x", 0, "first", usage=usage),
        started(0, "x", 1), deferred(0, "x", 1, 1, 123.5, "timeout", usage=usage),
        started(0, "x", 1), started(0, "x", 2),
        failed(0, "w", 3, 2, "bad"), dropped(0, 3),
        done(0, "yz", None, {"y": [1] * 10, "z": [2] * 10}, "batch"),
    ])
    assert task_rows(store, run_id) == [
        (0, "w", 3, 3, "cell", "failed", 2),
        (0, "x", 0, 0, "cell", "done", 0),
        (0, "x", 1, 1, "cell", "in_flight", 1),  # started again, still counting its attempt
        (0, "x", 2, 2, "cell", "in_flight", 0),
        (0, "yz", -1, None, "batch", "done", 0),  # slot -1: the row group's one batch task
    ]
    _, rows = store.read_query(f"SELECT row_index, requests, prompt_tokens FROM tasks WHERE run_id = '{run_id}' "
                               "AND requests IS NOT NULL ORDER BY row_index")
    assert [tuple(r) for r in rows] == [(0, 1, 10), (1, 1, 10)]
    store.record(run_id, [complete(0)])
    assert store.checkpoint_row_group(run_id, 0, "rg-0.parquet", 1)
    _, view = store.read_query(f"SELECT * "
                               f"FROM column_progress WHERE run_id = '{run_id}' ORDER BY column_name")
    assert view == [(run_id, c, 25, *counts(store, run_id)[c]) for c in "wxyz"]


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


@pytest.mark.slow
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
                        events += len(store.record(run_id, [started(rg, column, i) for i in rows]) or rows)
                        finished = [done(rg, column, i, f"v{i}") for i in rows]
                        events += len(store.record(run_id, finished) or rows)
                    # and one large batch
                    batch = [started(rg, column, i) for i in range(500, 1000)]
                    batch += [done(rg, column, i, i) for i in range(500, 1000)]
                    assert store.record(run_id, batch) == set()
                    events += len(batch)
                store.record(run_id, [started(rg, "yz", None, "batch")])
                store.record(run_id, [done(rg, "yz", None, {"y": [1] * 1000, "z": [2] * 1000}, "batch"),
                                      complete(rg)])
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


def test_unsupported_urls_are_refused(tmp_path):
    with pytest.raises(StoreError, match="unsupported"):
        SqlStore("mysql://u@h/db")
    with pytest.raises(StoreError, match="file"):
        SqlStore("sqlite:///:memory:")


def test_model_usage_adds_up_the_cost_and_keeps_the_latest_pacing_snapshot(store):
    run = new_run()
    store.create_run(run)
    [claim] = store.claim_row_groups(run.run_id, 1, 60)
    rg = claim.row_group
    first = {"requests_per_minute": 60.0, "tokens_per_minute": 600.0, "max_requests_per_minute": 100,
             "max_tokens_per_minute": None, "paced": 1, "headers": {"x-ratelimit-remaining-requests": "5"},
             "headers_at": 1.0}
    later = dict(first, tokens_per_minute=900.0, headers={"x-ratelimit-remaining-requests": "4"})
    store.record(run.run_id, [done(rg, "x", 0, "a", usage=("writer", 1, 10, 4, 0, 8, None, 0, 0.25, first))])
    store.record(run.run_id, [done(rg, "x", 1, "b", usage=("writer", 1, 10, 4, 0, 8, None, 0, 0.5, later)),
                              done(rg, "y", 1, "c", usage=("writer", 1, 10, 4, 0, 8, None, 0, None, None))])
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
        done(0, "x", 0, "cut", usage=truncated_usage("length", 1)),
        done(0, "x", 1, "whole", usage=truncated_usage("stop")),
        # a 429 (no answer: None) then a failure: the finish_reason of the last answer stays
        deferred(0, "x", 2, 1, 0.0, "bad", usage=truncated_usage("length")),
        deferred(0, "x", 2, 1, 0.0, "429", usage=truncated_usage(None)),
        failed(0, "x", 2, 2, "ModelOutputError: cut", usage=truncated_usage(None)),
        done(1, "x", 0, "cut too", usage=truncated_usage("length", 1)),
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
        done(0, "x", 0, "cut", usage=truncated_usage("length", 1)),
        failed(0, "x", 1, 1, "ModelOutputError: cut", usage=truncated_usage("length")),
    ])
    assert store.column_counts(run.run_id)["x"]["truncated"] == 1
    assert store.column_counts(run.run_id)["w"]["truncated"] == 0
    assert store._run(run.run_id)["tasks"][(0, "x", 1)]["finish_reason"] == "length"
