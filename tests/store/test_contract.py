"""The Store protocol's contract, one suite on every store: in memory, a SQLite file and
PostgreSQL (skipped without PIPELINE_TEST_POSTGRES_URL). Part one: runs, record batches, resume
loading, progress counts and compaction; claims, leases, workers and fencing are in
test_contract_leases.py. Helpers (``new_run``, ``claimed``, ``counts``) are in tests/conftest_store.py. Through the protocol only: what a test
sees is what the engine and the API see.

``store_factory``, ``stores`` and ``any_store`` (tests/conftest.py) open workers (owner ids) on one
database of the test; runs have unique ids, as PostgreSQL's schema is shared by the session."""

from __future__ import annotations

import datetime as dt
import decimal
import time

import pytest

from pipeline.errors import RunExistsError, RunNotFoundError, StoreError
from pipeline.store.base import ColumnSpec, NewRun
from pipeline.store.events import StateSaved
from pipeline.values import encode
from tests.conftest_store import (COLUMNS, ZERO, claimed, complete, counts, deferred, done, dropped, failed,
                                  new_run, started)

# -- runs ------------------------------------------------------------------------------------


def test_created_run_reads_back_and_lists_newest_first(any_store):
    store = any_store
    first = new_run(store, name="first")
    time.sleep(0.01)  # created_at orders the list
    second = new_run(store, name="second")
    info = store.get_run(first)
    assert (info.name, info.status, info.num_records, info.row_group_size, info.seed) == ("first", "running", 25, 10, 7)
    assert (info.config, info.fingerprint) == ('{"name": "test"}', "f" * 16)
    assert info.finished_at is None and abs(info.created_at - time.time()) < 600
    ids = [r.run_id for r in store.list_runs()]
    assert ids.index(second) < ids.index(first)


def test_a_taken_run_id_raises_run_exists_and_an_unknown_one_run_not_found(any_store):
    run_id = new_run(any_store)
    with pytest.raises(RunExistsError, match=run_id):
        any_store.create_run(NewRun(run_id, "again", 1, 1, 0, "{}", "f", COLUMNS))
    with pytest.raises(RunNotFoundError, match="nope"):
        any_store.get_run("nope")
    for ask in (lambda: any_store.set_run_status("nope", "failed"), lambda: any_store.row_group_counts("nope")):
        with pytest.raises(RunNotFoundError):
            ask()


def test_complete_status_sets_finished_at(any_store):
    run_id = new_run(any_store)
    any_store.set_run_status(run_id, "interrupted")
    info = any_store.get_run(run_id)
    assert (info.status, info.finished_at) == ("interrupted", None)
    any_store.set_run_status(run_id, "complete")
    info = any_store.get_run(run_id)
    assert info.status == "complete" and info.finished_at is not None


def test_row_groups_cover_the_records_and_the_last_is_shorter(any_store):
    run_id = new_run(any_store, num_records=25, row_group_size=10)
    assert [(g["row_group"], g["num_rows"], g["state"], g["rows_dropped"], g["path"], g["lease_owner"])
            for g in any_store.row_groups(run_id)] == [
        (0, 10, "pending", 0, None, None), (1, 10, "pending", 0, None, None), (2, 5, "pending", 0, None, None)]
    assert any_store.row_group_counts(run_id) == {"total": 3, "pending": 3, "active": 0, "complete": 0,
                                                  "checkpointed": 0, "records_written": 0, "records_dropped": 0}
    assert list(any_store.column_counts(run_id)) == ["x", "y", "z", "w"]  # config order


# -- record batches and resume loading ---------------------------------------------------------


