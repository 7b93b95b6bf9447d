"""What `pipeline retry` stands on: the store method reopen_failed on the memory, SQLite and
PostgreSQL stores (a checkpointed row group brought back with its values, a worker holding the
row group fenced off, row groups compacted before retry existed), the checkpoint that keeps the
cells of dropped records, and the engine finishing a reopened run on the memory store.

The command itself is in test_retry_cli.py."""

from __future__ import annotations

import collections
import uuid

import pandas as pd
import pytest

from pipeline.errors import RunNotFoundError, StoreError
from pipeline.store import open_store
from pipeline.store.base import ColumnSpec, Lineage, NewRun
from pipeline.store.events import DONE, FAILED, Completed, Dropped, TaskEvent
from pipeline.values import encode


def done_event(rg, generator, row_index, task_type, value):
    """A DONE event as the engine appends it: the value as its JSON text (pipeline.values)."""
    return TaskEvent(DONE, rg, generator, row_index, task_type, encode(value))


# -- the engine on the in-memory store -------------------------------------------------------


def test_the_engine_finishes_a_reopened_run_on_the_memory_store(tmp_path):
    from pipeline.dataset import read_row_group
    from pipeline.generators.base import Generator
    from tests.engine_helpers import dataset, run_engine, spec

    class Fn(Generator):
        def __init__(self, fn, strategy="cell"):
            self.fn, self.strategy = fn, strategy

        async def agenerate(self, data):
            return self.fn(data)

    bug, calls = [True], collections.Counter()

    def v(row):
        if bug[0] and row["i"] % 4 == 1:
            raise ValueError("bug")
        calls["v", row["i"]] += 1
        return row["i"] * 10

    def make():
        return {"i": Fn(lambda df: list(df.index), "batch"), "v": Fn(v), "w": Fn(lambda row: row["v"] + 1),
                "t": Fn(lambda df: (df["w"] * len(df)).tolist(), "batch")}

    specs = [spec("i", "batch"), spec("v", deps=["i"]), spec("w", deps=["v"]), spec("t", "batch", deps=["w"])]
    status, _, store = run_engine(specs, make(), num_records=40, row_group_size=10, home=tmp_path / "a",
                                  shutdown_error_rate=1.0)
    assert status == "complete" and len(dataset(store, tmp_path / "a")) == 30
    bug[0] = False
    # i (from_scratch) -> v (cell) -> w (cell) -> t (batch), as pipeline.api derives it from the graph
    lineage = Lineage(outputs={g: (g,) for g in "ivwt"},
                      task_types={"i": "from_scratch", "v": "cell", "w": "cell", "t": "batch"},
                      upstream={"i": frozenset(), "v": frozenset("i"), "w": frozenset("iv"), "t": frozenset("ivw")},
                      downstream={"i": frozenset("vwt"), "v": frozenset("wt"), "w": frozenset("t"), "t": frozenset()})
    got = store.reopen_failed("r1", lineage, read_file=lambda path: read_row_group(tmp_path / "a" / path))
    assert (got.tasks, got.records, got.row_groups) == ({"v": 10}, 10, [0, 1, 2, 3])
    status, _, store = run_engine(specs, make(), num_records=40, row_group_size=10, home=tmp_path / "a",
                                  store=store)
    assert status == "complete" and max(calls.values()) == 1 and len(calls) == 40
    _, _, clean = run_engine(specs, make(), num_records=40, row_group_size=10, home=tmp_path / "b")
    pd.testing.assert_frame_equal(dataset(store, tmp_path / "a"), dataset(clean, tmp_path / "b"))


# -- the store method ------------------------------------------------------------------------

COLUMNS = [ColumnSpec("s", "s", "batch", 0), ColumnSpec("x", "x", "cell", 1), ColumnSpec("y", "y", "cell", 2),
           ColumnSpec("t", "t", "batch", 3)]
