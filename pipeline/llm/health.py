"""Per-model health: a circuit breaker that pauses a model's columns while its endpoint is down.

CONTRACT section 9: an endpoint that goes down pauses its columns, it does not drain them. The
engine reports the outcome of every model-limited task to :meth:`ModelHealth.record`:

- ``ANSWERED``: the endpoint answered (a value, or an answer the cell could not use: 4xx,
  malformed JSON). Evidence that it is up.
- ``RATE_LIMITED``: HTTP 429. It is up but refusing; never an attempt (the engine waits).
- ``OUTAGE``: connection refused or broken, timeout, 5xx (:func:`pipeline.errors.is_outage`).

``TRIP_AFTER`` outages in a row with no answer in between trip the breaker: :attr:`down`
becomes true, the model's :class:`~pipeline.llm.throttle.AdaptiveLimit` hands out no permits,
and a probe (one cheap request of its own, a one-token chat completion, not a task) runs after
1 s, then 2, 4, ... up to 15 s apart, until the endpoint answers; then the limit opens again.

One prompt that always gets a 500 while the rest succeed is not an outage: the answers in
between keep the streak short, and the engine counts that task's failures as attempts because
:attr:`answers` grew since its previous try (see ``pipeline.engine.outcomes``).

:attr:`failing_since` (monotonic seconds) is when the model last stopped answering: the first
outage or 429 after its last answer. The engine stops the run when it is older than
``settings.model_down_s`` while the model still has work (a model answering nothing but 429s
counts as down too).

Call everything from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

__all__ = ["ANSWERED", "ModelHealth", "OUTAGE", "RATE_LIMITED"]

log = logging.getLogger("pipeline.llm.health")

ANSWERED = "answered"
RATE_LIMITED = "rate_limited"
OUTAGE = "outage"


class ModelHealth:
    """Up or down, from the outcomes of a model's calls; probes the endpoint while down.

    ``probe`` is an async callable returning one of the three outcomes; ``on_up`` (set by the
    owner) is called when the endpoint answers again.
    """

    TRIP_AFTER = 3
    PROBE_MIN_S = 1.0
    PROBE_MAX_S = 15.0
    #: An unconfirmed failure asks for a probe at most this often (seconds).
    SUSPECT_EVERY_S = 1.0

    def __init__(self, where: str, probe: Callable[[], Awaitable[str]] | None = None) -> None:
        self.where = where
        self.down = False
        #: Answers seen (tasks and probes): a task's failure is its own fault only if this grew
        #: since its previous attempt.
        self.answers = 0
        self.streak = 0
        self.failing_since: float | None = None
        self.down_since: float | None = None
        self.last_error: str | None = None
        self.trips = 0
        self.on_up: Callable[[], None] | None = None
        self._probe = probe
        self._probe_task: asyncio.Task | None = None
        self._last_probe = -1e18

    def __repr__(self) -> str:
        return f"ModelHealth({self.where!r}, down={self.down}, streak={self.streak})"

    def record(self, outcome: str, error: str | None = None) -> None:
        """The outcome of one call (``ANSWERED``, ``RATE_LIMITED`` or ``OUTAGE``)."""
        if outcome == ANSWERED:
            self.answers += 1
            self.streak = 0
            self.failing_since = None
            if self.down:
                self._up()
            return
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        if outcome == OUTAGE:
            self.streak += 1
            if error is not None:
                self.last_error = error
            if not self.down and self.streak >= self.TRIP_AFTER:
                self._trip()
        elif self.down:  # a 429: it answers, so it is up (the 429 rules take over)
            self._up()

    def suspect(self) -> None:
        """A call failed with no answer since: ask the endpoint directly (at most once a second),
        so that a lone failing task is told from an outage without waiting for a streak."""
        if self.down or self._probe is None or self._probe_task is not None:
            return
        now = time.monotonic()
        if now - self._last_probe < self.SUSPECT_EVERY_S:
            return
        self._last_probe = now
        self._probe_task = asyncio.get_running_loop().create_task(self._probe_once())

    def close(self) -> None:
        """Stop probing (end of the run)."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            self._probe_task = None

    # -- internals ------------------------------------------------------------------------
    def _trip(self) -> None:
        self.down = True
        self.trips += 1
        self.down_since = time.monotonic()
        log.warning("%s is not answering (%d failures in a row, last: %s); its columns wait, "
                    "no attempt is spent, and it is probed until it answers",
                    self.where, self.streak, self.last_error)
        if self._probe is not None:
            if self._probe_task is not None:
                self._probe_task.cancel()
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    def _up(self) -> None:
        was_down_s = time.monotonic() - (self.down_since or time.monotonic())
        self.down = False
        self.down_since = None
        self.streak = 0
        log.warning("%s answers again after %.0f s; its columns go on", self.where, was_down_s)
        if self.on_up is not None:
            self.on_up()

    async def _probe_once(self) -> None:
        try:
            outcome = await self._probe()
        finally:
            self._probe_task = None
        self.record(outcome)

    async def _probe_loop(self) -> None:
        delay = self.PROBE_MIN_S
        while self.down:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.PROBE_MAX_S)
            self._last_probe = time.monotonic()
            outcome = await self._probe()
            if self.down:
                self.record(outcome)
        self._probe_task = None
