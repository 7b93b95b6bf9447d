"""The per-model AIMD limit: cuts when 429s are a real share of the recent answers (isolated
ones do not), once per window; recovers on successes; stays in bounds."""

from __future__ import annotations

import random

import pytest

from pipeline.llm.throttle import AdaptiveLimit


def take(limit: AdaptiveLimit, n: int) -> None:
    for _ in range(n):
        assert limit.try_acquire()


def once(limit: AdaptiveLimit, *, rate_limited: bool = False) -> None:
    take(limit, 1)
    limit.release(rate_limited=rate_limited)


def test_starts_at_max_and_refuses_past_the_limit():
    limit = AdaptiveLimit(4)
    assert (limit.limit, limit.in_use, limit.max_limit) == (4, 0, 4)
    take(limit, 4)
    assert not limit.try_acquire()
    limit.release()
    assert limit.try_acquire()


def test_the_cut_threshold_is_a_share_of_the_window_and_at_least_two():
    assert (AdaptiveLimit(16).window, AdaptiveLimit(16).cut_at) == (32, 7)  # 20 % of max(16, 32)
    assert (AdaptiveLimit(64).window, AdaptiveLimit(64).cut_at) == (64, 13)
    assert AdaptiveLimit(8, window=10, cut_share=0.1).cut_at == 2  # never a single 429


def test_an_isolated_429_does_not_cut():
    limit = AdaptiveLimit(16)
    for i in range(2000):  # one 429 in every 20 answers, for ever
        once(limit, rate_limited=i % 20 == 0)
    assert limit.limit == 16
    assert limit.stats()["rate_limited"] == 100 and limit.stats()["decreases"] == 0


def test_random_429s_at_five_percent_leave_the_limit_alone_but_an_overload_cuts_it():
    rng = random.Random(7)
    limit = AdaptiveLimit(32)
    take(limit, 32)
    for _ in range(3000):  # 32 in flight throughout; 5 % of the answers are 429
        limit.release(rate_limited=rng.random() < 0.05)
        take(limit, 1)
    assert limit.limit == 32 and limit.stats()["decreases"] == 0
    for _ in range(300):  # now the server refuses half of what it gets
        limit.release(rate_limited=rng.random() < 0.5)
        while limit.try_acquire():
            pass
    assert limit.limit <= 8 and limit.stats()["decreases"] >= 4


def test_a_share_of_429s_cuts_by_the_decrease_factor():
    limit = AdaptiveLimit(16)  # window 32, cuts at 7
    for _ in range(6):
        once(limit, rate_limited=True)
        once(limit)
    assert limit.limit == 16
    once(limit, rate_limited=True)  # the 7th 429 of the last 32 answers
    assert limit.limit == 11  # int(16 x 0.7)
    assert limit.stats()["rate_limited"] == 7 and limit.stats()["decreases"] == 1


def test_429s_that_left_the_window_do_not_count():
    limit = AdaptiveLimit(8, window=10, cut_share=0.2)  # 2 of the last 10
    once(limit, rate_limited=True)
    for _ in range(10):
        once(limit)
    once(limit, rate_limited=True)
    assert limit.limit == 8
    once(limit, rate_limited=True)
    assert limit.limit == 5


def test_a_cut_lowers_the_limit_by_at_least_one():
    limit = AdaptiveLimit(3, window=4, cut_share=0.5, decrease_factor=0.9)
    once(limit, rate_limited=True)
    once(limit, rate_limited=True)
    assert limit.limit == 2  # int(3 x 0.9) = 2
    limit = AdaptiveLimit(2, window=4, cut_share=0.5, decrease_factor=0.9)
    once(limit, rate_limited=True)
    once(limit, rate_limited=True)
    assert limit.limit == 1  # int(2 x 0.9) = 1


def test_a_burst_of_simultaneous_429s_cuts_once_per_window():
    limit = AdaptiveLimit(64)
    take(limit, 64)
    for _ in range(64):  # every request launched under the old limit comes back 429
        limit.release(rate_limited=True)
    assert limit.limit == 44
    assert limit.stats()["decreases"] == 1

    # The next window, launched under the new limit, is again refused: one more cut.
    take(limit, 44)
    for _ in range(44):
        limit.release(rate_limited=True)
    assert limit.limit == 30
    assert limit.stats()["decreases"] == 2