def test_a_done_value_comes_back_with_its_type(any_store):
    store = any_store
    run_id = claimed(store)
    stamp = dt.datetime(2024, 5, 17, 13, 45, 1, 250000)
    batch_value = {"y": [stamp, None, 3], "z": ["a", "b", "c"]}
    odd = {"d": dt.date(2024, 1, 2), "b": b"\x00\x01", "n": decimal.Decimal("1.10")}
    store.record(run_id, [started(0, "x", 1), started(0, "yz", None, "batch")])
    assert store.record(run_id, [done(0, "x", 1, stamp), done(0, "yz", None, batch_value, "batch"),
                                 done(0, "w", 2, odd)]) == set()
    loaded = store.load_row_group(run_id, 0)
    assert (loaded.row_group, loaded.num_rows) == (0, 10)
    assert loaded.done[("x", 1)] == stamp and type(loaded.done[("x", 1)]) is dt.datetime
    assert loaded.done[("yz", None)] == batch_value and loaded.done[("w", 2)] == odd
    assert loaded.deferred == {} and loaded.dropped == set()


def test_events_of_one_task_in_a_batch_coalesce_to_the_last(any_store):
    store = any_store
    run_id = claimed(store)
    store.record(run_id, [started(0, "x", 0), done(0, "x", 0, "first"), started(0, "x", 1),
                          deferred(0, "x", 1, 1, 123.5, "timeout"), started(0, "x", 1), started(0, "x", 2)])
    loaded = store.load_row_group(run_id, 0)
    assert loaded.done == {("x", 0): "first"} and loaded.deferred == {}
    assert loaded.attempts == {("x", 1): 1, ("x", 2): 0}  # started again, still counting its attempt
    assert counts(store, run_id)["x"] == (1, 0, 0, 2)


def test_a_deferred_task_keeps_attempts_and_next_eligible_at(any_store):
    store = any_store
    run_id = claimed(store)
    store.record(run_id, [started(0, "x", 4), started(0, "yz", None, "batch")])
    store.record(run_id, [deferred(0, "x", 4, 2, 1700000000.25, "HTTP 429"),
                          deferred(0, "yz", None, 1, 1700000001.5, "HTTP 503", "batch")])
    assert store.load_row_group(run_id, 0).deferred == {("x", 4): (2, 1700000000.25, "HTTP 429"),
                                                        ("yz", None): (1, 1700000001.5, "HTTP 503")}
    # Retried in a later batch: in flight again, attempts remembered for a resume.
    store.record(run_id, [started(0, "x", 4)])
    loaded = store.load_row_group(run_id, 0)
    assert ("x", 4) not in loaded.deferred and loaded.attempts[("x", 4)] == 2
    store.record(run_id, [failed(0, "x", 4, 3, "HTTP 429 again"), dropped(0, 4)])
    assert store.failed_tasks(run_id) == [("x", "HTTP 429 again")]
    assert store.load_row_group(run_id, 0).attempts[("x", 4)] == 3


def test_an_error_text_that_is_not_valid_unicode_is_kept_with_replacement_characters(any_store):
    """A generator's exception may say anything: a lone surrogate in it must not fail the commit."""
    run_id = claimed(any_store)
    any_store.record(run_id, [started(0, "x", 1), failed(0, "x", 1, 1, "ValueError: half \ud83d"),
                              deferred(0, "x", 2, 1, 123.5, "TimeoutError: \udc00 late")])
    assert any_store.failed_tasks(run_id) == [("x", "ValueError: half \ufffd")]
    assert any_store.load_row_group(run_id, 0).deferred == {("x", 2): (1, 123.5, "TimeoutError: \ufffd late")}


def test_dropped_records_are_counted_once(any_store):
    store = any_store
    run_id = claimed(store)
    store.record(run_id, [dropped(0, 3), dropped(0, 3), dropped(0, 5)])
    store.record(run_id, [dropped(0, 5), dropped(2)])
    assert {g["row_group"]: g["rows_dropped"] for g in store.row_groups(run_id)} == {0: 2, 1: 0, 2: 5}
    assert store.load_row_group(run_id, 0).dropped == {3, 5}
    assert store.load_row_group(run_id, 2).dropped == {0, 1, 2, 3, 4}
    assert store.row_group_counts(run_id)["records_dropped"] == 7
    # A batch task done in row group 0 counts its kept records only.
    store.record(run_id, [done(0, "yz", None, {"y": [1] * 10, "z": [2] * 10}, "batch")])
    assert counts(store, run_id)["y"] == (8, 0, 0, 0)


