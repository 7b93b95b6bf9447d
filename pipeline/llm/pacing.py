"""Pacing: a model's requests stay within its per-minute budgets and within what the server
says is left (``x-ratelimit-*`` headers), so that the client slows down BEFORE it is refused.

One :class:`Pacer` per model alias and process, held by the model's
:class:`~pipeline.llm.throttle.AdaptiveLimit`: a permit is handed out only when the pacer has
room, and a task waiting for room waits in its model's lane (no permit held, no attempt
spent); the limit sets one timer for when room comes back. Every call is O(1).

Gates, each a token bucket (continuous refill, may run into debt):

- ``max_requests_per_minute``: capacity N, refilled at N/60 per second; a task takes 1 when it
  starts and corrects to the requests it really sent when it ends (re-asks count). A budget
  starts with one second's share, not a full minute's: the server's own bucket may have been
  spent by another process, and a minute's burst would meet 429s;
- ``max_tokens_per_minute``: likewise in tokens; a task reserves its column's ``max_tokens``
  until its usage is known, then the reservation is corrected to the prompt + completion
  tokens the server reported. A column without ``max_tokens`` reserves
  :data:`DEFAULT_RESERVED_TOKENS` until the model has answered 8 requests, then twice the mean
  tokens of its answers so far (at most the default);
- the server's own counts: ``x-ratelimit-remaining-requests`` / ``-tokens`` with
  ``x-ratelimit-reset-requests`` / ``-tokens`` (durations ``1s``, ``6m0s``, ``250ms``, or plain
  seconds) and, when sent, ``x-ratelimit-limit-requests`` / ``-tokens``. Each answer that
  carries them re-syncs a bucket. With the limit known, the bucket refills as OpenAI's does,
  ``(limit - remaining) / reset`` per second, and its level is kept within what the answer
  allows: at least ``remaining`` less what this process has in flight (the server may not have
  counted those yet), at most ``remaining + 1`` (the server rounds down); within that range the
  bucket's own count stands, so requests in flight are not subtracted twice. Without the limit,
  the level is ``remaining`` less what is in flight, and nothing more is sent once it is spent,
  until the reset.

Why a module and not a library: the engine needs a check that never waits and says how long
until there is room (it parks no task holding a permit), reservations corrected after the fact
(debts included), and levels re-synced from headers; aiolimiter's ``acquire`` waits and cannot
refund, pyrate-limiter records fixed weights in a sliding log. Together these are 40 lines.

All methods run on the event loop's thread.
"""

from __future__ import annotations

import collections
import math
import re
import time
from typing import Any, Callable, Mapping

__all__ = ["DEFAULT_RESERVED_TOKENS", "RATE_LIMIT_HEADERS", "Bucket", "Pacer", "parse_duration"]

#: Tokens a request reserves when its column sets no ``max_tokens``.
DEFAULT_RESERVED_TOKENS = 1024

#: The headers kept for ``pipeline status`` (OpenAI's names; Azure, vLLM gateways, Groq use them).
RATE_LIMIT_HEADERS = tuple(f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens")
                           for what in ("limit", "remaining", "reset"))

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """Seconds from ``"1s"``, ``"6m0s"``, ``"250ms"``, ``"1h2m3.5s"`` or plain ``"12.5"``; None
    when it is none of these (or negative, or not finite)."""
    if not text:
        return None
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pos, total = 0, 0.0
        for match in _DURATION.finditer(text):
            if match.start() != pos:
                return None
            value, unit = float(match.group(1)), match.group(2)
            total += value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
            pos = match.end()
        if pos == 0 or pos != len(text):
            return None
        seconds = total
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


