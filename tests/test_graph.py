"""The column DAG: order, cycles, strategies, task counts, output formats."""

import json
from types import SimpleNamespace

import pytest

from pipeline.errors import ConfigError
from pipeline.graph import build_graph, task_count
from tests.engine_helpers import spec


def graph(*specs):
    return build_graph(SimpleNamespace(columns=list(specs), source="cfg.yaml"))


def test_topological_order_puts_upstreams_first_and_ties_in_config_order():
    g = graph(spec("q", deps=["b", "a"]), spec("b", deps=["z"]), spec("a"), spec("z"))
    assert g.order == ["a", "z", "b", "q"]
    assert g.roots == ["a", "z"]


def test_a_column_may_read_one_defined_later():
    g = graph(spec("late_reader", deps=["later"]), spec("later"))
    assert g.by_name["late_reader"].upstream == ("later",)


def test_cycle_is_refused_naming_its_columns():
    with pytest.raises(ConfigError) as err:
        graph(spec("a", deps=["c"]), spec("b", deps=["a"]), spec("c", deps=["b"]), spec("ok"))
    msg = str(err.value)
    assert "cycle" in msg and "cfg.yaml" in msg
    assert all(name in msg for name in ("a", "b", "c")) and "ok" not in msg.split("cycle")[1]


def test_unknown_dependency_names_the_column_and_the_missing_name():
    with pytest.raises(ConfigError, match=r"column 'b'.*'nope'"):
        graph(spec("a"), spec("b", deps=["nope"]))


def test_a_column_that_reads_itself_is_a_cycle_of_one():
    with pytest.raises(ConfigError, match=r"dependency cycle: a -> a") as info:
        graph(spec("z"), spec("a", deps=["z", "a"]))
    assert info.value.column == "a"


def test_every_declared_output_resolves_to_its_producer():
    g = graph(spec("gen", outputs=("x", "x__trace")), spec("r", deps=["x__trace"]))
    assert g.producer["x__trace"] == "gen" and g.by_name["r"].upstream == ("gen",)


def test_duplicate_output_names_are_refused():
    with pytest.raises(ConfigError, match="twice"):
        graph(spec("a", outputs=("x",)), spec("b", outputs=("x",)))


def test_upstream_split_by_strategy_and_task_types():
    g = graph(spec("s", "batch"), spec("c", deps=["s"]), spec("agg", "batch", deps=["c", "s"]))
    assert g.split_upstream("agg") == (("s",), ("c",))
    assert [g.by_name[n].task_type for n in ("s", "c", "agg")] == ["from_scratch", "cell", "batch"]


def test_task_counts():
    assert task_count("cell", 25, 10) == 25
    assert task_count("batch", 25, 10) == 3
    assert task_count("batch", 0, 10) == 0
    with pytest.raises(ValueError):
        task_count("batch", 5, 0)


def test_json_and_mermaid_output():
    g = graph(spec("s", "batch"), spec("c", deps=["s"]))
    data = json.loads(g.to_json(10, 4))
    assert data["columns"][1] == {"name": "c", "generator": "c", "type": "python", "strategy": "cell",
                                  "task_type": "cell", "depends_on": ["s"], "tasks": 10, "stateful": False}
    assert data["columns"][0]["tasks"] == 3
    assert g.to_mermaid().splitlines() == ["graph TD", '    s["s [from_scratch]"]', '    c["c [cell]"]', "    s --> c"]


def test_longest_chain_is_the_critical_path():
    g = graph(spec("a"), spec("b", deps=["a"]), spec("c", deps=["b"]), spec("d", deps=["a"]))
    assert g.longest_chain() == ["a", "b", "c"]