def test_429s_from_requests_in_flight_at_the_cut_are_ignored_even_when_few():
    limit = AdaptiveLimit(8, window=10, cut_share=0.2)
    take(limit, 8)
    limit.release(rate_limited=True)
    limit.release(rate_limited=True)  # cut to 5 while 6 are still out
    assert limit.limit == 5
    for _ in range(6):
        limit.release(rate_limited=True)
    assert limit.limit == 5
    take(limit, 2)  # launched under the new limit: they count
    limit.release(rate_limited=True)
    limit.release(rate_limited=True)
    assert limit.limit == 3
    assert limit.stats()["decreases"] == 2


def test_recovers_one_step_per_window_of_successes():
    limit = AdaptiveLimit(16, window=10)
    once(limit, rate_limited=True)
    once(limit, rate_limited=True)
    assert limit.limit == 11
    for expected in (12, 13):
        for _ in range(limit.limit):
            once(limit)
        assert limit.limit == expected


def test_increase_after_sets_the_successes_per_step():
    limit = AdaptiveLimit(10, increase_after=2, window=10)
    once(limit, rate_limited=True)
    once(limit, rate_limited=True)
    assert limit.limit == 7
    for _ in range(4):
        once(limit)
    assert limit.limit == 9


def test_a_cut_resets_the_run_of_successes_and_an_isolated_429_does_not():
    limit = AdaptiveLimit(10, increase_after=3, window=4, cut_share=0.5)  # cuts at 2 of the last 4
    for _ in range(2):
        once(limit)
    once(limit, rate_limited=True)
    once(limit, rate_limited=True)
    assert limit.limit == 7
    for _ in range(2):  # 2 + 2 would have made a step without the reset
        once(limit)
    assert limit.limit == 7
    for _ in range(5):  # out of the cut's cooldown (7 releases)
        once(limit)
    assert limit.limit == 9  # 7 successes since the cut: two steps, and one towards the next
    once(limit)  # two towards the next step
    once(limit, rate_limited=True)  # alone in its window: neither a cut nor a reset
    assert limit.limit == 9
    once(limit)  # the third
    assert limit.limit == 10
    assert limit.stats()["decreases"] == 1


def test_never_rises_above_max():
    limit = AdaptiveLimit(3, increase_after=1)
    for _ in range(50):
        take(limit, 1)
        limit.release()
    assert limit.limit == 3


def test_never_falls_below_min():
    limit = AdaptiveLimit(32, min_limit=2)
    for _ in range(500):
        if limit.try_acquire():
            limit.release(rate_limited=True)
    assert limit.limit == 2
    assert limit.stats()["decreases"] >= 6


def test_on_available_is_called_when_a_release_leaves_room():
    limit = AdaptiveLimit(2, window=4, cut_share=0.5)  # cuts at 2 of the last 4
    calls = []
    limit.on_available = lambda: calls.append(limit.in_use)
    take(limit, 2)
    limit.release()
    assert calls == [1]
    take(limit, 1)
    limit.release(rate_limited=True)  # an isolated 429: no cut, so there is room
    assert calls == [1, 1]
    take(limit, 1)
    limit.release(rate_limited=True)  # limit 2 -> 1 with 1 still in use: no room
    assert limit.limit == 1
    assert calls == [1, 1]
    limit.release()
    assert calls == [1, 1, 0]


def test_release_without_acquire_is_an_error():
    with pytest.raises(RuntimeError):
        AdaptiveLimit(1).release()


@pytest.mark.parametrize(
    "kwargs",
    [{"max_limit": 0}, {"max_limit": 4, "min_limit": 5}, {"max_limit": 4, "increase_after": 0},
     {"max_limit": 4, "decrease_factor": 1.0}, {"max_limit": 4, "window": 1}, {"max_limit": 4, "cut_share": 0.0},
     {"max_limit": 4, "cut_share": 1.5}],
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        AdaptiveLimit(**kwargs)


def test_only_rate_limits_cut_the_limit_not_outages():
    limit = AdaptiveLimit(8, window=10)  # cuts at 2 of the last 10
    for _ in range(2):
        take(limit, 1)
        limit.release(outage=True, error="503")
    assert limit.limit == 8  # 5xx are not a reason to cut
    once(limit, rate_limited=True)
    assert limit.limit == 8
    once(limit, rate_limited=True)
    assert limit.limit == 5
    assert limit.stats() == {
        "limit": 5, "in_use": 0, "max_limit": 8, "requests": 4, "rate_limited": 2, "decreases": 1,
    }
