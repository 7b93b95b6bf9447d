"""The scheduler on the in-memory and SQLite stores, keeping what it did: a checkpoint that
fails is tried again until it succeeds, a stop leaves every finished result recorded and the
run resumable, a worker that lost its lease abandons the row group, and tasks still running at
a commit are recorded in flight."""

from __future__ import annotations

import asyncio
import time

from tests.engine_helpers import AsyncFn, dataset, index_root, make_run, spec


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
