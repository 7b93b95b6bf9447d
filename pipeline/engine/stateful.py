"""The lanes of stateful generators: one task at a time per generator, row groups in order,
also across workers.

A row group's task waits until every earlier row group has finished the generator: in this
process (its tracker says so) or in another worker's (the store's ``row_groups`` table says
``complete`` or ``checkpointed``; it is read again every ``poll_s`` while that is what holds the
generator up). A generator stays busy while one of its tasks is deferred for a retry.

A generator that implements ``state_dict()`` has its state recorded with each of its DONE events
(:meth:`StatefulLanes.with_state`: one ``StateSaved`` event wrapping the DONE, so both are in one
commit) and restored before its first task of a row group in a process whose in-memory state is
not the one of the row group before (:meth:`StatefulLanes.enter`: a resume, or other workers ran
the row groups in between); the latest states come with the lanes' look at the store.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from typing import Any, Callable, Iterable

from pipeline import values
from pipeline.states import RowGroupState
from pipeline.store.events import StateSaved, TaskEvent

__all__ = ["StatefulLanes"]

log = logging.getLogger("pipeline.scheduler")

_FINISHED = (RowGroupState.COMPLETE, RowGroupState.CHECKPOINTED)  # every task of the row group ended


class StatefulLanes:
    def __init__(self, nodes: Iterable[Any], *, look: Callable[[], asyncio.Future],
                 on_news: Callable[[], None], poll_s: float) -> None:
        nodes = list(nodes)
        self._heaps: dict[int, list] = {n.index: [] for n in nodes}
        #: Generators (plan indexes) that implement state_dict().
        self.keeps_state = frozenset(n.index for n in nodes if getattr(n.gen, "keeps_state", False))
        self._at: dict[int, int] = {}  # generator -> row group its in-memory state is at
        self._busy: set[int] = set()
        # Row groups below this one have finished the generator (here or elsewhere).
        self._floor: dict[int, int] = {j: 0 for j in self._heaps}
        # Row groups known finished: here, or by other workers as the store last said.
        self._finished: set[int] = set()
        self._look, self._on_news, self._poll_s = look, on_news, poll_s
        self._poll: Any = None  # a pending look at the store (timer or future)
        self._closed = False
        #: ``{generator name: (row group, state)}`` from the last look at the store; None until
        #: the first look, which generators that keep state wait for.
        self.states: dict | None = None if self.keeps_state else {}

    def push(self, j: int, rg: Any, r: int | None) -> None:
        heapq.heappush(self._heaps[j], (rg.id, -1 if r is None else r, rg, r))

    def release(self, j: int) -> None:
        """Generator ``j``'s running task is over (done, or failed for good, or due again)."""
        self._busy.discard(j)

    def finished(self, rg_id: int) -> None:
        self._finished.add(rg_id)

    def take(self, live: dict[int, Any]) -> Iterable[tuple[int, Any, int | None]]:
        """``(generator, row group, row)`` of every generator that may start its next task;
        each is marked busy as it is yielded (the caller stops when it runs out of slots)."""
        if self.states is None:  # the recorded states are not known yet: look first
            self._poll_store()
            return
        for j, heap in self._heaps.items():
            if j in self._busy:
                continue
            while heap and (heap[0][2].dead or (heap[0][3] is not None and heap[0][2].tracker.dropped[heap[0][3]])):
                heapq.heappop(heap)
            if heap and self._earlier_finished(j, heap[0][0], live):
                _, _, rg, r = heapq.heappop(heap)
                self._busy.add(j)
                yield j, rg, r

    def with_state(self, rg_id: int, node: Any, event: TaskEvent) -> StateSaved | TaskEvent:
        """The DONE ``event`` of a generator that keeps state, wrapped with its state_dict()
        after the task, so that the two are recorded in one transaction."""
        try:
            state = values.encode(node.gen.state_dict())
        except Exception as exc:  # the state cannot be stored: resume will restart it, say so
            log.warning("%s: state_dict() gave a value that cannot be stored (%s: %s); its state will "
                        "restart on resume", node.name, type(exc).__name__, exc)
            return event
        return StateSaved(rg_id, node.name, state, event)

    def enter(self, node: Any, rg_id: int) -> None:
        """Before each task of stateful ``node`` in row group ``rg_id``: at its first there in
        this process, unless its state is the one of the row group before, load the latest
        recorded state (raises what load_state_dict() raises)."""
        at = self._at.get(node.index)
        if at == rg_id:
            return
        self._at[node.index] = rg_id
        if at == rg_id - 1:
            return
        if node.index in self.keeps_state:
            recorded = self.states.get(node.name)
            if recorded is not None:
                node.gen.load_state_dict(recorded[1])
        elif rg_id > 0:
            log.warning("%s is stateful and does not implement state_dict()/load_state_dict(): its state "
                        "restarts here, at row group %d (earlier row groups ran in another process or "
                        "session)", node.name, rg_id)

    def lost(self, rg_id: int) -> None:
        """The lease on ``rg_id`` went to another worker: a generator's state there went on
        elsewhere, so its next row group loads the recorded one."""
        for j, at in list(self._at.items()):
            if at == rg_id:
                del self._at[j]

    def close(self) -> None:
        self._closed = True
        if isinstance(self._poll, asyncio.TimerHandle):
            self._poll.cancel()

    def _earlier_finished(self, j: int, rg_id: int, live: dict[int, Any]) -> bool:
        k = self._floor[j]
        while k < rg_id:
            o = live.get(k)
            if o is not None and not o.dead:
                if o.tracker.left[j] > 0:
                    break  # ours: its own completions pump again
            elif k not in self._finished:
                self._poll_store()
                break
            k += 1
        self._floor[j] = k
        return k >= rg_id

    def _poll_store(self) -> None:
        if self._poll is not None or self._closed:
            return

        def look() -> None:
            self._poll = fut = self._look()
            fut.add_done_callback(self._seen)

        # The first look at once (a resume: row groups of earlier sessions), later ones spaced.
        delay = min(self._poll_s, 0.1) if self._finished else 0.0
        self._poll = asyncio.get_running_loop().call_later(delay, look)

    def _seen(self, fut: asyncio.Future) -> None:
        self._poll = None
        if fut.cancelled() or fut.exception() is not None:
            return  # the next pump looks again
        groups, self.states = fut.result()
        self._finished.update(g["row_group"] for g in groups if g["state"] in _FINISHED)
        self._on_news()
