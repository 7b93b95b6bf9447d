"""The scheduler on the in-memory store: every guarantee of the reference, and each of its
defects behaving as our contract says (SEED_BEHAVIORS.md)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.errors import RetryableError
from tests.engine_helpers import AsyncFn, SyncFn, dataset, index_root, make_run, run_engine, spec


def test_pipeline_of_cell_and_batch_columns_completes_with_values(tmp_path):
    specs = [spec("i", "batch"), spec("double", deps=["i"]), spec("total", "batch", deps=["double"])]
    gens = {"i": index_root(), "double": AsyncFn(lambda row: row["i"] * 2),
            "total": AsyncFn(lambda df: [int(df["double"].sum())] * len(df), "batch")}
    status, sched, store = run_engine(specs, gens, num_records=25, row_group_size=10, home=tmp_path)
    assert status == "complete"
    df = dataset(store, tmp_path)
    assert list(df["i"]) == list(range(25))
    assert list(df["double"]) == [2 * i for i in range(25)]
    assert list(df["total"][:10]) == [sum(2 * i for i in range(10))] * 10
    assert [g["state"] for g in store.row_groups("r1")] == ["checkpointed"] * 3


def test_sync_generators_run_in_worker_threads_and_async_ones_on_the_loop(tmp_path):
    seen = {}
    loop_thread = []

    async def on_loop(row):
        loop_thread.append(threading.current_thread())
        return 1

    def in_thread(row):
        seen.setdefault("threads", set()).add(threading.current_thread().name)
        return 2

    specs = [spec("a"), spec("b")]
    status, _, _ = run_engine(specs, {"a": AsyncFn(on_loop), "b": SyncFn(in_thread)},
                              num_records=20, row_group_size=10, home=tmp_path)
    assert status == "complete"
    assert all(t is threading.main_thread() for t in loop_thread)
    assert all(name.startswith("pipeline-gen") for name in seen["threads"])


def test_root_cell_column_gets_one_task_per_record(tmp_path):
    calls = []
    specs = [spec("c")]
    status, _, store = run_engine(specs, {"c": AsyncFn(lambda row: calls.append(row) or len(calls))},
                                  num_records=7, row_group_size=3, home=tmp_path)
    assert status == "complete"
    assert len(calls) == 7 and all(row == {} for row in calls)
    assert len(dataset(store, tmp_path)) == 7


def test_multi_output_generator_runs_once_per_record_and_feeds_downstream(tmp_path):
    calls = []

    def pair(row):
        calls.append(row["i"])
        return {"x": row["i"], "y": -row["i"]}

    specs = [spec("i", "batch"), spec("xy", deps=["i"], outputs=("x", "y")), spec("s", deps=["x", "y"])]
    gens = {"i": index_root(), "xy": AsyncFn(pair), "s": AsyncFn(lambda row: row["x"] + row["y"])}
    status, _, store = run_engine(specs, gens, num_records=6, row_group_size=6, home=tmp_path)
    assert status == "complete" and sorted(calls) == list(range(6))
    df = dataset(store, tmp_path)
    assert list(df.columns) == ["i", "x", "y", "s"]
    assert list(df["y"]) == [-i for i in range(6)] and list(df["s"]) == [0] * 6


def test_side_effect_outputs_are_stored_and_readable_downstream(tmp_path):
    specs = [spec("answer", outputs=("answer", "answer__trace")), spec("uses", deps=["answer__trace"])]
    gens = {"answer": AsyncFn(lambda row: {"answer": 1, "answer__trace": "why"}),
            "uses": AsyncFn(lambda row: row["answer__trace"].upper())}
    status, _, store = run_engine(specs, gens, num_records=3, row_group_size=3, home=tmp_path)
    df = dataset(store, tmp_path)
    assert list(df["answer__trace"]) == ["why"] * 3 and list(df["uses"]) == ["WHY"] * 3


def test_in_flight_tasks_never_exceed_the_bound(tmp_path):
    now, peak = [0], [0]

    async def slow(row):
        now[0] += 1
        peak[0] = max(peak[0], now[0])
        await asyncio.sleep(0.001)
        now[0] -= 1
        return 0

    status, _, _ = run_engine([spec("a"), spec("b")], {"a": AsyncFn(slow), "b": AsyncFn(slow)},
                              num_records=60, row_group_size=20, home=tmp_path, max_in_flight_tasks=3)
    assert status == "complete" and peak[0] == 3


def test_live_row_groups_never_exceed_max_concurrent_row_groups(tmp_path):
    peak = [0]
    holder = {}

    async def cell(row):
        peak[0] = max(peak[0], holder["s"].live_row_groups)
        await asyncio.sleep(0)
        return 0

    sched, store = make_run([spec("a")], {"a": AsyncFn(cell)}, num_records=50, row_group_size=5,
                            home=tmp_path, max_concurrent_row_groups=2)
    holder["s"] = sched
    assert asyncio.run(sched.run()) == "complete"
    assert peak[0] == 2


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


def test_stateful_generator_runs_row_groups_in_order_even_under_retries(tmp_path):
    """Reference defect (54): a retried stateful seed ran after later row groups."""
    log = []
    failed_once = set()

    async def stateful(df):
        first = int(df.index[0])
        await asyncio.sleep(0.001)
        if first == 0 and first not in failed_once:
            failed_once.add(first)
            raise RetryableError("try again")
        log.append(first)
        return list(df.index)

    specs = [spec("i", "batch", stateful=True), spec("v", deps=["i"])]
    gens = {"i": AsyncFn(stateful, "batch", stateful=True), "v": AsyncFn(lambda row: row["i"])}
    status, _, store = run_engine(specs, gens, num_records=8, row_group_size=2, home=tmp_path,
                                  max_concurrent_row_groups=4)
    assert status == "complete" and log == [0, 2, 4, 6]


def test_stateful_cell_generator_runs_one_task_at_a_time_in_record_order(tmp_path):
    log, now, peak = [], [0], [0]

    async def cell(row):
        now[0] += 1
        peak[0] = max(peak[0], now[0])
        await asyncio.sleep(0)
        now[0] -= 1
        log.append(row["i"])
        return row["i"]

    specs = [spec("i", "batch"), spec("s", deps=["i"], stateful=True)]
    status, _, _ = run_engine(specs, {"i": index_root(), "s": AsyncFn(cell, stateful=True)},
                              num_records=9, row_group_size=3, home=tmp_path, max_concurrent_row_groups=3)
    assert status == "complete" and log == list(range(9)) and peak[0] == 1


def test_a_stateful_generator_waiting_for_another_workers_row_group_goes_on_through_retries(tmp_path):
    """Two workers, one row group each. The stateful column of row group 1 waits for worker
    holding row group 0 (the store is looked at again and again) while the other column's tasks
    keep failing once and being retried: the waiting never stops looking."""
    from pipeline.store import open_store
    from tests.conftest_store import sqlite_url

    log, failed = [], set()

    async def stateful(row):
        await asyncio.sleep(0.02)
        log.append(row["i"])
        return row["i"]

    async def flaky(row):
        await asyncio.sleep(0.015 * (row["i"] % 10))  # failures spread over the wait
        if row["i"] not in failed:
            failed.add(row["i"])
            raise RetryableError("once")
        return 0

    def worker(store):
        specs = [spec("i", "batch"), spec("s", deps=["i"], stateful=True), spec("f", deps=["i"])]
        gens = {"i": index_root(), "s": AsyncFn(stateful, stateful=True), "f": AsyncFn(flaky)}
        sched, _ = make_run(specs, gens, num_records=20, row_group_size=10, home=tmp_path, store=store,
                            max_concurrent_row_groups=1, poll_s=0.05)
        return sched

    async def both(first, second):
        return await asyncio.wait_for(asyncio.gather(worker(first).run(), worker(second).run()), 60)

    with open_store(sqlite_url(tmp_path)) as first, open_store(sqlite_url(tmp_path)) as second:
        assert asyncio.run(both(first, second)) == ["complete", "complete"]
    assert log == list(range(20)) and len(failed) == 20


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


def test_failed_checkpoint_is_retried(tmp_path):
    specs = [spec("v")]
    sched, store = make_run(specs, {"v": AsyncFn(lambda r: 1)}, num_records=2, row_group_size=2, home=tmp_path)
    real = store.checkpoint_row_group
    calls = []

    def flaky_checkpoint(*args, **kw):
        calls.append(args)
        if len(calls) == 1:
            raise OSError("disk hiccup")
        return real(*args, **kw)

    store.checkpoint_row_group = flaky_checkpoint
    assert asyncio.run(sched.run()) == "complete"
    assert len(calls) == 2 and store.row_groups("r1")[0]["state"] == "checkpointed"


def test_stop_leaves_every_finished_result_recorded_and_the_run_resumable(tmp_path):
    calls = []

    async def slow(row):
        calls.append(row["i"])
        await asyncio.sleep(0.01)
        return row["i"]

    specs = [spec("i", "batch"), spec("v", deps=["i"])]

    async def go(sched):
        task = asyncio.create_task(sched.run())
        while len(calls) < 30:
            await asyncio.sleep(0.001)
        sched.stop()
        return await task

    sched, store = make_run(specs, {"i": index_root(), "v": AsyncFn(slow)}, num_records=200,
                            row_group_size=50, home=tmp_path, max_in_flight_tasks=8)
    assert asyncio.run(go(sched)) == "interrupted"
    live = [g["row_group"] for g in store.row_groups("r1") if g["state"] != "checkpointed"]
    assert all(g["lease_owner"] is None for g in store.row_groups("r1")), "a stop gives its leases back"
    done_before = {(rg, gen, i) for rg in live for gen, i in store.load_row_group("r1", rg).done}
    assert done_before, "finished results are recorded"
    # resume with a fresh scheduler (a new process would do the same)
    calls.clear()
    sched2, _ = make_run(specs, {"i": index_root(), "v": AsyncFn(slow)}, num_records=200, row_group_size=50,
                         home=tmp_path, store=store, max_in_flight_tasks=8)
    assert asyncio.run(sched2.run()) == "complete"
    redone = {(i // 50, "v", i % 50) for i in calls}
    assert not (redone & done_before), "a recorded task never runs again"
    assert list(dataset(store, tmp_path)["v"]) == list(range(200))


def test_topological_order_and_dispatch_do_not_depend_on_hash_seed(tmp_path):
    import subprocess
    import sys

    code = ("from types import SimpleNamespace as N; from pipeline.graph import build_graph;"
            "cs=[N(name=n,type='t',outputs=(n,),dependencies=tuple(d),strategy='cell',stateful=False) for n,d in "
            "[('z',[]),('a',['z']),('m',['z']),('b',['z']),('q',['a','m','b'])]];"
            "print(build_graph(N(columns=cs,source=None)).order)")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(s), "PATH": "/usr/bin"}, cwd=str(__import__("pathlib").Path(__file__).parent.parent)).stdout
            for s in (0, 1, 3, 7, 42)}
    assert outs == {"['z', 'a', 'm', 'b', 'q']\n"}


def test_memory_stays_flat_no_row_group_state_after_completion(tmp_path):
    specs = [spec("i", "batch"), spec("v", deps=["i"])]
    status, sched, store = run_engine(specs, {"i": AsyncFn(lambda df: np.arange(len(df)), "batch"),
                                              "v": AsyncFn(lambda r: 1)},
                                      num_records=100, row_group_size=10, home=tmp_path)
    assert status == "complete" and sched.live_row_groups == 0 and sched.tasks_running == 0
    for rg in range(10):  # compacted: no task row left
        loaded = store.load_row_group("r1", rg)
        assert (loaded.done, loaded.attempts, loaded.deferred) == ({}, {}, {})


def test_a_worker_that_lost_its_lease_abandons_the_row_group_and_records_nothing_for_it(tmp_path):
    """Its renewals stop reaching the store (a stalled worker); another worker takes row group 0
    over once the lease has expired. The first learns it at its next commit: it abandons row
    group 0, writes nothing more for it, and finishes row group 1."""
    from pipeline.store import open_store
    from tests.conftest_store import sqlite_url

    gate = {"n": 0}
    taken = asyncio.Event()

    async def slow(row):
        gate["n"] += 1
        if gate["n"] > 20:  # the rest wait for the takeover
            await taken.wait()
        await asyncio.sleep(0.002)
        return row["i"]

    async def until(condition, what):
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, f"still waiting for {what}"
            await asyncio.sleep(0.01)

    async def go(sched, store, other):
        task = asyncio.create_task(sched.run())
        await until(lambda: gate["n"] >= 20, "20 cells")
        store.renew_leases = lambda run_id, lease_s: set()  # renewals stop reaching the store
        claims = []
        await until(lambda: claims.extend(other.claim_row_groups("r1", 1, 60)) or claims, "the takeover")
        assert [c.row_group for c in claims] == [0]
        taken.set()
        await until(lambda: store.lease_epoch("r1", 0) is None and sched.live_row_groups <= 1, "the abandon")
        frozen = other.load_row_group("r1", 0)
        await until(lambda: store.row_groups("r1")[1]["state"] == "checkpointed", "row group 1's checkpoint")
        sched.stop()
        await task
        return frozen

    specs = [spec("i", "batch"), spec("v", deps=["i"])]
    url = sqlite_url(tmp_path)
    with open_store(url) as store, open_store(url, owner="elsewhere.example:1:1:beef") as other:
        sched, _ = make_run(specs, {"i": index_root(), "v": AsyncFn(slow)}, num_records=400, row_group_size=200,
                            home=tmp_path, store=store, max_concurrent_row_groups=2, max_in_flight_tasks=4,
                            lease_s=1.0)
        frozen = asyncio.run(go(sched, store, other))
        assert other.load_row_group("r1", 0) == frozen  # nothing written after the loss
        group = store.row_groups("r1")[0]
        assert (group["lease_owner"], group["state"]) == (other.owner, "active")


def test_tasks_still_running_at_a_commit_are_recorded_in_flight(tmp_path):
    release = asyncio.Event()

    async def blocked(row):
        await release.wait()
        return 1

    sched, store = make_run([spec("v")], {"v": AsyncFn(blocked)}, num_records=3, row_group_size=3, home=tmp_path)

    async def go():
        run = asyncio.create_task(sched.run())
        deadline = time.monotonic() + 60
        while store.column_counts("r1")["v"]["in_flight"] < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        counts = store.column_counts("r1")["v"]
        release.set()
        assert await run == "complete"
        return counts

    assert asyncio.run(go()) == {"done": 0, "failed": 0, "deferred": 0, "in_flight": 3, "truncated": 0}


def test_ready_columns_share_the_in_flight_budget(tmp_path):
    """Reference §3.3: with 4 slots and 3 slow columns ready at once, the first 4 dispatches
    cover all 3 columns and none takes more than 2."""
    started = []

    def slow(name):
        async def fn(row):
            started.append(name)
            await asyncio.sleep(0.01)
            return 0
        return AsyncFn(fn)

    specs = [spec("i", "batch"), spec("a", deps=["i"]), spec("b", deps=["i"]), spec("c", deps=["i"])]
    status, _, _ = run_engine(specs, {"i": index_root(), "a": slow("a"), "b": slow("b"), "c": slow("c")},
                              num_records=20, row_group_size=20, home=tmp_path, max_in_flight_tasks=4)
    first = started[:4]
    assert status == "complete" and set(first) == {"a", "b", "c"} and max(first.count(x) for x in "abc") <= 2


def test_a_checkpoint_that_keeps_failing_is_tried_again_until_it_succeeds(tmp_path):
    sched, store = make_run([spec("v")], {"v": AsyncFn(lambda r: 1)}, num_records=4, row_group_size=2,
                            home=tmp_path)
    real = store.checkpoint_row_group
    calls = []

    def failing_for_a_while(run_id, rg, *args, **kw):
        calls.append(rg)
        if rg == 0 and calls.count(0) <= 4:  # more than one round of the checkpoint's own retries
            raise OSError("disk full")
        return real(run_id, rg, *args, **kw)

    store.checkpoint_row_group = failing_for_a_while
    sched.opts.poll_s = 0.05
    assert asyncio.run(asyncio.wait_for(sched.run(), 20)) == "complete"
    assert calls.count(0) == 5 and [g["state"] for g in store.row_groups("r1")] == ["checkpointed"] * 2
