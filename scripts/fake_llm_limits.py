"""Rate limits for the fake server (scripts/fake_llm_server.py), as OpenAI enforces them: a
requests-per-minute and a tokens-per-minute token bucket per model, each full at the start
(capacity = the per-minute limit) and refilled continuously (limit / 60 per second).

With ``start_s`` the buckets start with that many seconds' share instead of a full minute's (a
server whose budget earlier clients used up), so that a short run meets the steady state at
once: over T seconds at most ``limit / 60 * (T + start_s)`` fit. With ``headers=False`` no
``x-ratelimit-*`` header is sent (a server that limits without saying so).

A request is charged 1 request and its total tokens (prompt + completion of the answer it gets)
when it arrives; one that does not fit gets 429 and is not charged. Every chat answer, 429s
included, carries OpenAI's headers: ``x-ratelimit-limit-{requests,tokens}``,
``x-ratelimit-remaining-{requests,tokens}`` and ``x-ratelimit-reset-{requests,tokens}`` (the
time until the bucket is full again, as ``"1s"``, ``"6m0s"``, ``"250ms"``); a 429 adds
``retry-after-ms`` (the time until the request would fit).

Over a run of T seconds at most ``limit * (1 + T / 60)`` fit: what "the allowed rate" means in
scripts/bench_llm.py.
"""

from __future__ import annotations

import math
import time
from typing import Callable

__all__ = ["RateLimits", "format_duration"]


def format_duration(seconds: float) -> str:
    """OpenAI's way: ``"250ms"``, ``"1.5s"``, ``"6m0s"``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"


class _Bucket:
    __slots__ = ("limit", "level", "stamp")

    def __init__(self, limit: float, now: float, level: float):
        self.limit, self.level, self.stamp = limit, level, now

    def refill(self, now: float) -> None:
        self.level = min(self.limit, self.level + (now - self.stamp) * self.limit / 60)
        self.stamp = now

    def reset_s(self) -> float:
        return (self.limit - self.level) * 60 / self.limit

    def wait_s(self, amount: float) -> float:
        return max(0.0, (min(amount, self.limit) - self.level) * 60 / self.limit)


class RateLimits:
    """Per model: ``admit(model, tokens)`` -> ``(admitted, headers)``. A limit of 0 is none."""

    def __init__(self, requests_per_minute: float = 0.0, tokens_per_minute: float = 0.0, *,
                 start_s: float | None = None, headers: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.start_s = start_s
        self.headers = headers
        self.clock = clock
        self._buckets: dict[str, tuple[_Bucket | None, _Bucket | None]] = {}

    def _start(self, limit: float) -> float:
        return limit if self.start_s is None else min(limit, limit / 60 * self.start_s)

    def admit(self, model: str, tokens: int) -> tuple[bool, dict[str, str]]:
        now = self.clock()
        pair = self._buckets.get(model)
        if pair is None:
            pair = self._buckets[model] = (
                _Bucket(self.requests_per_minute, now, self._start(self.requests_per_minute))
                if self.requests_per_minute > 0 else None,
                _Bucket(self.tokens_per_minute, now, self._start(self.tokens_per_minute))
                if self.tokens_per_minute > 0 else None)
        requests, budget = pair
        for bucket in pair:
            if bucket is not None:
                bucket.refill(now)
        fits = (requests is None or requests.level >= 1) and (budget is None or budget.level >= min(tokens, budget.limit))
        if fits:
            if requests is not None:
                requests.level -= 1
            if budget is not None:
                budget.level -= tokens
        headers: dict[str, str] = {}
        for kind, bucket in (("requests", requests), ("tokens", budget)):
            if bucket is not None and self.headers:
                headers[f"x-ratelimit-limit-{kind}"] = f"{bucket.limit:g}"
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
                headers[f"x-ratelimit-reset-{kind}"] = format_duration(bucket.reset_s())
        if not fits:
            wait = max(requests.wait_s(1) if requests is not None else 0.0,
                       budget.wait_s(tokens) if budget is not None else 0.0)
            headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        return fits, headers