# s (from_scratch) -> x (cell) -> y (cell, fails) -> t (batch)
LINEAGE = Lineage(
    outputs={"s": ("s",), "x": ("x",), "y": ("y",), "t": ("t",)},
    task_types={"s": "from_scratch", "x": "cell", "y": "cell", "t": "batch"},
    upstream={"s": frozenset(), "x": frozenset("s"), "y": frozenset("sx"), "t": frozenset("sxy")},
    downstream={"s": frozenset("xyt"), "x": frozenset("yt"), "y": frozenset("t"), "t": frozenset()},
)


def finished_run(store, run_id: str) -> dict[str, list]:
    """Two row groups of 4: in row group 0, y fails at record 1 (dropped) after x and y were
    done elsewhere; row group 1 is clean and stays live. Returns row group 0's file columns."""
    store.create_run(NewRun(run_id, "t", 8, 4, 0, "{}", "fp", COLUMNS))
    store.claim_row_groups(run_id, 2, 60)
    store.record(run_id, [
        done_event(0, "s", None, "from_scratch", {"s": [10, 11, 12, 13]}),
        *[done_event(0, "x", r, "cell", f"x{r}") for r in range(4)],
        TaskEvent(FAILED, 0, "y", 1, "cell", attempts=1, error="ValueError: boom"), Dropped(0, 1),
        *[done_event(0, "y", r, "cell", {"deep": [r]}) for r in (0, 2, 3)],
        done_event(0, "t", None, "batch", {"t": [0, None, 2, 3]}),
        Completed(0),
        done_event(1, "s", None, "from_scratch", {"s": [14, 15, 16, 17]}),
    ])
    assert store.checkpoint_row_group(run_id, 0, "rg-0.parquet", 1)
    return {"s": [10, 12, 13], "x": ["x0", "x2", "x3"], "y": [{"deep": [0]}, {"deep": [2]}, {"deep": [3]}],
            "t": [0, 2, 3]}


def test_reopen_failed_brings_a_checkpointed_row_group_back_with_its_values(any_store):
    store, run_id = any_store, f"r-{uuid.uuid4().hex[:8]}"
    file_columns = finished_run(store, run_id)
    store.set_run_status(run_id, "complete")
    read = []

    def read_file(path):
        read.append(path)
        return file_columns

    assert store.reopen_failed(run_id, LINEAGE, generators={"x"}, read_file=read_file).tasks == {}
    assert store.reopen_failed(run_id, LINEAGE, error="nope", read_file=read_file).tasks == {}
    assert read == [] and store.get_run(run_id).status == "complete"

    got = store.reopen_failed(run_id, LINEAGE, generators={"y"}, error="boom", read_file=read_file)
    assert (got.tasks, got.records, got.row_groups, got.reset) == ({"y": 1}, 1, [0], 1)
    assert read == ["rg-0.parquet"]
    assert store.get_run(run_id).status == "running" and store.get_run(run_id).finished_at is None
    group = store.row_groups(run_id)[0]
    assert (group["state"], group["rows_dropped"], group["lease_owner"]) == ("active", 0, None)

    loaded = store.load_row_group(run_id, 0)
    assert loaded.dropped == set() and loaded.attempts == {} and loaded.deferred == {}
    # x at record 1 was done before y failed there: kept through the checkpoint. t was computed
    # without record 1: it is computed again; s (upstream of y) keeps its value.
    assert loaded.done == {
        ("s", None): {"s": [10, 11, 12, 13]},
        **{("x", r): f"x{r}" for r in range(4)},
        **{("y", r): {"deep": [r]} for r in (0, 2, 3)},
    }
    counts = store.column_counts(run_id)
    assert {c: v["done"] for c, v in counts.items()} == {"s": 8, "x": 4, "y": 3, "t": 0}  # rg 1 has s only
    assert all(v["failed"] == 0 for v in counts.values())
    assert store.reopen_failed(run_id, LINEAGE, read_file=read_file).tasks == {}


