"""The completion tracker: readiness by counters, drops, completeness."""

from types import SimpleNamespace

from pipeline.engine.tracker import Plan, RowGroupTracker
from pipeline.graph import build_graph
from tests.engine_helpers import spec


def tracker(specs, n):
    plan = Plan(build_graph(SimpleNamespace(columns=specs, source=None)))
    return plan, RowGroupTracker(plan, n)


def names(plan, out):
    return sorted((plan.nodes[j].name, r) for j, r in out)


def test_fresh_row_group_offers_only_root_tasks():
    plan, t = tracker([spec("seed", "batch"), spec("root_cell"), spec("q", deps=["seed"])], 3)
    out = []
    t.initial(out)
    assert names(plan, out) == [("root_cell", 0), ("root_cell", 1), ("root_cell", 2), ("seed", None)]


def test_batch_completion_readies_every_cell_of_its_downstream():
    plan, t = tracker([spec("seed", "batch"), spec("q", deps=["seed"])], 3)
    out = []
    t.complete_batch(plan.index["seed"], out)
    assert names(plan, out) == [("q", 0), ("q", 1), ("q", 2)]


def test_cell_needs_all_its_cell_upstreams_at_that_record():
    plan, t = tracker([spec("a"), spec("b"), spec("c", deps=["a", "b"])], 2)
    out = []
    t.complete_cell(plan.index["a"], 0, out)
    assert out == []
    t.complete_cell(plan.index["b"], 0, out)
    assert names(plan, out) == [("c", 0)]


def test_batch_column_waits_for_all_cells_and_is_offered_once():
    plan, t = tracker([spec("a"), spec("agg", "batch", deps=["a"])], 3)
    out = []
    for r in range(2):
        t.complete_cell(plan.index["a"], r, out)
    assert out == []
    t.complete_cell(plan.index["a"], 2, out)
    assert names(plan, out) == [("agg", None)]
    out.clear()
    t.complete_cell(plan.index["a"], 2, out)  # a late duplicate event re-offers nothing
    assert out == []


def test_dropping_the_last_incomplete_record_unblocks_a_batch_downstream():
    plan, t = tracker([spec("a"), spec("agg", "batch", deps=["a"])], 3)
    out = []
    t.complete_cell(plan.index["a"], 0, out)
    t.complete_cell(plan.index["a"], 1, out)
    t.drop_record(2, out)
    assert names(plan, out) == [("agg", None)]
    assert t.live_rows() == [0, 1]


def test_dropped_record_gets_no_downstream_cell_tasks():
    plan, t = tracker([spec("a"), spec("b", deps=["a"])], 2)
    out = []
    t.drop_record(1, out)
    t.complete_cell(plan.index["a"], 0, out)
    t.complete_cell(plan.index["a"], 1, out)
    assert names(plan, out) == [("b", 0)]


def test_row_group_completes_when_every_live_task_is_terminal():
    plan, t = tracker([spec("a"), spec("agg", "batch", deps=["a"])], 2)
    out = []
    assert t.outstanding == 3
    t.complete_cell(plan.index["a"], 0, out)
    t.drop_record(1, out)
    assert not t.is_complete
    t.complete_batch(plan.index["agg"], out)
    assert t.is_complete


def test_all_records_dropped_completes_without_running_batch_tasks():
    plan, t = tracker([spec("a"), spec("agg", "batch", deps=["a"])], 2)
    out = []
    t.drop_record(0, out)
    t.drop_record(1, out)
    assert t.is_complete and names(plan, out) == []


def test_replay_rebuilds_readiness_from_recorded_results():
    plan, t = tracker([spec("seed", "batch"), spec("a", deps=["seed"]), spec("b", deps=["a"])], 3)
    done = {(plan.index["seed"], None), (plan.index["a"], 0), (plan.index["a"], 1), (plan.index["b"], 0)}
    ready = t.replay(lambda j, r: (j, r) in done, dropped={2})
    assert names(plan, ready) == [("b", 1)]
    assert t.outstanding == 1
