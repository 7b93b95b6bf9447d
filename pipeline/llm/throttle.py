"""Per-model adaptive concurrency: additive increase, multiplicative decrease (AIMD).

A model endpoint tells us it is overloaded with HTTP 429. The right number of requests to keep
in flight is unknown and changes with the server's load, so it is learned the way TCP learns a
congestion window: an overload cuts the limit by ``decrease_factor``; a run of successes raises
it by one, never above the configured ``max_parallel_requests``.

Three things make the naive version ("every 429 halves the limit") misbehave, and are handled
here:

- Isolated 429s. Servers and gateways answer a few requests 429 for reasons that have nothing
  to do with our concurrency (a token bucket refilling, a busy replica). With 5 % of requests
  refused at random, halving on every 429 takes a limit of 32 down to a handful within a
  second, and it never recovers (7x slower runs). So a 429 cuts only when the 429s are a real
  share of the recent answers: at least ``cut_share`` (20 %), and at least 2, of the last
  ``window`` releases (default ``max(max_limit, 32)``). A server that is really overloaded
  refuses a large share of what it gets and crosses that at once; 5 % of random 429s almost
  never does (about once per 9,000 releases with a window of 32; a 10 % threshold would cut
  2-3 times per 600 releases). A window smaller than 32 cannot tell the two apart.
- A burst. When the server starts refusing, every request already in flight (launched under
  the old, too-high limit) comes back 429 at about the same time. Cutting on each of them would
  take a limit of 64 to 1 in one burst. So after a cut, the window starts afresh and further
  429s are ignored for a *cooldown*: until as many releases have happened as there were
  requests in flight at the cut (or as the new limit, whichever is larger). Only 429s from
  requests launched under the new limit can cut again.
- Recovery speed. The cut is mild (``decrease_factor`` 0.7, as TCP CUBIC) and
  ``increase_after`` defaults to the current limit: one step up per window of successful
  requests since the last change, like TCP's congestion avoidance. A 429 that does not cut
  does not reset that count (it is noise, or it would have cut); a cut does.

All methods are synchronous and must be called from the event loop's thread; the engine
acquires a permit before it runs an LLM task and releases it when the task ends.

A limit may carry a :class:`~pipeline.llm.health.ModelHealth` (``health``): while it says the
endpoint is down, no permit is handed out, and :meth:`AdaptiveLimit.release` reports each
call's outcome to it.

A limit may carry a :class:`~pipeline.llm.pacing.Pacer` (``pacer``): a permit is handed out only
when the model's per-minute budgets and the server's ``x-ratelimit-*`` counts have room
(:meth:`AdaptiveLimit.try_acquire` reserves a request and its tokens); otherwise nothing is
taken, and a timer calls ``on_available`` when there is room again. A task that waits for room
so holds no permit and spends no attempt.
"""

from __future__ import annotations

import asyncio
import collections
import math
from typing import TYPE_CHECKING, Callable, Mapping

from pipeline.llm.health import ANSWERED, OUTAGE, RATE_LIMITED, ModelHealth

if TYPE_CHECKING:
    from pipeline.llm.pacing import Pacer

__all__ = ["AdaptiveLimit"]


