"""Deferred tasks waiting out their backoff: a heap ordered by due time and one event-loop timer,
armed for the earliest. Pushing is O(log n); the timer fires once per due time, not once per task.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any, Callable

__all__ = ["RetryTimers"]


class RetryTimers:
    """``push(due, item)`` with ``due`` in event-loop time (``loop.time()``); when the earliest
    is due, ``on_due()`` runs on the loop and takes the due items with :meth:`pop_due`."""

    def __init__(self, on_due: Callable[[], None]) -> None:
        self._on_due = on_due
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()  # ties keep their order (items need not compare)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0  # (uvloop's handles have no when())
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the engine starts

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, item: Any) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), item))
        if self._timer is None or self._timer_due > due:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(due)

    def pop_due(self) -> list[Any]:
        """The items due now, earliest first; the timer is armed again for the next one."""
        self._timer = None
        heap, now, due = self._heap, self.loop.time(), []
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap)[2])
        if heap:
            self._arm(heap[0][0])
        return due

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, due: float) -> None:
        self._timer, self._timer_due = self.loop.call_at(due, self._on_due), due
