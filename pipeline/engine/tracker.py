"""Readiness of tasks: which work may start, with O(1) amortized work per completion.

The graph is compiled once into a :class:`Plan` (nodes numbered in topological order, with
their downstream split by strategy). Each live row group gets a :class:`RowGroupTracker` that
keeps counters instead of rescanning:

- ``cell_wait[j][r]``: cell upstreams of cell node ``j`` not yet done at record ``r``;
- ``batch_wait[j]``: batch upstreams of node ``j`` not yet done in the row group;
- ``cells_left[j]``: (cell upstream, live record) pairs batch node ``j`` still waits for;
- ``left[j]``: tasks of node ``j`` not yet terminal; ``outstanding``: their sum.

A completion decrements the counters of its direct downstream nodes and appends every task
whose counters reach zero to ``out``; each task is appended exactly once. A dropped record
turns its pending cells terminal ("gone"), which may make batch tasks ready. When a row group
finishes, its tracker is simply discarded: that is the compaction.
"""

from __future__ import annotations

from typing import Any, Callable

from pipeline.graph import CELL, ColumnGraph

__all__ = ["Plan", "PlanNode", "RowGroupTracker"]

PENDING, DONE, GONE = 0, 1, 2


class PlanNode:
    """A generator as the scheduler sees it. Slots keep attribute access fast on the hot path."""

    __slots__ = ("index", "name", "strategy", "task_type", "outputs", "depends_on", "stateful",
                 "is_cell", "is_root", "cell_down", "batch_down", "n_cell_ups", "n_batch_ups",
                 "gen", "is_async", "reads_indexes", "limit", "single", "model", "max_tokens")

    def __init__(self, index: int, node: Any):
        self.index = index
        self.name: str = node.name
        self.strategy: str = node.strategy
        self.task_type: str = node.task_type
        self.outputs: tuple[str, ...] = node.outputs
        self.depends_on: tuple[str, ...] = node.depends_on
        self.stateful: bool = node.stateful
        self.is_cell = node.strategy == CELL
        self.is_root = node.is_root
        self.single = len(node.outputs) == 1
        self.cell_down: tuple[int, ...] = ()
        self.batch_down: tuple[int, ...] = ()
        self.n_cell_ups = 0
        self.n_batch_ups = 0
        self.gen: Any = None
        self.is_async = False
        self.reads_indexes = False  # a batch generator given record indexes, not a DataFrame
        self.limit: Any = None
        self.model: str | None = None  # model alias of a model-limited generator
        self.max_tokens: int | None = None  # what one of its requests reserves (pacing)


class Plan:
    """The graph compiled for scheduling; shared by every row group."""

    def __init__(self, graph: ColumnGraph, generators: dict[str, Any] | None = None):
        self.graph = graph
        self.nodes = [PlanNode(i, n) for i, n in enumerate(graph.nodes)]
        self.index = {n.name: n.index for n in self.nodes}
        for pn, node in zip(self.nodes, graph.nodes):
            down = [self.nodes[self.index[d]] for d in graph.downstream[node.name]]
            pn.cell_down = tuple(d.index for d in down if d.is_cell)
            pn.batch_down = tuple(d.index for d in down if not d.is_cell)
            ups = [self.nodes[self.index[u]] for u in node.upstream]
            pn.n_cell_ups = sum(1 for u in ups if u.is_cell)
            pn.n_batch_ups = len(ups) - pn.n_cell_ups
            if generators is not None:
                gen = generators[node.name]
                pn.gen = gen
                pn.is_async = bool(getattr(gen, "is_async", False))
                pn.reads_indexes = bool(getattr(gen, "reads_indexes", False))
                pn.limit = getattr(gen, "limit", None)
                pn.model = getattr(gen, "model_alias", None) or (node.name if pn.limit is not None else None)
                max_tokens = getattr(gen, "max_tokens", None)
                pn.max_tokens = max_tokens if isinstance(max_tokens, int) else None
        self.columns = graph.columns
        self.stateful = [n for n in self.nodes if n.stateful]


