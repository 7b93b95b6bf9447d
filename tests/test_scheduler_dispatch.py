"""The scheduler on the in-memory store, dispatching: cell and batch columns to their values,
sync generators on worker threads and async ones on the loop, multi-output and side-effect
columns, the in-flight and row-group bounds and how ready columns share them, stateful
generators in record order (also across two workers on one SQLite store), a dispatch order
that does not depend on the hash seed, and no state left once a run completes. Each
reference defect named here behaves as our contract says (SEED_BEHAVIORS.md).

Failures are in test_scheduler_failures.py; checkpoints, stops and leases in
test_scheduler_durability.py."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

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