def test_reopen_failed_fences_off_a_worker_holding_the_row_group(stores):
    holder, retrier = stores
    run_id = f"r-{uuid.uuid4().hex[:8]}"
    holder.create_run(NewRun(run_id, "t", 4, 4, 0, "{}", "fp", COLUMNS))
    holder.claim_row_groups(run_id, 1, 60)
    holder.record(run_id, [done_event(0, "s", None, "from_scratch", {"s": [1, 2, 3, 4]}),
                           TaskEvent(FAILED, 0, "x", 2, "cell", attempts=3, error="TimeoutError: slow"), Dropped(0, 2),
                           done_event(0, "t", None, "batch", {"t": [5, 6, None, 8]})])  # t ran without record 2
    got = retrier.reopen_failed(run_id, LINEAGE, error="slow", read_file=lambda path: pytest.fail("no file"))
    assert (got.tasks, got.records, got.reset) == ({"x": 1}, 1, 1)
    assert holder.record(run_id, [done_event(0, "x", 0, "cell", "late")]) == {0}  # the holder lost it
    claim = retrier.claim_row_groups(run_id, 1, 60)
    assert [(c.row_group, c.state) for c in claim] == [(0, "active")]
    loaded = retrier.load_row_group(run_id, 0)
    assert loaded.dropped == set() and set(loaded.done) == {("s", None)}


def test_reopen_failed_of_an_unknown_run_raises(any_store):
    with pytest.raises(RunNotFoundError):
        any_store.reopen_failed("nope", LINEAGE, read_file=dict)


def test_checkpoint_keeps_dropped_records_cells_only_in_row_groups_with_drops(any_store):
    store, run_id = any_store, f"r-{uuid.uuid4().hex[:8]}"
    finished_run(store, run_id)
    store.record(run_id, [*[done_event(1, "x", r, "cell", r) for r in range(4)], Completed(1)])
    assert store.checkpoint_row_group(run_id, 1, "rg-1.parquet", 0)
    assert store.load_row_group(run_id, 1).done == {}
    loaded = store.load_row_group(run_id, 0)
    assert loaded.dropped == {1} and loaded.attempts == {("y", 1): 1}
    assert set(loaded.done) == {("s", None), ("t", None), ("x", 1)}
    assert {c: v["done"] for c, v in store.column_counts(run_id).items()} == {"s": 7, "x": 7, "y": 7, "t": 7}


def test_reopen_failed_works_on_row_groups_compacted_before_retry_existed(db_url):
    """Older stores deleted every done row and the dropped_records at checkpoint: the dropped
    records come from the failed rows; the file lacks the batch values of the records that come
    back, so the row group's batch tasks and all that reads them are computed again. (Only a
    database outlives a version; the older rows are made with SQL.)"""
    store, run_id = open_store(db_url), f"r-{uuid.uuid4().hex[:8]}"
    file_columns = finished_run(store, run_id)
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM tasks WHERE run_id = '{run_id}' AND row_group = 0 AND state = 'done'")
        conn.exec_driver_sql(f"DELETE FROM dropped_records WHERE run_id = '{run_id}'")
    got = store.reopen_failed(run_id, LINEAGE, read_file=lambda path: file_columns)
    assert (got.tasks, got.records, got.reset) == ({"y": 1}, 1, 0)
    loaded = store.load_row_group(run_id, 0)
    assert loaded.dropped == set() and loaded.done == {}
    assert store.row_groups(run_id)[0]["state"] == "active"
    bad = {**file_columns, "x": ["x0"]}
    store.record(run_id, [])  # a file that does not match the store is refused, nothing changed
    with pytest.raises(StoreError, match="holds 1 values of column 'x'"):
        finished = f"r-{uuid.uuid4().hex[:8]}"
        finished_run(store, finished)
        store.reopen_failed(finished, LINEAGE, read_file=lambda path: bad)
    assert store.load_row_group(finished, 0).dropped == {1}
    store.close()
