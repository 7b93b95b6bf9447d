"""The column DAG.

Nodes are generators (config entries); each produces one or more output columns. An edge
``a -> b`` means ``b`` reads a column that ``a`` produces. Every column a generator declares
(including side-effect outputs) resolves to its producer, so a downstream reference to any of
them is an edge from that one generator: one task per generator instance, all of its outputs
complete together.

Everything here is pure and deterministic: the topological order is Kahn's algorithm with ties
broken by config position, never by hash order.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable

from pipeline.errors import ConfigError
from pipeline.states import TaskType

__all__ = ["ColumnGraph", "Node", "build_graph", "task_count"]

# A node's strategy ("cell" | "batch") and task type, as plain strings: ``task_type`` goes into
# every task event, which the journal binds as it is (a driver binds a str subclass more slowly).
FROM_SCRATCH, CELL, BATCH = TaskType.FROM_SCRATCH.value, TaskType.CELL.value, TaskType.BATCH.value


@dataclass(frozen=True)
class Node:
    """One generator: its name, outputs and how its tasks are cut."""

    name: str
    type: str
    outputs: tuple[str, ...]
    strategy: str  # "cell" | "batch"
    stateful: bool
    upstream: tuple[str, ...]  # generator names, in topological order
    depends_on: tuple[str, ...]  # column names read, sorted
    position: int  # in the config

    @property
    def is_root(self) -> bool:
        return not self.upstream

    @property
    def task_type(self) -> str:
        """``from_scratch`` for a root batch generator, else its strategy."""
        if self.strategy == BATCH:
            return FROM_SCRATCH if self.is_root else BATCH
        return CELL


def task_count(strategy: str, num_records: int, row_group_size: int) -> int:
    """Tasks of a generator: one per record (cell) or one per row group (batch)."""
    if row_group_size <= 0:
        raise ValueError(f"row_group_size must be > 0, got {row_group_size}")
    if strategy == CELL:
        return num_records
    return math.ceil(num_records / row_group_size)


class ColumnGraph:
    """The generators of a config in a deterministic topological order."""

    def __init__(self, nodes: Iterable[Node], columns: Iterable[str]):
        self.nodes: tuple[Node, ...] = tuple(nodes)
        self.columns: tuple[str, ...] = tuple(columns)  # output columns, config order
        self.by_name: dict[str, Node] = {n.name: n for n in self.nodes}
        self.producer: dict[str, str] = {c: n.name for n in self.nodes for c in n.outputs}
        down: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for up in n.upstream:
                down[up].append(n.name)
        self.downstream: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in down.items()}

    @property
    def order(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def roots(self) -> list[str]:
        return [n.name for n in self.nodes if n.is_root]

    def split_upstream(self, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(batch upstreams, cell upstreams) of a generator."""
        ups = self.by_name[name].upstream
        return (
            tuple(u for u in ups if self.by_name[u].strategy == BATCH),
            tuple(u for u in ups if self.by_name[u].strategy == CELL),
        )

    def longest_chain(self) -> list[str]:
        """One longest path of generators (the critical path); ties go to the earliest node."""
        best: dict[str, list[str]] = {}
        for n in self.nodes:
            prev = max((best[u] for u in n.upstream), key=len, default=[])
            best[n.name] = prev + [n.name]
        return max(best.values(), key=len, default=[])

    # -- output ---------------------------------------------------------------------------
    def describe(self, num_records: int, row_group_size: int) -> list[dict[str, Any]]:
        """One entry per output column, in config order (``graph --format json``)."""
        out = []
        for col in self.columns:
            node = self.by_name[self.producer[col]]
            out.append({
                "name": col,
                "generator": node.name,
                "type": node.type,
                "strategy": node.strategy,
                "task_type": node.task_type,
                "depends_on": list(node.depends_on),
                "tasks": task_count(node.strategy, num_records, row_group_size),
                "stateful": node.stateful,
            })
        return out

    def to_json(self, num_records: int, row_group_size: int) -> str:
        return json.dumps({"columns": self.describe(num_records, row_group_size),
                           "order": self.order, "critical_path": self.longest_chain()}, indent=2)

    def to_mermaid(self) -> str:
        lines = ["graph TD"]
        for n in sorted(self.nodes, key=lambda n: n.position):
            label = ", ".join(n.outputs) if n.outputs != (n.name,) else n.name
            lines.append(f'    {n.name}["{label} [{n.task_type}]"]')
        for n in sorted(self.nodes, key=lambda n: n.position):
            for up in sorted(n.upstream):
                lines.append(f"    {up} --> {n.name}")
        return "\n".join(lines)

    def to_text(self, num_records: int, row_group_size: int) -> str:
        rows = self.describe(num_records, row_group_size)
        width = max(len(r["name"]) for r in rows)
        lines = [f"{'column':<{width}}  {'type':<14} {'tasks':<12} {'count':>9}  depends on"]
        for r in rows:
            deps = ", ".join(r["depends_on"]) or "-"
            kind = r["task_type"] + (" stateful" if r["stateful"] else "")
            lines.append(f"{r['name']:<{width}}  {r['type']:<14} {kind:<12} {r['tasks']:>9}  {deps}")
        lines.append(f"order: {' -> '.join(self.order)}")
        return "\n".join(lines)


