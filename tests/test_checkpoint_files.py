"""Row-group files on the engine: a checkpoint's file is fenced by the lease epoch, and a
checkpoint that can never be written stops the run (resumably) instead of retrying for ever. What
every store does with the file (fencing, size and digest, reopening) is in
tests/store/test_contract.py."""

from __future__ import annotations

import asyncio
import os
import threading

import pyarrow as pa

from pipeline.store.events import DONE, TaskEvent
from pipeline.store.memory import MemoryStore
from pipeline.values import encode
from tests.engine_helpers import AsyncFn, dataset, make_run, spec


def done_event(rg, generator, row_index, task_type, value):
    """A DONE event as the engine appends it: the value as its JSON text (pipeline.values)."""
    return TaskEvent(DONE, rg, generator, row_index, task_type, encode(value))



def folder_of(home) -> str:
    return os.path.join(home, "runs", "r1", "row_groups")


def test_a_worker_whose_row_group_was_taken_over_during_its_last_cell_writes_no_file(tmp_path):
    """A's last cell of row group 0 runs while B takes the row group over and checkpoints it;
    the cell then fails late, and A, which has not learned of the takeover yet, finishes the
    row group. The commit of its events tells A the lease is gone: it writes no file, and the
    row group's file stays B's, with every record."""
    data: dict = {"runs": {}, "lock": threading.RLock()}
    home = str(tmp_path)
    b_file = {}

    async def value(row):
        if row["i"] == 0 and not b_file:
            b = MemoryStore(data)
            data["runs"]["r1"]["groups"][0]["lease_expires_at"] = 0  # A's lease expired
            [claim] = b.claim_row_groups("r1", 1, 60)
            name = f"rg-000000-e{claim.epoch}.parquet"
            os.makedirs(folder_of(home), exist_ok=True)
            pa.parquet.write_table(pa.table({"i": [0, 1], "v": [0, 10]}), os.path.join(folder_of(home), name))
            assert b.checkpoint_row_group("r1", 0, f"runs/r1/row_groups/{name}", 0)
            b_file["name"] = name
            raise ValueError("a late failure")
        return row["i"] * 10

    specs = [spec("i", "batch"), spec("v", deps=["i"])]
    gens = {"i": AsyncFn(lambda df: list(df.index), "batch"), "v": AsyncFn(value)}
    sched, store = make_run(specs, gens, num_records=4, row_group_size=2, home=home,
                            store=MemoryStore(data), lease_s=300)
    assert asyncio.run(asyncio.wait_for(sched.run(), 30)) == "complete"
    assert b_file["name"] == "rg-000000-e2.parquet"
    assert sorted(os.listdir(folder_of(home))) == ["rg-000000-e2.parquet", "rg-000001-e1.parquet"]
    assert [g["path"] for g in store.row_groups("r1")] == [
        "runs/r1/row_groups/rg-000000-e2.parquet", "runs/r1/row_groups/rg-000001-e1.parquet"]
    assert dataset(store, home)["v"].tolist() == [0, 10, 20, 30]


def test_a_worker_taken_over_while_it_writes_its_file_removes_it(tmp_path):
    """The narrowest window: the takeover happens after A committed the row group's events and
    while A writes its file (a worker stopped in its fsync). A's fenced checkpoint is refused
    and A removes the file it wrote; B's stays the row group's."""
    data: dict = {"runs": {}, "lock": threading.RLock()}
    home = str(tmp_path)
    sched, store = make_run([spec("v")], {"v": AsyncFn(lambda r: 7)}, num_records=4, row_group_size=2,
                            home=home, store=MemoryStore(data), lease_s=300)
    real = store.checkpoint_row_group
    written = []

    def taken_over_meanwhile(run_id, rg, path, *args, **kw):
        if rg == 0 and not written:
            written.append(path)
            assert os.path.exists(os.path.join(home, path))  # A's file is there, not yet current
            b = MemoryStore(data)
            data["runs"]["r1"]["groups"][0]["lease_expires_at"] = 0
            b.claim_row_groups("r1", 1, 60)
            pa.parquet.write_table(pa.table({"v": [7, 7]}), os.path.join(folder_of(home), "rg-000000-e2.parquet"))
            assert b.checkpoint_row_group("r1", 0, "runs/r1/row_groups/rg-000000-e2.parquet", 0)
        return real(run_id, rg, path, *args, **kw)

    store.checkpoint_row_group = taken_over_meanwhile
    assert asyncio.run(asyncio.wait_for(sched.run(), 30)) == "complete"
    assert written == ["runs/r1/row_groups/rg-000000-e1.parquet"]
    assert sorted(os.listdir(folder_of(home))) == ["rg-000000-e2.parquet", "rg-000001-e1.parquet"]
    assert store.row_groups("r1")[0]["path"] == "runs/r1/row_groups/rg-000000-e2.parquet"


def test_files_of_older_epochs_go_once_a_newer_one_is_current(tmp_path):
    data: dict = {"runs": {}, "lock": threading.RLock()}
    home = str(tmp_path)
    specs = [spec("v")]
    sched, store = make_run(specs, {"v": AsyncFn(lambda r: 1)}, num_records=4, row_group_size=2, home=home,
                            store=MemoryStore(data))
    earlier = MemoryStore(data)  # a worker that claimed row group 0 and gave it back
    earlier.claim_row_groups("r1", 1, 60)
    earlier.release_row_groups("r1", [0])
    os.makedirs(folder_of(home))
    leftovers = ["rg-000000.parquet", "rg-000000-e1.parquet", "rg-000001-e7.parquet", "other.txt"]
    for name in leftovers:
        open(os.path.join(folder_of(home), name), "wb").close()
    assert asyncio.run(asyncio.wait_for(sched.run(), 30)) == "complete"
    # Row group 0's older files are gone; a later epoch of row group 1 (not older than its
    # current one) and files that are not row groups' stay.
    assert sorted(os.listdir(folder_of(home))) == [
        "other.txt", "rg-000000-e2.parquet", "rg-000001-e1.parquet", "rg-000001-e7.parquet"]


def test_a_checkpoint_that_can_never_be_written_stops_the_run_failed_naming_the_path(tmp_path):
    sched, store = make_run([spec("v")], {"v": AsyncFn(lambda r: 1)}, num_records=2, row_group_size=2,
                            home=tmp_path)
    calls = []

    def full_disk(*args, **kw):
        calls.append(args[1])
        raise OSError(28, "No space left on device")

    store.checkpoint_row_group = full_disk
    sched.opts.poll_s = 0.05
    assert asyncio.run(asyncio.wait_for(sched.run(), 30)) == "failed"
    assert len(calls) == 3 * sched.CHECKPOINT_ROUNDS
    assert "rg-000000-e3.parquet" in sched.stop_reason and "No space left on device" in sched.stop_reason
    assert store.row_groups("r1")[0]["state"] == "complete"
    assert store.row_groups("r1")[0]["lease_owner"] is None  # given back: a resume takes it at once
