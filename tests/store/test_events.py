"""coalesce(): what a batch of journal events means, the rules both stores apply."""

from __future__ import annotations

import pytest

from pipeline.store.events import (DEFERRED, DONE, FAILED, STARTED, Completed, Dropped, StateSaved, TaskEvent, Usage,
                                   coalesce, usage_totals)


def usage(model="m", requests=1, finish_reason="stop", truncated=0, cost=None, pacing=None, rate_limited=0):
    return Usage(model, requests, 10, 4, rate_limited, 8, finish_reason, truncated, cost, pacing)


def test_the_last_state_of_a_task_wins_and_a_done_value_travels_with_it():
    batch = coalesce([
        TaskEvent(STARTED, 0, "x", 1, "cell"),
        TaskEvent(DONE, 0, "x", 1, "cell", '"a"'),
        TaskEvent(STARTED, 0, "x", 2, "cell"),
        TaskEvent(DONE, 0, "x", 3, "cell", '"c"'),
        TaskEvent(STARTED, 0, "x", 3, "cell"),  # started again: its value is no longer the task's
    ])
    rows = {key: (ev.kind, ev.value, ev.attempts) for key, ev in batch.tasks.items()}
    assert rows == {(0, "x", 1): (DONE, '"a"', None), (0, "x", 2): (STARTED, None, None),
                    (0, "x", 3): (STARTED, None, None)}


def test_a_deferred_tasks_attempts_and_error_stay_when_it_starts_again_or_is_done():
    batch = coalesce([
        TaskEvent(DEFERRED, 0, "x", 1, "cell", attempts=1, next_eligible_at=5.0, error="first"),
        TaskEvent(DEFERRED, 0, "x", 1, "cell", attempts=2, next_eligible_at=9.0, error="second"),
        TaskEvent(STARTED, 0, "x", 1, "cell"),
        TaskEvent(FAILED, 0, "x", 2, "cell", attempts=3, error="bad"),
        TaskEvent(DONE, 0, "x", 2, "cell", '"v"'),
    ])
    started, done = batch.tasks[(0, "x", 1)], batch.tasks[(0, "x", 2)]
    assert (started.kind, started.attempts, started.next_eligible_at, started.error) == (STARTED, 2, 9.0, "second")
    assert (done.kind, done.value, done.attempts, done.next_eligible_at, done.error) == (DONE, '"v"', 3, None, "bad")


def test_usage_is_kept_per_attempt_in_event_order():
    first, second, third = usage(requests=1), usage(requests=2), usage(requests=3)
    batch = coalesce([
        TaskEvent(DEFERRED, 0, "x", 1, "cell", attempts=0, next_eligible_at=1.0, error="429", usage=first),
        TaskEvent(DONE, 0, "x", 1, "cell", '"v"', usage=second),
        TaskEvent(DONE, 1, "x", 1, "cell", '"w"', usage=third),
    ])
    assert batch.usage == [((0, "x", 1), first), ((0, "x", 1), second), ((1, "x", 1), third)]


def test_a_whole_row_group_drop_covers_single_record_drops():
    batch = coalesce([Dropped(0, 1), Dropped(0, 2), Dropped(1, 3), Dropped(1), Dropped(1, 4), Dropped(2)])
    assert batch.dropped == {0: {1, 2}, 1: None, 2: None}


def test_the_last_state_of_a_stateful_generator_wins_and_its_done_is_a_task_row():
    batch = coalesce([
        StateSaved(0, "g", '{"n": 1}', TaskEvent(DONE, 0, "g", 1, "cell", '"a"')),
        StateSaved(0, "g", '{"n": 2}', TaskEvent(DONE, 0, "g", 2, "cell", '"b"')),
        StateSaved(1, "g", '{"n": 3}', TaskEvent(DONE, 1, "g", 0, "cell", '"c"')),
    ])
    assert batch.states == {(0, "g"): '{"n": 2}', (1, "g"): '{"n": 3}'}
    assert {key: ev.value for key, ev in batch.tasks.items()} == {(0, "g", 1): '"a"', (0, "g", 2): '"b"',
                                                                 (1, "g", 0): '"c"'}


def test_the_row_groups_of_a_batch_are_every_one_it_touches():
    batch = coalesce([TaskEvent(STARTED, 0, "x", 1, "cell"), Dropped(1, 2), Completed(2),
                      StateSaved(3, "g", "{}", TaskEvent(DONE, 3, "g", None, "batch", "{}"))])
    assert batch.row_groups == {0, 1, 2, 3} and batch.completed == {2}
    assert coalesce([]).row_groups == set()


def test_anything_but_an_event_is_refused():
    with pytest.raises(ValueError, match="unknown event"):
        coalesce([(DONE, 0, "x", 1, "cell", '"v"')])  # a plain tuple, as events were once


def test_usage_totals_sum_per_task_and_per_model_in_the_row_groups_held():
    pacing = {"paced": 1}
    rows = coalesce([
        TaskEvent(DEFERRED, 0, "x", 1, "cell", attempts=0, next_eligible_at=1.0, error="429",
                  usage=usage(finish_reason=None, rate_limited=1, cost=0.5, pacing=pacing)),
        TaskEvent(DONE, 0, "x", 1, "cell", '"v"', usage=usage(finish_reason="length", truncated=1)),
        TaskEvent(DONE, 0, "x", 2, "cell", '"w"', usage=usage(model="n", finish_reason=None)),
        TaskEvent(DONE, 1, "x", 1, "cell", '"u"', usage=usage(requests=5)),  # not held: not counted
    ]).usage
    per_task, per_model = usage_totals(rows, {0})
    assert set(per_task) == {(0, "x", 1), (0, "x", 2)}
    task = per_task[(0, "x", 1)]
    assert (task.requests, task.prompt_tokens, task.completion_tokens, task.finish_reason) == (2, 20, 8, "length")
    assert per_task[(0, "x", 2)].finish_reason is None
    m = per_model[("m", "x")]
    assert (m.requests, m.rate_limited, m.truncated, m.cost, m.pacing, m.concurrency) == (2, 1, 1, 0.5, pacing, 8)
    assert per_model[("n", "x")].cost is None