def test_load_row_group_of_an_unknown_row_group_raises_store_error(any_store):
    run_id = claimed(any_store)
    with pytest.raises(StoreError, match="row group 9"):
        any_store.load_row_group(run_id, 9)


def test_a_stateful_generators_state_is_recorded_with_its_done(any_store):
    store = any_store
    run_id = claimed(store)
    assert store.generator_states(run_id) == {}
    store.record(run_id, [StateSaved(0, "x", encode({"seen": 3}), done(0, "x", 9, "v")),
                          StateSaved(1, "x", encode({"seen": 7}), done(1, "x", 9, "v"))])
    assert store.generator_states(run_id) == {"x": (1, {"seen": 7})}
    assert store.load_row_group(run_id, 0).done == {("x", 9): "v"}


# -- progress counts and compaction ----------------------------------------------------------


def test_column_counts_follow_records_through_every_stage_and_compaction(any_store):
    store = any_store
    run_id = claimed(store)  # row groups of 10, 10 and 5 records
    assert counts(store, run_id) == {"x": ZERO, "y": ZERO, "z": ZERO, "w": ZERO}

    store.record(run_id, [started(0, "x", i) for i in range(10)] + [started(0, "yz", None, "batch")])
    assert counts(store, run_id) == {"x": (0, 0, 0, 10), "y": (0, 0, 0, 10), "z": (0, 0, 0, 10), "w": ZERO}

    store.record(run_id, [done(0, "x", i, i) for i in range(8)] + [
        deferred(0, "x", 8, 1, time.time() + 5, "busy"), failed(0, "x", 9, 1, "bad"), dropped(0, 9),
        done(0, "yz", None, {"y": list(range(10)), "z": list(range(10))}, "batch")])
    assert counts(store, run_id) == {"x": (8, 1, 1, 0), "y": (9, 0, 0, 0), "z": (9, 0, 0, 0), "w": ZERO}

    # w fails on record 3: that record is dropped, and its done cells stop counting everywhere.
    store.record(run_id, [started(0, "w", i) for i in range(9)] + [done(0, "w", i, "ok") for i in (0, 1, 2, 4, 5)]
                 + [failed(0, "w", 3, 1, "bad"), dropped(0, 3)])
    assert counts(store, run_id) == {"x": (7, 1, 1, 0), "y": (8, 0, 0, 0), "z": (8, 0, 0, 0), "w": (5, 1, 0, 3)}

    store.record(run_id, [started(0, "x", 8), done(0, "x", 8, 8)] + [done(0, "w", i, "ok") for i in (6, 7, 8)]
                 + [complete(0)])
    assert counts(store, run_id) == {"x": (8, 1, 0, 0), "y": (8, 0, 0, 0), "z": (8, 0, 0, 0), "w": (8, 1, 0, 0)}
    assert store.row_groups(run_id)[0]["state"] == "complete"
    assert store.row_group_counts(run_id)["complete"] == 1

    # Checkpoint compacts the row group's tasks but its failed ones, and (for `pipeline retry`)
    # the done cells of its dropped records and its batch tasks; the counts do not move.
    assert store.checkpoint_row_group(run_id, 0, f"runs/{run_id}/rg-00000.parquet", 2)
    assert counts(store, run_id) == {"x": (8, 1, 0, 0), "y": (8, 0, 0, 0), "z": (8, 0, 0, 0), "w": (8, 1, 0, 0)}
    loaded = store.load_row_group(run_id, 0)
    assert set(loaded.done) == {("x", 3), ("yz", None)} and loaded.dropped == {3, 9}
    assert loaded.attempts == {("w", 3): 1, ("x", 9): 1} and loaded.deferred == {}
    assert sorted(store.failed_tasks(run_id)) == [("w", "bad"), ("x", "bad")]
    group = store.row_groups(run_id)[0]
    assert (group["state"], group["rows_dropped"], group["path"], group["lease_owner"]) == (
        "checkpointed", 2, f"runs/{run_id}/rg-00000.parquet", None)
    c = store.row_group_counts(run_id)
    assert (c["checkpointed"], c["active"], c["records_written"], c["records_dropped"]) == (1, 2, 8, 2)

    # A failed batch task drops its whole row group and counts all its records as failed.
    store.record(run_id, [started(1, "yz", None, "batch"), failed(1, "yz", None, 1, "bad", "batch"), dropped(1)])
    assert counts(store, run_id) == {"x": (8, 1, 0, 0), "y": (8, 10, 0, 0), "z": (8, 10, 0, 0), "w": (8, 1, 0, 0)}
    assert store.checkpoint_row_group(run_id, 1, f"runs/{run_id}/rg-00001.parquet", 10)
    assert counts(store, run_id) == {"x": (8, 1, 0, 0), "y": (8, 10, 0, 0), "z": (8, 10, 0, 0), "w": (8, 1, 0, 0)}
    c = store.row_group_counts(run_id)
    assert (c["checkpointed"], c["records_written"], c["records_dropped"]) == (2, 8, 12)


