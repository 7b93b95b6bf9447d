"""The scheduler on the in-memory store, when generators fail: retryable errors deferred and
retried (without deadlock, without a barrier), retries exhausted, failed cells, batch and
from-scratch tasks dropping exactly their records or row group, the error rate that stops a
run, and the trace of every attempt. Each reference defect named here behaves as our contract
says (SEED_BEHAVIORS.md)."""

from __future__ import annotations

import asyncio

import pyarrow.parquet as pq

from pipeline.errors import RetryableError
from tests.engine_helpers import AsyncFn, SyncFn, dataset, index_root, make_run, run_engine, spec


def test_retryable_failure_is_deferred_then_recovers(tmp_path):
    attempts = {}

    def flaky(row):
        attempts[row["i"]] = attempts.get(row["i"], 0) + 1
        if attempts[row["i"]] == 1 and row["i"] % 2 == 0:
            raise RetryableError("503")
        return row["i"]

    specs = [spec("i", "batch"), spec("v", deps=["i"])]
    status, sched, store = run_engine(specs, {"i": index_root(), "v": AsyncFn(flaky)},
                                      num_records=10, row_group_size=5, home=tmp_path)
    assert status == "complete"
    assert list(dataset(store, tmp_path)["v"]) == list(range(10))
    assert sched.stats.tasks_deferred == 5 and sched.stats.records_dropped == 0


def test_deferred_retry_does_not_deadlock_with_one_row_group_slot(tmp_path):
    """Reference defect (76): max_concurrent_row_groups=1, two row groups, first attempts of row
    group 0 fail with a retryable error. Ours completes."""
    tried = set()

    def first_fails(row):
        if row["i"] < 2 and row["i"] not in tried:
            tried.add(row["i"])
            raise ConnectionError("reset")
        return 1

    specs = [spec("i", "batch"), spec("v", deps=["i"])]
    status, _, store = run_engine(specs, {"i": index_root(), "v": SyncFn(first_fails)},
                                  num_records=4, row_group_size=2, home=tmp_path, max_concurrent_row_groups=1)
    assert status == "complete" and len(dataset(store, tmp_path)) == 4


def test_retry_exhausted_task_drops_its_record_and_the_row_group_completes(tmp_path):
    """Reference defect (74, 84): exhausted tasks left their row group unfinished forever."""
    calls = []

    def always(row):
        calls.append(row["i"])
        if row["i"] == 3:
            raise TimeoutError("slow")
        return row["i"]

    specs = [spec("i", "batch"), spec("v", deps=["i"]), spec("w", deps=["v"])]
    status, sched, store = run_engine(specs, {"i": index_root(), "v": AsyncFn(always),
                                              "w": AsyncFn(lambda row: row["v"])},
                                      num_records=5, row_group_size=5, home=tmp_path, salvage_max_rounds=2)
    assert status == "complete"
    assert calls.count(3) == 3  # 1 + salvage_max_rounds
    assert list(dataset(store, tmp_path)["i"]) == [0, 1, 2, 4]
    assert store.row_groups("r1")[0]["rows_dropped"] == 1
    assert [gen for gen, _ in store.failed_tasks("r1")] == ["v"]
    loaded = store.load_row_group("r1", 0)
    assert loaded.dropped == {3} and loaded.attempts == {("v", 3): 3}


def test_salvage_has_no_barrier_other_row_groups_checkpoint_while_one_waits(tmp_path):
    """Reference defect (71, 72): salvage waited for the main loop to drain."""
    order = []

    def slow_retry(row):
        if row["i"] == 0 and not order:
            order.append("failed")
            raise RetryableError("later")
        return 1

    specs = [spec("i", "batch"), spec("v", deps=["i"])]
    sched, store = make_run(specs, {"i": index_root(), "v": AsyncFn(slow_retry)}, num_records=6,
                            row_group_size=2, home=tmp_path, retry_backoff_s=0.3)
    seen = []
    original = store.checkpoint_row_group

    def spy(run_id, rg, *args, **kw):
        seen.append(rg)
        return original(run_id, rg, *args, **kw)

    store.checkpoint_row_group = spy
    assert asyncio.run(sched.run()) == "complete"
    assert seen[-1] == 0 and sorted(seen) == [0, 1, 2]  # rg 0 waits alone
    assert sorted(p.name for p in (tmp_path / "runs" / "r1" / "row_groups").iterdir()) == [
        "rg-000000-e1.parquet", "rg-000001-e1.parquet", "rg-000002-e1.parquet"]  # id and lease epoch


def test_failed_cell_drops_its_record_and_downstream_is_never_dispatched(tmp_path):
    downstream = []

    def bad(row):
        if row["i"] == 1:
            raise ValueError("bad input")
        return row["i"]

    specs = [spec("i", "batch"), spec("v", deps=["i"]), spec("w", deps=["v"]),
             spec("agg", "batch", deps=["w"])]
    gens = {"i": index_root(), "v": AsyncFn(bad), "w": AsyncFn(lambda row: downstream.append(row["v"]) or 0),
            "agg": AsyncFn(lambda df: [len(df)] * len(df), "batch")}
    status, _, store = run_engine(specs, gens, num_records=3, row_group_size=3, home=tmp_path)
    df = dataset(store, tmp_path)
    assert status == "complete" and sorted(downstream) == [0, 2]
    assert list(df["i"]) == [0, 2] and list(df["agg"]) == [2, 2]