def build_graph(config: Any) -> ColumnGraph:
    """Build and check the DAG of ``config.columns``; raise ConfigError naming the column for an
    unknown dependency and naming every column of a cycle."""
    source = getattr(config, "source", None)
    entries = list(config.columns)
    producer: dict[str, str] = {}
    for e in entries:
        for col in e.outputs:
            if col in producer:
                raise ConfigError(f"the column name '{col}' is used twice; give each column its own name",
                                  path=source, column=e.name)
            producer[col] = e.name
    position = {e.name: i for i, e in enumerate(entries)}
    ups: dict[str, set[str]] = {}
    deps: dict[str, tuple[str, ...]] = {}
    for e in entries:
        found = set()
        for dep in e.dependencies:
            if dep not in producer:
                known = ", ".join(sorted(producer))
                raise ConfigError(f"depends on '{dep}', which no column produces (columns: {known}); "
                                  f"fix the name or add a column '{dep}'", path=source, column=e.name)
            if producer[dep] == e.name:  # a cycle of one: its value would have to exist first
                raise ConfigError(f"dependency cycle: {e.name} -> {e.name} (it reads its own output "
                                  f"'{dep}'); remove that reference", path=source, column=e.name)
            found.add(producer[dep])
        ups[e.name] = found
        deps[e.name] = tuple(sorted(e.dependencies))
    order = _topological(entries, ups, position, source)
    rank = {name: i for i, name in enumerate(order)}
    by_name = {e.name: e for e in entries}
    nodes = []
    for name in order:
        e = by_name[name]
        nodes.append(Node(
            name=name, type=e.type, outputs=tuple(e.outputs), strategy=e.strategy,
            stateful=bool(e.stateful), upstream=tuple(sorted(ups[name], key=rank.__getitem__)),
            depends_on=deps[name], position=position[name],
        ))
    columns = [c for e in entries for c in e.outputs]
    return ColumnGraph(nodes, columns)


def _topological(entries, ups, position, source) -> list[str]:
    indegree = {e.name: len(ups[e.name]) for e in entries}
    down: dict[str, list[str]] = {e.name: [] for e in entries}
    for name, us in ups.items():
        for u in us:
            down[u].append(name)
    heap = [(position[n], n) for n, d in indegree.items() if d == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, n = heapq.heappop(heap)
        order.append(n)
        for m in down[n]:
            indegree[m] -= 1
            if indegree[m] == 0:
                heapq.heappush(heap, (position[m], m))
    if len(order) < len(entries):
        cycle = _find_cycle({n for n, d in indegree.items() if d > 0}, ups, position)
        raise ConfigError(f"dependency cycle: {' -> '.join(cycle)}; break it by removing one of "
                          f"these references", path=source, column=cycle[0])
    return order


def _find_cycle(remaining: set[str], ups: dict[str, set[str]], position) -> list[str]:
    """Walk upstream edges inside the unresolved set until a node repeats."""
    start = min(remaining, key=position.__getitem__)
    path, seen = [start], {start: 0}
    node = start
    while True:
        node = min((u for u in ups[node] if u in remaining), key=position.__getitem__)
        if node in seen:
            cyc = path[seen[node]:]
            cyc.reverse()  # upstream walk -> data-flow order
            return cyc + [cyc[0]]
        seen[node] = len(path)
        path.append(node)
