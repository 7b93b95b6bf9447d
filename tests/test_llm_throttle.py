"""The per-model AIMD limit: falls on 429s, once per window; recovers on successes; stays in bounds."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.errors import ModelRateLimitError, ModelServerError
from pipeline.llm.throttle import AdaptiveLimit


def take(limit: AdaptiveLimit, n: int) -> None:
    for _ in range(n):
        assert limit.try_acquire()


def test_starts_at_max_and_refuses_past_the_limit():
    limit = AdaptiveLimit(4)
    assert (limit.limit, limit.in_use, limit.max_limit) == (4, 0, 4)
    take(limit, 4)
    assert not limit.try_acquire()
    limit.release()
    assert limit.try_acquire()


def test_a_429_halves_the_limit():
    limit = AdaptiveLimit(16)
    take(limit, 1)
    limit.release(rate_limited=True)
    assert limit.limit == 8
    assert limit.stats()["rate_limited"] == 1


def test_a_burst_of_simultaneous_429s_cuts_once_per_window():
    limit = AdaptiveLimit(64)
    take(limit, 64)
    for _ in range(64):  # every request launched under the old limit comes back 429
        limit.release(rate_limited=True)
    assert limit.limit == 32

    # The next window, launched under the new limit, is again refused: one more cut.
    take(limit, 32)
    for _ in range(32):
        limit.release(rate_limited=True)
    assert limit.limit == 16
    assert limit.stats()["decreases"] == 2


def test_429s_from_requests_in_flight_at_the_cut_are_ignored_even_when_few():
    limit = AdaptiveLimit(8)
    take(limit, 8)
    limit.release(rate_limited=True)  # cut to 4 while 7 are still out
    for _ in range(7):
        limit.release(rate_limited=True)
    assert limit.limit == 4
    take(limit, 1)
    limit.release(rate_limited=True)  # launched under the new limit: counts
    assert limit.limit == 2


def test_recovers_one_step_per_window_of_successes():
    limit = AdaptiveLimit(16)
    take(limit, 1)
    limit.release(rate_limited=True)
    assert limit.limit == 8
    for expected in (9, 10):
        for _ in range(limit.limit):
            take(limit, 1)
            limit.release()
        assert limit.limit == expected


def test_increase_after_sets_the_successes_per_step():
    limit = AdaptiveLimit(10, increase_after=2)
    take(limit, 1)
    limit.release(rate_limited=True)
    assert limit.limit == 5
    for _ in range(6):
        take(limit, 1)
        limit.release()
    assert limit.limit == 8


def test_a_429_resets_the_run_of_successes():
    limit = AdaptiveLimit(10, increase_after=3)
    for _ in range(2):
        take(limit, 1)
        limit.release()
    take(limit, 1)
    limit.release(rate_limited=True)
    assert limit.limit == 5
    for _ in range(2):  # 2 + 2 would have made a step without the reset
        take(limit, 1)
        limit.release()
    assert limit.limit == 5


def test_never_rises_above_max():
    limit = AdaptiveLimit(3, increase_after=1)
    for _ in range(50):
        take(limit, 1)
        limit.release()
    assert limit.limit == 3


def test_never_falls_below_min():
    limit = AdaptiveLimit(32, min_limit=2)
    for _ in range(200):
        if limit.try_acquire():
            limit.release(rate_limited=True)
    assert limit.limit == 2


def test_on_available_is_called_when_a_release_leaves_room():
    limit = AdaptiveLimit(2)
    calls = []
    limit.on_available = lambda: calls.append(limit.in_use)
    take(limit, 2)
    limit.release()
    assert calls == [1]
    take(limit, 1)
    limit.release(rate_limited=True)  # limit 2 -> 1 with 1 still in use: no room
    assert calls == [1]
    limit.release()
    assert calls == [1, 0]


def test_release_without_acquire_is_an_error():
    with pytest.raises(RuntimeError):
        AdaptiveLimit(1).release()


@pytest.mark.parametrize(
    "kwargs",
    [{"max_limit": 0}, {"max_limit": 4, "min_limit": 5}, {"max_limit": 4, "increase_after": 0},
     {"max_limit": 4, "decrease_factor": 1.0}],
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        AdaptiveLimit(**kwargs)


async def test_acquire_waits_first_come_first_served():
    limit = AdaptiveLimit(1)
    await limit.acquire()
    order = []

    async def waiter(name):
        await limit.acquire()
        order.append(name)
        limit.release()

    tasks = [asyncio.create_task(waiter(n)) for n in ("a", "b", "c")]
    await asyncio.sleep(0)
    assert not limit.try_acquire()  # waiters come before a polling dispatcher
    limit.release()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"]
    assert limit.in_use == 0


async def test_a_cancelled_waiter_takes_no_permit():
    limit = AdaptiveLimit(1)
    await limit.acquire()
    task = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    limit.release()
    assert limit.in_use == 0
    assert limit.try_acquire()


async def test_permit_reports_rate_limits_and_nothing_else():
    limit = AdaptiveLimit(8)
    with pytest.raises(ModelServerError):
        async with limit.permit():
            raise ModelServerError("503")
    assert limit.limit == 8
    with pytest.raises(ModelRateLimitError):
        async with limit.permit():
            raise ModelRateLimitError()
    assert limit.limit == 4
    assert limit.stats() == {
        "limit": 4, "in_use": 0, "max_limit": 8, "requests": 2, "rate_limited": 1, "decreases": 1,
    }
