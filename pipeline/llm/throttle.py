"""Per-model adaptive concurrency: additive increase, multiplicative decrease (AIMD).

A model endpoint tells us it is overloaded with HTTP 429. The right number of requests to keep
in flight is unknown and changes with the server's load, so it is learned the way TCP learns a
congestion window: every 429 cuts the limit by ``decrease_factor``; a run of successes raises it
by one, never above the configured ``max_parallel_requests``.

Two things make the naive version misbehave, and are handled here:

- A burst. When the server starts refusing, every request already in flight (launched under
  the old, too-high limit) comes back 429 at about the same time. Cutting once per 429 would
  take a limit of 64 to 1 in one burst. So after a cut, further cuts are ignored for one
  *window*: until as many releases have happened as there were requests in flight at the cut
  (or as the new limit, whichever is larger). Only 429s from requests launched under the new
  limit can cut again.
- Recovery speed. ``increase_after`` defaults to the current limit: one step up per window of
  successful requests, like TCP's congestion avoidance. At a small limit this recovers within a
  few round trips; at a large one it probes slowly, where overshooting costs most.

All methods are synchronous and must be called from the event loop's thread; the engine
acquires a permit before it runs an LLM task and releases it when the task ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import AsyncIterator, Callable

from pipeline.errors import ModelRateLimitError

__all__ = ["AdaptiveLimit"]


class AdaptiveLimit:
    """How many requests one model may have in flight now, adapted to its 429s.

    ``limit`` starts at ``max_limit`` and stays within ``[min_limit, max_limit]``.
    ``increase_after`` is the number of consecutive successes per +1 step; ``None`` (the
    default) means "the current limit", i.e. one step per window of successes.
    """

    def __init__(
        self,
        max_limit: int,
        *,
        min_limit: int = 1,
        increase_after: int | None = None,
        decrease_factor: float = 0.5,
    ) -> None:
        if max_limit < 1:
            raise ValueError(f"max_limit must be >= 1, got {max_limit}")
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"min_limit must be within 1..{max_limit}, got {min_limit}")
        if increase_after is not None and increase_after < 1:
            raise ValueError(f"increase_after must be >= 1, got {increase_after}")
        if not 0.0 < decrease_factor < 1.0:
            raise ValueError(f"decrease_factor must be within (0, 1), got {decrease_factor}")
        self.max_limit = max_limit
        self.min_limit = min_limit
        self.increase_after = increase_after
        self.decrease_factor = decrease_factor
        self.limit = max_limit
        self.in_use = 0
        #: Called (no arguments) after a release that leaves room, so a dispatcher that gave up
        #: on ``try_acquire`` knows when to try again. Set by the engine.
        self.on_available: Callable[[], None] | None = None
        self._successes = 0
        self._cooldown = 0  # releases still to see before another 429 may cut
        self._requests = 0
        self._rate_limited = 0
        self._cuts = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def __repr__(self) -> str:
        return f"AdaptiveLimit(limit={self.limit}, in_use={self.in_use}, max_limit={self.max_limit})"

    def try_acquire(self) -> bool:
        """Take a permit if one is free now. Never waits."""
        # Waiters of acquire() come first, so a busy dispatcher cannot starve them.
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a permit (first come, first served). Cancellation leaves no permit taken."""
        if self.try_acquire():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # The permit was handed over just as we were cancelled: give it back.
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(future)
            raise

    def release(self, *, rate_limited: bool = False) -> None:
        """Give a permit back; ``rate_limited`` says the request ended with HTTP 429."""
        if self.in_use <= 0:
            raise RuntimeError("AdaptiveLimit.release() without a matching acquire")
        self.in_use -= 1
        self._requests += 1
        if rate_limited:
            self._rate_limited += 1
            self._successes = 0
            if self._cooldown == 0:
                self._cut()
            else:
                self._cooldown -= 1
        else:
            if self._cooldown > 0:
                self._cooldown -= 1
            self._successes += 1
            step = self.increase_after if self.increase_after is not None else self.limit
            if self._successes >= step:
                self._successes = 0
                if self.limit < self.max_limit:
                    self.limit += 1
        self._hand_over()

    @contextlib.asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        """``async with limit.permit():`` acquires, and releases with ``rate_limited`` set
        when the body raised :class:`~pipeline.errors.ModelRateLimitError`."""
        await self.acquire()
        rate_limited = False
        try:
            yield
        except ModelRateLimitError:
            rate_limited = True
            raise
        finally:
            self.release(rate_limited=rate_limited)

    def stats(self) -> dict[str, int]:
        """Counters for progress displays and benchmarks."""
        return {
            "limit": self.limit,
            "in_use": self.in_use,
            "max_limit": self.max_limit,
            "requests": self._requests,
            "rate_limited": self._rate_limited,
            "decreases": self._cuts,
        }

    def _cut(self) -> None:
        self.limit = max(self.min_limit, int(self.limit * self.decrease_factor))
        self._cuts += 1
        # The requests still in flight were launched under the old limit; their 429s say
        # nothing new about the new one.
        self._cooldown = max(self.in_use, self.limit)

    def _hand_over(self) -> None:
        while self._waiters and self.in_use < self.limit:
            future = self._waiters.popleft()
            if future.done():  # cancelled while queued
                continue
            self.in_use += 1
            future.set_result(None)
        if self.in_use < self.limit and self.on_available is not None:
            self.on_available()