def test_a_clean_row_group_keeps_no_task_after_its_checkpoint(any_store):
    store = any_store
    run_id = claimed(store, num_records=10)
    store.record(run_id, [done(0, "x", i, i) for i in range(10)] + [done(0, "w", i, i) for i in range(10)]
                 + [done(0, "yz", None, {"y": [0] * 10, "z": [0] * 10}, "batch"), complete(0)])
    assert store.checkpoint_row_group(run_id, 0, "rg-0.parquet", 0)
    loaded = store.load_row_group(run_id, 0)
    assert (loaded.done, loaded.attempts, loaded.deferred, loaded.dropped) == ({}, {}, {}, set())
    assert counts(store, run_id)["x"] == (10, 0, 0, 0) and store.failed_tasks(run_id) == []


def test_reopened_row_groups_lose_their_file_and_tasks_and_are_claimed_again(any_store):
    a = any_store
    run_id = new_run(a, num_records=20, columns=[ColumnSpec("x", "x", "cell", 0)])
    a.claim_row_groups(run_id, 2, 60)
    a.record(run_id, [done(0, "x", 0, 5), failed(0, "x", 1, 1, "ValueError: no"), dropped(0, 1)])
    assert a.checkpoint_row_group(run_id, 0, "runs/x/rg-000000-e1.parquet", 1, file_bytes=10, file_sha256="ee" * 32)
    assert a.column_counts(run_id)["x"]["failed"] == 1  # the failed row outlives compaction
    assert a.reopen_row_groups(run_id, [0, 1]) == [0]  # row group 1 is not checkpointed: left alone
    group = a.row_groups(run_id)[0]
    assert (group["state"], group["path"], group["rows_dropped"], group["file_bytes"], group["file_sha256"],
            group["lease_owner"]) == ("pending", None, 0, None, None, None)
    assert a.column_counts(run_id)["x"] == {"done": 0, "failed": 0, "deferred": 0, "in_flight": 0, "truncated": 0}
    assert a.failed_tasks(run_id) == []
    [claim] = a.claim_row_groups(run_id, 1, 60)
    assert (claim.row_group, claim.epoch, claim.state) == (0, 2, "pending")
    loaded = a.load_row_group(run_id, 0)
    assert (loaded.done, loaded.dropped, loaded.attempts) == ({}, set(), {})