class Bucket:
    """A token bucket: ``level`` (may be negative: a debt) refills at ``rate`` per second up to
    ``capacity``; past ``until`` (monotonic seconds) it no longer limits anything."""

    __slots__ = ("capacity", "rate", "level", "stamp", "until")

    def __init__(self, capacity: float, rate: float, level: float, now: float, until: float = math.inf):
        self.capacity, self.rate, self.level, self.stamp, self.until = capacity, rate, level, now, until

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` fits (0: now). An amount above the capacity needs a full
        bucket, then runs into debt."""
        if now >= self.until:
            return 0.0
        level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        need = min(amount, self.capacity)
        if level >= need:
            return 0.0
        wait = (need - level) / self.rate if self.rate > 0 else math.inf
        return min(wait, self.until - now)

    def take(self, amount: float, now: float) -> None:
        """Remove ``amount`` (a negative amount gives back)."""
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate) - amount
        self.stamp = now


class Pacer:
    """The pacing state of one model (see the module docstring).

    ``requests_per_minute`` / ``tokens_per_minute``: the configured budgets (None: none);
    ``prices``: ``(input, output)`` per million tokens, or None.
    """

    def __init__(self, *, requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 prices: tuple[float, float] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        now = clock()
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.prices = prices
        self._requests = Bucket(requests_per_minute, requests_per_minute / 60, requests_per_minute / 60, now) \
            if requests_per_minute else None
        self._tokens = Bucket(tokens_per_minute, tokens_per_minute / 60, tokens_per_minute / 60, now) \
            if tokens_per_minute else None
        self._server_requests: Bucket | None = None
        self._server_tokens: Bucket | None = None
        #: Tokens reserved by the tasks in flight.
        self.reserved = 0
        #: Seconds until room, as of the last refusal of :meth:`try_take`.
        self.wait_s = 0.0
        #: How many times requests were held back for room (episodes, not refusals).
        self.paced = 0
        self._holding = False
        self._fresh = True
        self._default_tokens = DEFAULT_RESERVED_TOKENS
        self._answered = self._answered_tokens = 0
        #: The last ``x-ratelimit-*`` headers an answer carried, and when (Unix seconds).
        self.headers: dict[str, str] = {}
        self.headers_at: float | None = None
        self._minute: collections.deque[list] = collections.deque()  # [second, requests, tokens]
        self._minute_requests = self._minute_tokens = 0  # their sums: a snapshot is O(1)

    def __repr__(self) -> str:
        return (f"Pacer(requests_per_minute={self.requests_per_minute}, tokens_per_minute={self.tokens_per_minute}, "
                f"reserved={self.reserved})")

    # -- the gate ---------------------------------------------------------------------------
    def try_take(self, max_tokens: int | None, in_use: int) -> int:
        """Reserve one request and ``max_tokens`` (or the default) if every gate has room now:
        returns the tokens reserved (give them to :meth:`settle`). Else -1, with ``wait_s``
        set to the seconds until room."""
        tokens = max_tokens if max_tokens else self._default_tokens
        gates = (self._requests, self._server_requests, self._tokens, self._server_tokens)
        if gates == (None, None, None, None):
            self.reserved += tokens
            return tokens
        now = self.clock()
        if self._fresh:  # a budget's share starts with the first request, not with the config
            self._fresh = False
            for gate in (self._requests, self._tokens):
                if gate is not None:
                    gate.stamp = now
        wait = 0.0
        for gate, amount in zip(gates, (1, 1, tokens, tokens)):
            if gate is not None:
                wait = max(wait, gate.wait_s(amount, now))
        if wait > 0:
            self.wait_s = wait
            if not self._holding:
                self._holding = True
                self.paced += 1
            return -1
        self._holding = False
        for gate, amount in zip(gates, (1, 1, tokens, tokens)):
            if gate is not None:
                gate.take(amount, now)
        self.reserved += tokens
        return tokens

    def settle(self, reserved: int, requests: int, tokens: int) -> None:
        """A task ended: it had reserved ``reserved`` tokens (and 1 request), it sent
        ``requests`` requests that used ``tokens`` tokens in all. The buckets are corrected."""
        self.reserved -= reserved
        if requests > 0 and tokens > 0:
            self._answered += requests
            self._answered_tokens += tokens
            if self._answered >= 8:
                mean = self._answered_tokens / self._answered
                self._default_tokens = max(1, min(DEFAULT_RESERVED_TOKENS, math.ceil(2 * mean)))
        now = self.clock()
        if requests != 1 or tokens != reserved:
            for gate, extra in ((self._requests, requests - 1), (self._server_requests, requests - 1),
                                (self._tokens, tokens - reserved), (self._server_tokens, tokens - reserved)):
                if gate is not None and extra:
                    gate.take(extra, now)
        second = int(now)
        minute = self._minute
        if minute and minute[-1][0] == second:
            minute[-1][1] += requests
            minute[-1][2] += tokens
        else:
            minute.append([second, requests, tokens])
        self._minute_requests += requests
        self._minute_tokens += tokens
        self._forget_before(second - 59)

    def _forget_before(self, second: int) -> None:
        """The last minute's counts lose the seconds before ``second``."""
        minute = self._minute
        while minute and minute[0][0] < second:
            _, requests, tokens = minute.popleft()
            self._minute_requests -= requests
            self._minute_tokens -= tokens

    # -- the server's headers ---------------------------------------------------------------
    def observe(self, headers: Mapping[str, str], in_use: int) -> None:
        """Re-sync from an answer's ``x-ratelimit-*`` headers (if it has any). ``in_use``: the
        requests of this model in flight, this answer's included."""
        remaining_requests = headers.get("x-ratelimit-remaining-requests")
        remaining_tokens = headers.get("x-ratelimit-remaining-tokens")
        if remaining_requests is None and remaining_tokens is None:
            return
        self.headers = {name: headers[name] for name in RATE_LIMIT_HEADERS if name in headers}
        self.headers_at = time.time()
        now = self.clock()
        others = max(0, in_use - 1)
        self._server_requests = _server_bucket(
            self._server_requests, _number(remaining_requests), headers.get("x-ratelimit-reset-requests"),
            headers.get("x-ratelimit-limit-requests"), others, now)
        # Of the tokens reserved in flight, the mean share of one request is this answer's own.
        in_flight_tokens = self.reserved * others / in_use if in_use else 0
        self._server_tokens = _server_bucket(
            self._server_tokens, _number(remaining_tokens), headers.get("x-ratelimit-reset-tokens"),
            headers.get("x-ratelimit-limit-tokens"), in_flight_tokens, now)

    # -- what status shows ------------------------------------------------------------------
    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """Money for these tokens at the configured prices, or None without prices."""
        if self.prices is None:
            return None
        return (prompt_tokens * self.prices[0] + completion_tokens * self.prices[1]) / 1e6

    def snapshot(self, requests: int = 0, tokens: int = 0) -> dict[str, Any]:
        """``{"requests_per_minute", "tokens_per_minute"}`` (the requests and tokens of the last 60
        s, counted, as a per-minute budget counts them: a run younger than a minute shows what
        it has used so far, not that extrapolated to a minute), the budgets ``max_requests_per_minute`` /
        ``max_tokens_per_minute``, ``paced`` (times requests were held back), ``headers`` (the last
        ``x-ratelimit-*`` seen) and ``headers_at``. ``requests`` / ``tokens``: those of a task that
        ended and has not settled yet (its usage event carries this snapshot), counted too. Fresh
        at every call: the last one a run stores is its state at its end."""
        self._forget_before(int(self.clock()) - 59)
        return {
            "requests_per_minute": float(self._minute_requests + requests),
            "tokens_per_minute": float(self._minute_tokens + tokens),
            "max_requests_per_minute": self.requests_per_minute,
            "max_tokens_per_minute": self.tokens_per_minute,
            "paced": self.paced,
            "headers": dict(self.headers),
            "headers_at": self.headers_at,
        }


#: The longest reset a server's x-ratelimit-reset-* header is taken at (seconds): past it the
#: pacer lets a request through, and a server still refusing answers 429 (AIMD, model_down_s).
MAX_RESET_S = 60.0


def _server_bucket(old: Bucket | None, remaining: float | None, reset: str | None, limit: str | None,
                   in_flight: float, now: float) -> Bucket | None:
    """The bucket the server's headers describe (``old``: the one they described before), or
    None when they set no bound."""
    if remaining is None:
        return None
    reset_s = parse_duration(reset)
    if reset_s is not None:  # a server asking for days (or garbage) is asked again within a minute
        reset_s = min(reset_s, MAX_RESET_S)
    total = _number(limit)
    level = remaining - in_flight
    if total is not None and total > 0:
        if old is not None and old.until == math.inf:
            own = min(old.capacity, old.level + (now - old.stamp) * old.rate)
            level = min(max(own, level), remaining + 1)
        if reset_s and remaining < total:
            return Bucket(total, (total - remaining) / reset_s, level, now)
        return Bucket(total, total / 60, level, now)  # full, or no reset given: a per-minute limit
    # No limit given: what remains is all there is until the reset (a minute when not given).
    return Bucket(math.inf, 0.0, level, now, until=now + (reset_s if reset_s is not None else 60.0))