class AdaptiveLimit:
    """How many requests one model may have in flight now, adapted to its 429s.

    ``limit`` starts at ``max_limit`` and stays within ``[min_limit, max_limit]``.
    ``increase_after`` is the number of successes per +1 step; ``None`` (the default) means
    "the current limit", i.e. one step per window of successes. A cut multiplies the limit by
    ``decrease_factor`` (and lowers it by at least one); it happens on a 429 that makes the 429s
    among the last ``window`` releases (default ``max(max_limit, 32)``) reach ``cut_share`` of
    the window, and at least 2.
    """

    #: The smallest default window: below it, random 429s and overload look alike.
    MIN_WINDOW = 32

    def __init__(
        self,
        max_limit: int,
        *,
        min_limit: int = 1,
        increase_after: int | None = None,
        decrease_factor: float = 0.7,
        window: int | None = None,
        cut_share: float = 0.2,
    ) -> None:
        if max_limit < 1:
            raise ValueError(f"max_limit must be >= 1, got {max_limit}")
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"min_limit must be within 1..{max_limit}, got {min_limit}")
        if increase_after is not None and increase_after < 1:
            raise ValueError(f"increase_after must be >= 1, got {increase_after}")
        if not 0.0 < decrease_factor < 1.0:
            raise ValueError(f"decrease_factor must be within (0, 1), got {decrease_factor}")
        if window is not None and window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if not 0.0 < cut_share <= 1.0:
            raise ValueError(f"cut_share must be within (0, 1], got {cut_share}")
        self.max_limit = max_limit
        self.min_limit = min_limit
        self.increase_after = increase_after
        self.decrease_factor = decrease_factor
        self.window = window if window is not None else max(max_limit, self.MIN_WINDOW)
        self.cut_share = cut_share
        #: 429s among the last ``window`` releases that make a cut.
        self.cut_at = max(2, math.ceil(cut_share * self.window - 1e-9))
        self.limit = max_limit
        self.in_use = 0
        #: Called (no arguments) after a release that leaves room, so a dispatcher that gave up
        #: on ``try_acquire`` knows when to try again. Set by the engine.
        self.on_available: Callable[[], None] | None = None
        self._successes = 0  # since the last change of the limit
        self._cooldown = 0  # releases still to see before outcomes count again
        self._recent: collections.deque[bool] = collections.deque()  # last releases: 429 or not
        self._recent_429 = 0
        self._requests = 0
        self._rate_limited = 0
        self._cuts = 0
        #: The endpoint's circuit breaker (set by the runtime); None: always up.
        self.health: ModelHealth | None = None
        #: The model's pacing (set by the runtime); None: no pacing.
        self.pacer: Pacer | None = None
        #: Tokens the last successful :meth:`try_acquire` reserved; give them back to release().
        self.last_reserved = 0
        self._wake: asyncio.TimerHandle | None = None
        self._wake_due = math.inf

    def attach_health(self, health: ModelHealth) -> None:
        """Gate permits on ``health`` and reopen when the endpoint answers again."""
        self.health = health
        health.on_up = self._hand_over

    def __repr__(self) -> str:
        return f"AdaptiveLimit(limit={self.limit}, in_use={self.in_use}, max_limit={self.max_limit})"

    def try_acquire(self, max_tokens: int | None = None) -> bool:
        """Take a permit if one is free now, the endpoint is up and the pacer has room for a
        request of ``max_tokens`` (``last_reserved`` then holds the tokens reserved). Never
        waits: when it says no, ``on_available`` is called once there is room again."""
        if self.in_use < self.limit and not (self.health is not None and self.health.down):
            pacer = self.pacer
            if pacer is not None:
                reserved = pacer.try_take(max_tokens, self.in_use)
                if reserved < 0:
                    self._wake_after(pacer.wait_s)
                    return False
                self.last_reserved = reserved
            self.in_use += 1
            return True
        return False

    def release(self, *, rate_limited: bool = False, outage: bool = False, answered: bool = True,
                error: str | None = None, reserved: int = 0, requests: int | None = None,
                tokens: int | None = None) -> None:
        """Give a permit back; ``rate_limited`` says the request ended with HTTP 429, ``outage``
        that the endpoint failed (:func:`pipeline.errors.is_outage`), ``answered`` (when neither)
        that it answered at least once (false: no request was made). ``error`` describes an
        outage for the health log. For the pacer: ``reserved`` (what the acquire reserved),
        ``requests`` sent and ``tokens`` used in all (None: 1 request, as reserved)."""
        if self.in_use <= 0:
            raise RuntimeError("AdaptiveLimit.release() without a matching acquire")
        self.in_use -= 1
        if self.pacer is not None:
            self.pacer.settle(reserved, 1 if requests is None else requests, reserved if tokens is None else tokens)
        health = self.health
        if health is not None:
            if rate_limited:
                health.record(RATE_LIMITED)
            elif outage:
                health.record(OUTAGE, error)
            elif answered:
                health.record(ANSWERED)
        self._requests += 1
        if rate_limited:
            self._rate_limited += 1
        if self._cooldown > 0:
            # Launched before the last cut: says nothing about the new limit.
            self._cooldown -= 1
        else:
            recent = self._recent
            recent.append(rate_limited)
            self._recent_429 += rate_limited
            if len(recent) > self.window:
                self._recent_429 -= recent.popleft()
            if rate_limited and self._recent_429 >= self.cut_at:
                self._cut()
        if not rate_limited:
            self._successes += 1
            step = self.increase_after if self.increase_after is not None else self.limit
            if self._successes >= step:
                self._successes = 0
                if self.limit < self.max_limit:
                    self.limit += 1
        self._hand_over()

    def observe(self, headers: Mapping[str, str]) -> None:
        """An answer's headers, for the pacer (``x-ratelimit-*``); called by the client."""
        if self.pacer is not None:
            self.pacer.observe(headers, self.in_use)

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
        cut = min(self.limit - 1, int(self.limit * self.decrease_factor))
        self.limit = max(self.min_limit, cut)
        self._cuts += 1
        self._successes = 0
        self._recent.clear()
        self._recent_429 = 0
        # The requests still in flight were launched under the old limit; their 429s say
        # nothing new about the new one.
        self._cooldown = max(self.in_use, self.limit)

    def _hand_over(self) -> None:
        """Tell the dispatcher when a permit is free and the endpoint up."""
        if self.health is not None and self.health.down:
            return
        if self.in_use < self.limit and self.on_available is not None:
            self.on_available()

    def _wake_after(self, delay_s: float) -> None:
        """One timer at a time: hand over again once the pacer has room (at most a minute on,
        then it looks again)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # used off a loop (a test): the caller asks again
            return
        delay_s = min(max(delay_s, 0.001), 60.0)
        now = loop.time()
        due = now + delay_s
        if self._wake is not None:
            # A timer past due belongs to a loop that ended (a run before this one): replace it.
            if now - 1.0 <= self._wake_due <= due + 0.001:
                return
            self._wake.cancel()
        self._wake_due = due
        self._wake = loop.call_at(due, self._woken)

    def _woken(self) -> None:
        self._wake, self._wake_due = None, math.inf
        self._hand_over()