def test_failed_from_scratch_task_drops_its_row_group(tmp_path):
    def root(df):
        if df.index[0] == 0:
            raise ValueError("no seed")
        return list(df.index)

    calls = []
    specs = [spec("i", "batch"), spec("v", deps=["i"])]
    status, _, store = run_engine(specs, {"i": AsyncFn(root, "batch"), "v": AsyncFn(lambda r: calls.append(1))},
                                  num_records=4, row_group_size=2, home=tmp_path)
    assert status == "complete"
    groups = store.row_groups("r1")
    assert groups[0]["rows_dropped"] == 2 and groups[0]["state"] == "checkpointed"
    assert pq.read_table(tmp_path / groups[0]["path"]).num_rows == 0  # one file per row group, even empty
    assert list(dataset(store, tmp_path)["i"]) == [2, 3] and len(calls) == 2


def test_row_dropped_during_a_batch_await_only_skips_that_row(tmp_path):
    """Reference defect (70): the drop set was read after the await and the row group dropped."""
    release = {}

    async def slow_batch(df):
        release["ev"] = asyncio.Event()
        await release["ev"].wait()
        return list(df.index)

    def dropper(row):
        if row["i"] == 1:
            release["ev"].set()
            raise ValueError("drop me")
        return 0

    async def waits(row):
        while "ev" not in release:
            await asyncio.sleep(0.001)
        return dropper(row)

    specs = [spec("i", "batch"), spec("slow", "batch", deps=["i"]), spec("d", deps=["i"])]
    gens = {"i": index_root(), "slow": AsyncFn(slow_batch, "batch"), "d": AsyncFn(waits)}
    status, _, store = run_engine(specs, gens, num_records=3, row_group_size=3, home=tmp_path)
    df = dataset(store, tmp_path)
    assert status == "complete" and list(df["i"]) == [0, 2] and list(df["slow"]) == [0, 2]


def test_batch_result_of_the_wrong_length_fails_the_row_group(tmp_path):
    specs = [spec("i", "batch"), spec("b", "batch", deps=["i"])]
    status, sched, store = run_engine(specs, {"i": index_root(), "b": AsyncFn(lambda df: [1], "batch")},
                                      num_records=3, row_group_size=3, home=tmp_path)
    # 1 of its 2 tasks failed for good: at the end, that share is judged (CONTRACT section 5)
    assert status == "failed" and store.row_groups("r1")[0]["rows_dropped"] == 3
    [(gen, error)] = store.failed_tasks("r1")
    assert gen == "b" and "1 values" in error


def test_error_rate_stops_the_run_on_a_full_window_of_permanent_failures(tmp_path):
    def bad(row):
        raise ValueError("broken")

    specs = [spec("i", "batch"), spec("v", deps=["i"])]
    status, sched, _ = run_engine(specs, {"i": index_root(), "v": AsyncFn(bad)}, num_records=1000,
                                  row_group_size=100, home=tmp_path, shutdown_error_rate=0.5,
                                  shutdown_error_window=20, max_in_flight_tasks=4)
    assert status == "failed" and sched.stats.tasks_failed < 200


def test_error_rate_stops_a_run_only_on_a_full_window_and_judges_the_rest_at_the_end(tmp_path):
    def bad(row):
        raise ValueError("broken")

    specs = [spec("v")]
    status, sched, _ = run_engine(specs, {"v": AsyncFn(bad)}, num_records=10, row_group_size=10,
                                  home=tmp_path, shutdown_error_rate=0.5, shutdown_error_window=50)
    # never stopped early (every task ran), but 10 of 10 failed: the run ends failed
    assert status == "failed" and sched.stats.tasks_failed == 10
    assert "10 of the last 10" in sched.stop_reason


def test_a_few_failures_under_the_error_rate_end_complete(tmp_path):
    def sometimes(row):
        if row["i"] % 5 == 0:
            raise ValueError("broken")
        return 1

    specs = [spec("i", "batch"), spec("v", deps=["i"])]
    status, sched, _ = run_engine(specs, {"i": index_root(), "v": AsyncFn(sometimes)}, num_records=10,
                                  row_group_size=10, home=tmp_path, shutdown_error_window=50)
    assert status == "complete" and sched.stats.tasks_failed == 2 and sched.stop_reason is None


def test_retryable_errors_do_not_trip_the_error_rate(tmp_path):
    seen = set()

    def flaky(row):
        if row["i"] not in seen:
            seen.add(row["i"])
            raise RetryableError("429")
        return 1

    specs = [spec("i", "batch"), spec("v", deps=["i"])]
    status, _, _ = run_engine(specs, {"i": index_root(), "v": AsyncFn(flaky)}, num_records=50,
                              row_group_size=50, home=tmp_path, shutdown_error_window=10)
    assert status == "complete"


def test_tracing_is_off_by_default_and_records_every_attempt_when_on(tmp_path):
    flaky_seen = set()

    def flaky(row):
        if row["i"] not in flaky_seen:
            flaky_seen.add(row["i"])
            raise RetryableError("again")
        return 1

    specs = [spec("i", "batch"), spec("v", deps=["i"])]
    _, off, _ = run_engine(specs, {"i": index_root(), "v": AsyncFn(lambda r: 1)}, num_records=3,
                           row_group_size=3, home=tmp_path)
    assert off.traces == []
    _, on, _ = run_engine(specs, {"i": index_root(), "v": AsyncFn(flaky)}, num_records=3,
                          row_group_size=3, home=tmp_path / "b", trace=True)
    statuses = sorted(t.status for t in on.traces if t.column == "v")
    assert statuses == ["deferred"] * 3 + ["ok"] * 3
    assert all(t.finished_at >= t.started_at >= t.dispatched_at > 0 for t in on.traces)