class RowGroupTracker:
    """Completion state of one row group. ``out`` lists receive ``(node_index, row_index)``
    pairs (row_index None for batch tasks) the moment they become ready."""

    __slots__ = ("plan", "n", "cell_state", "cell_wait", "batch_wait", "batch_state",
                 "cells_left", "left", "outstanding", "dropped", "n_dropped")

    def __init__(self, plan: Plan, num_rows: int):
        self.plan = plan
        self.n = n = num_rows
        nodes = plan.nodes
        self.cell_state: list[bytearray | None] = [bytearray(n) if p.is_cell else None for p in nodes]
        self.cell_wait: list[bytearray | None] = [
            bytearray([p.n_cell_ups]) * n if p.is_cell and p.n_cell_ups else None for p in nodes]
        self.batch_wait = [p.n_batch_ups for p in nodes]
        self.batch_state = [PENDING] * len(nodes)
        self.cells_left = [0 if p.is_cell else p.n_cell_ups * n for p in nodes]
        self.left = [n if p.is_cell else 1 for p in nodes]
        self.outstanding = sum(self.left)
        self.dropped = bytearray(n)
        self.n_dropped = 0

    # -- readiness ------------------------------------------------------------------------
    def initial(self, out: list) -> None:
        """Root tasks of a fresh row group (root cell columns interleaved record by record)."""
        self._nodes_ready([p.index for p in self.plan.nodes if p.is_root], out)

    def _node_ready(self, j: int, out: list) -> None:
        """All batch upstreams of ``j`` are done: offer what of ``j`` can run."""
        if self.plan.nodes[j].is_cell:
            wait, state, dropped = self.cell_wait[j], self.cell_state[j], self.dropped
            for r in range(self.n):
                if state[r] == PENDING and not dropped[r] and (wait is None or wait[r] == 0):
                    out.append((j, r))
        elif self.cells_left[j] == 0 and self.batch_state[j] == PENDING:
            out.append((j, None))

    def _nodes_ready(self, nodes: list[int], out: list) -> None:
        """Several nodes opened at once: offer their cells record by record, so that columns
        share the in-flight budget fairly and records complete early."""
        cells = [j for j in nodes if self.plan.nodes[j].is_cell]
        dropped = self.dropped
        for r in range(self.n):
            if dropped[r]:
                continue
            for j in cells:
                wait = self.cell_wait[j]
                if self.cell_state[j][r] == PENDING and (wait is None or wait[r] == 0):
                    out.append((j, r))
        for j in nodes:
            if not self.plan.nodes[j].is_cell:
                self._node_ready(j, out)

    def complete_cell(self, i: int, r: int, out: list) -> None:
        state = self.cell_state[i]
        if state[r] != PENDING:
            return
        state[r] = DONE
        self.left[i] -= 1
        self.outstanding -= 1
        nodes_wait, batch_wait = self.cell_wait, self.batch_wait
        plan_node = self.plan.nodes[i]
        for j in plan_node.cell_down:
            w = nodes_wait[j]
            w[r] -= 1
            if w[r] == 0 and batch_wait[j] == 0 and not self.dropped[r] and self.cell_state[j][r] == PENDING:
                out.append((j, r))
        for j in plan_node.batch_down:
            self.cells_left[j] -= 1
            if self.cells_left[j] == 0 and batch_wait[j] == 0 and self.batch_state[j] == PENDING:
                out.append((j, None))

    def complete_batch(self, i: int, out: list) -> None:
        if self.batch_state[i] != PENDING:
            return
        self.batch_state[i] = DONE
        self.left[i] -= 1
        self.outstanding -= 1
        plan_node = self.plan.nodes[i]
        opened = []
        for j in plan_node.cell_down + plan_node.batch_down:
            self.batch_wait[j] -= 1
            if self.batch_wait[j] == 0:
                opened.append(j)
        if len(opened) > 1:
            self._nodes_ready(opened, out)
        elif opened:
            self._node_ready(opened[0], out)

    def drop_record(self, r: int, out: list) -> bool:
        """Drop record ``r``: its pending cells become terminal. False if it was dropped already."""
        if self.dropped[r]:
            return False
        self.dropped[r] = 1
        self.n_dropped += 1
        if self.n_dropped == self.n:
            self._finish_all()
            return True
        for p in self.plan.nodes:
            state = self.cell_state[p.index]
            if state is None or state[r] != PENDING:
                continue
            state[r] = GONE
            self.left[p.index] -= 1
            self.outstanding -= 1
            for j in p.batch_down:
                self.cells_left[j] -= 1
                if self.cells_left[j] == 0 and self.batch_wait[j] == 0 and self.batch_state[j] == PENDING:
                    out.append((j, None))
        return True

    def drop_all(self) -> list[int]:
        """Drop every record (a batch or from_scratch task failed for good); returns the newly
        dropped row indexes."""
        newly = [r for r in range(self.n) if not self.dropped[r]]
        for r in newly:
            self.dropped[r] = 1
        self.n_dropped = self.n
        self._finish_all()
        return newly

    def _finish_all(self) -> None:
        for p in self.plan.nodes:
            state = self.cell_state[p.index]
            if state is not None:
                for r in range(self.n):
                    if state[r] == PENDING:
                        state[r] = GONE
            elif self.batch_state[p.index] == PENDING:
                self.batch_state[p.index] = GONE
            self.left[p.index] = 0
        self.outstanding = 0

    # -- queries --------------------------------------------------------------------------
    def is_pending(self, i: int, r: int | None) -> bool:
        if r is None:
            return self.batch_state[i] == PENDING
        return self.cell_state[i][r] == PENDING and not self.dropped[r]

    @property
    def is_complete(self) -> bool:
        return self.outstanding == 0

    def live_rows(self) -> list[int]:
        dropped = self.dropped
        return [r for r in range(self.n) if not dropped[r]]

    def replay(self, done: Callable[[int, int | None], bool], dropped: set[int]) -> list:
        """Rebuild state from recorded results (resume): drops first, then every recorded
        completion in topological order. Returns the tasks ready now."""
        out: list = []
        self.initial(out)
        for r in sorted(dropped):
            self.drop_record(r, out)
        for p in self.plan.nodes:
            if p.is_cell:
                for r in range(self.n):
                    if done(p.index, r):
                        self.complete_cell(p.index, r, out)
            elif done(p.index, None):
                self.complete_batch(p.index, out)
        seen = set()
        ready = []
        for task in out:
            if task not in seen and self.is_pending(*task):
                seen.add(task)
                ready.append(task)
        return ready

