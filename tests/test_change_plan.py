"""The planning of a changed config in one row group (pure): which rows go, which records come
back, what a checkpointed row group gets from its file, and the counts `--plan` prints."""

from __future__ import annotations

import pytest

from pipeline.errors import StoreError
from pipeline.store.base import Lineage
from pipeline.store.change_plan import ChangeResult, ConfigChange, GroupFacts, fill_values, plan_edit

# s (sampler, from_scratch) -> a (cell) -> b (cell); s -> t (batch) -> c (cell)
LINEAGE = Lineage(
    outputs={"s": ("s",), "a": ("a",), "b": ("b",), "t": ("t",), "c": ("c",)},
    task_types={"s": "from_scratch", "a": "cell", "b": "cell", "t": "batch", "c": "cell"},
    upstream={"s": frozenset(), "a": frozenset({"s"}), "b": frozenset({"s", "a"}), "t": frozenset({"s"}),
              "c": frozenset({"s", "t"})},
    downstream={"s": frozenset({"a", "b", "t", "c"}), "a": frozenset({"b"}), "b": frozenset(), "t": frozenset({"c"}),
                "c": frozenset()},
)


def change(recompute=(), removed=(), added=(), num_records=4) -> ConfigChange:
    return ConfigChange(num_records=num_records, row_group_size=4, config="{}", fingerprint="f", columns=(),
                        fingerprints=(), lineage=LINEAGE, recompute=frozenset(recompute),
                        removed=frozenset(removed), per_record=frozenset({"s"}), added=frozenset(added))


def live(n=4, **kw) -> GroupFacts:
    done = {("s", None), ("t", None)} | {(g, r) for g in ("a", "b", "c") for r in range(n)}
    return GroupFacts(0, n, "active", None, done=done, batch_values={"s": {"s": list(range(n))},
                                                                      "t": {"t": list(range(n))}}, **kw)


def test_a_changed_column_and_its_readers_go_and_the_rest_is_kept():
    result = ChangeResult()
    edit = plan_edit(live(), change(recompute={"a", "b"}), 4, result)
    assert sorted(edit.change.reset) == [(g, r) for g in ("a", "b") for r in range(4)]
    assert result.keep == {"s": 4, "a": 0, "b": 0, "t": 4, "c": 4}
    assert result.compute == {"s": 0, "a": 4, "b": 4, "t": 0, "c": 0}
    assert result.discarded["a"] == 4 and result.discarded["c"] == 0


def test_a_failure_of_a_changed_column_brings_its_record_back_and_a_batch_that_missed_it_runs_again():
    facts = live()
    facts.done -= {("b", 2)}  # b of record 2 never ran: a failed first
    facts.failed = {("a", 2): "boom"}
    facts.dropped = {2}
    facts.batch_values["t"] = {"t": [0, 1, None, 3]}  # t ran without record 2 (it does not read a)
    result = ChangeResult()
    edit = plan_edit(facts, change(recompute={"a", "b"}), 4, result)
    assert edit.change.reopen == [("a", 2)] and edit.change.revived == {2} and edit.change.dropped == set()
    # t holds no value for record 2 and is not upstream of the failure: it ran without it, so it
    # and its reader c run again; s (upstream of a) saw the record and stays
    assert ("t", None) in edit.change.reset and ("c", 0) in edit.change.reset
    assert ("s", None) not in edit.change.reset
    assert result.records_revived == 1 and result.compute["t"] == 4 and result.keep["s"] == 4

    facts.batch_values["t"] = {"t": [0, 1, 2, 3]}  # t holds a value for record 2: it saw it
    edit = plan_edit(facts, change(recompute={"a", "b"}), 4, ChangeResult())
    assert ("t", None) not in edit.change.reset and ("c", 0) not in edit.change.reset


def test_a_failure_that_stays_keeps_its_record_dropped_and_out_of_the_counts():
    facts = live()
    facts.failed = {("c", 1): "boom"}
    facts.dropped = {1}
    result = ChangeResult()
    plan_edit(facts, change(recompute={"a", "b"}), 4, result)
    assert result.compute["a"] == 3 and result.keep["c"] == 3  # record 1 counts nowhere


def test_a_grown_row_group_recomputes_its_batches_and_what_reads_them_but_keeps_cells():
    facts = live(n=2)
    result = ChangeResult()
    edit = plan_edit(facts, change(num_records=4), 4, result)
    assert ("s", None) in edit.change.reset and ("t", None) in edit.change.reset
    assert {k for k in edit.change.reset if k[0] == "c"} == {("c", 0), ("c", 1)}  # reads the batch t
    assert not any(k[0] in ("a", "b") for k in edit.change.reset)  # s is per record: its readers stay
    assert result.keep["s"] == 2 and result.keep["a"] == 2 and result.compute["a"] == 2
    assert result.keep["t"] == 0 and result.compute["t"] == 4


def test_a_shrunk_row_group_drops_rows_past_its_end():
    facts = live(n=4)
    facts.failed = {("a", 3): "boom"}
    facts.dropped = {3}
    result = ChangeResult()
    edit = plan_edit(facts, change(num_records=2), 2, result)
    assert ("a", 3) in edit.change.reopen and edit.change.dropped == set() and edit.change.revived == set()
    assert all(r is None or r < 2 or k in ("a", "b", "c") for k, r in edit.change.reset)
    assert ("b", 3) in edit.change.reset and ("b", 1) not in edit.change.reset
    assert result.keep["a"] == 2 and result.compute["a"] == 0


def test_a_touched_checkpointed_row_group_is_filled_from_its_file():
    facts = GroupFacts(0, 4, "checkpointed", "rg.parquet", dropped={1}, failed={("b", 1): "x"})
    facts.done = {("a", 1), ("s", None), ("t", None)}  # kept at compaction: a dropped record's cells, batches
    facts.batch_values = {"s": {"s": [0, 1, 2, 3]}, "t": {"t": [0, None, 2, 3]}}
    result = ChangeResult()
    edit = plan_edit(facts, change(recompute={"c"}), 4, result)
    assert edit.file_rows == [0, 2, 3] and edit.fill_cells == {"a": [0, 2, 3], "b": [0, 2, 3]}
    assert edit.fill_batch == []
    file = {"s": [0, 2, 3], "a": ["a0", "a2", "a3"], "b": ["b0", "b2", "b3"], "t": [0, 2, 3], "c": [9, 9, 9]}
    fill_values(edit, LINEAGE, lambda path: file, "rg.parquet")
    assert edit.change.insert[("a", 2)] == ("cell", "a2") and ("c", 0) not in edit.change.insert
    assert result.keep == {"s": 3, "a": 3, "b": 3, "t": 3, "c": 0}
    with pytest.raises(StoreError, match="cannot be reopened"):
        fill_values(edit, LINEAGE, lambda path: {**file, "a": ["a0"]}, "rg.parquet")


def test_an_untouched_checkpointed_row_group_stays_and_counts_as_kept():
    facts = GroupFacts(0, 4, "checkpointed", "rg.parquet")
    result = ChangeResult()
    assert plan_edit(facts, change(), 4, result) is None
    assert result.keep == {g: 4 for g in LINEAGE.task_types} and result.row_groups == []
