"""The Store protocol's contract, part two: claims, leases, workers and fencing, on every store
(in memory, a SQLite file, PostgreSQL); part one (runs, record batches, resume loading, progress
counts, compaction) is tests/store/test_contract.py, with the same fixtures and helpers."""

from __future__ import annotations

import pytest

from pipeline.store.usage import PACING_KEYS
from tests.conftest_store import (ELSEWHERE, claim_all_concurrently, claimed, complete, dead_owner, deferred, done,
                                  dropped, new_run, started)


# -- claims and leases -----------------------------------------------------------------------


def test_claims_take_row_groups_in_order_and_move_pending_to_active(any_store):
    store = any_store
    run_id = new_run(store, num_records=50, row_group_size=10)
    claims = store.claim_row_groups(run_id, 2, 30)
    assert [(c.row_group, c.num_rows, c.epoch, c.state) for c in claims] == [(0, 10, 1, "pending"), (1, 10, 1, "pending")]
    assert [store.lease_epoch(run_id, rg) for rg in (0, 1, 2)] == [1, 1, None]
    # Row groups this owner holds are not claimed again.
    assert [c.row_group for c in store.claim_row_groups(run_id, 2, 30)] == [2, 3]
    groups = store.row_groups(run_id)
    assert [g["state"] for g in groups] == ["active"] * 4 + ["pending"]
    assert {g["lease_owner"] for g in groups[:4]} == {store.owner}
    assert store.row_group_counts(run_id)["active"] == 4


def test_claims_create_the_row_groups_not_created_yet(stores):
    store, _ = stores
    for s in stores:
        s.row_group_batch = 2  # row groups are created two at a time
    run_id = new_run(store, num_records=25, row_group_size=3)  # 9 row groups, the last of 1 record
    assert [(g["row_group"], g["state"]) for g in store.row_groups(run_id)] == [(0, "pending"), (1, "pending")]
    assert store.row_group_counts(run_id)["pending"] == 9
    assert [c.row_group for c in store.claim_row_groups(run_id, 1, 60)] == [0]
    claims = store.claim_row_groups(run_id, 3, 60)  # 1 is there; 2 and 3 are created for it
    assert [(c.row_group, c.num_rows, c.epoch, c.state) for c in claims] == [
        (1, 3, 1, "pending"), (2, 3, 1, "pending"), (3, 3, 1, "pending")]
    c = store.row_group_counts(run_id)
    assert (c["active"], c["pending"], c["total"]) == (4, 5, 9)
    assert [c.row_group for c in store.claim_row_groups(run_id, 10, 60)] == [4, 5, 6, 7, 8]
    assert store.row_groups(run_id)[-1]["num_rows"] == 1
    assert store.claim_row_groups(run_id, 10, 60) == []


def test_checkpointed_counts_leave_the_row_groups_not_created_yet_pending(any_store):
    store = any_store
    store.row_group_batch = 2
    run_id = new_run(store, num_records=50, row_group_size=10)
    for claim in store.claim_row_groups(run_id, 2, 60):
        assert store.checkpoint_row_group(run_id, claim.row_group, f"rg-{claim.row_group}", 1)
    assert all(g["state"] == "checkpointed" for g in store.row_groups(run_id))  # every row that exists
    c = store.row_group_counts(run_id)
    assert (c["checkpointed"], c["pending"], c["total"], c["records_written"], c["records_dropped"]) == (2, 3, 5, 18, 2)


@pytest.mark.parametrize("size", [10, 1])  # with row groups created as the claims go
def test_two_workers_claiming_at_once_take_each_row_group_once(stores, size):
    store, other = stores
    for s in stores:
        s.row_group_batch = 2
    run_id = new_run(store, num_records=40 * size, row_group_size=size)
    mine, theirs = claim_all_concurrently(store, other, run_id)
    assert not set(mine) & set(theirs) and sorted(mine + theirs) == list(range(40))
    owners = {g["row_group"]: g["lease_owner"] for g in store.row_groups(run_id)}
    assert all(owners[rg] == store.owner for rg in mine) and all(owners[rg] == other.owner for rg in theirs)


def test_a_live_lease_is_not_claimable_and_one_of_another_host_waits_for_its_expiry(store_factory):
    store, other, remote = store_factory(), store_factory(), store_factory(ELSEWHERE)
    run_id = new_run(store, num_records=40)
    store.claim_row_groups(run_id, 2, 60)
    assert len(remote.claim_row_groups(run_id, 2, 60)) == 2
    assert other.claim_row_groups(run_id, 4, 60) == []  # this host's live worker, and another host's


def test_a_lease_held_by_a_dead_process_of_this_host_is_claimable_at_once(store_factory):
    store, dead = store_factory(), store_factory(dead_owner())
    run_id = new_run(store)
    assert len(dead.claim_row_groups(run_id, 3, 3600)) == 3
    claims = store.claim_row_groups(run_id, 3, 60)
    assert [(c.row_group, c.epoch, c.state) for c in claims] == [(0, 2, "active"), (1, 2, "active"), (2, 2, "active")]


def test_renewal_extends_leases_and_reports_the_lost_ones(stores):
    store, other = stores
    run_id = new_run(store)
    store.claim_row_groups(run_id, 1, -1)  # expired at once
    store.claim_row_groups(run_id, 1, 5)
    [taken] = other.claim_row_groups(run_id, 1, 60)  # takes the expired row group 0 over
    assert (taken.row_group, taken.epoch, taken.state) == (0, 2, "active")
    before = store.row_groups(run_id)[1]["lease_expires_at"]
    assert store.renew_leases(run_id, 120) == {0}
    assert store.lease_epoch(run_id, 0) is None and store.lease_epoch(run_id, 1) == 1
    assert store.row_groups(run_id)[1]["lease_expires_at"] > before + 100
    assert store.renew_leases(run_id, 120) == set()


def test_released_row_groups_are_claimable_at_once_and_keep_their_state(stores):
    store, other = stores
    run_id = new_run(store)
    store.claim_row_groups(run_id, 2, 60)
    store.record(run_id, [complete(1)])
    store.release_row_groups(run_id, [0, 1])
    assert [g["lease_owner"] for g in store.row_groups(run_id)] == [None, None, None]
    claims = other.claim_row_groups(run_id, 3, 60)
    assert [(c.row_group, c.state) for c in claims] == [(0, "active"), (1, "complete"), (2, "pending")]
    assert store.record(run_id, [started(0, "x", 0)]) == {0}


def test_checkpointed_row_groups_are_never_claimed_again(stores):
    store, later = stores
    run_id = claimed(store, num_records=20)
    assert store.checkpoint_row_group(run_id, 0, "runs/a.parquet", 0)
    store.release_row_groups(run_id, [1])
    assert [c.row_group for c in later.claim_row_groups(run_id, 5, 60)] == [1]


def test_live_workers_count_running_processes_and_fresh_heartbeats(store_factory):
    store, dead, remote = store_factory(), store_factory(dead_owner()), store_factory("far.example:1:1:ab")
    run_id = new_run(store)
    assert store.live_workers(run_id) == 0
    for s in (store, dead, remote):
        s.register_worker(run_id)
    assert store.live_workers(run_id) == 2  # this process and the fresh remote one
    remote.renew_leases(run_id, 30)
    store.unregister_worker(run_id)
    assert store.live_workers(run_id) == 1


def test_only_a_worker_that_finds_no_other_live_one_begins_the_run(store_factory):
    first, joiner, dead = store_factory(), store_factory(), store_factory(dead_owner())
    run_id = new_run(first)
    assert dead.register_worker(run_id)  # a process that died since: not a live worker
    assert first.register_worker(run_id)
    assert not joiner.register_worker(run_id)
    assert not first.register_worker(run_id)  # registering again (the engine's start) begins nothing
    first.unregister_worker(run_id)
    joiner.unregister_worker(run_id)
    assert store_factory().register_worker(run_id)  # a later resume begins it again


# -- fencing ---------------------------------------------------------------------------------


def test_a_worker_that_lost_its_lease_records_nothing_and_cannot_checkpoint(stores):
    store, other = stores
    run_id = new_run(store)
    [expired] = store.claim_row_groups(run_id, 1, -1)  # expired at once
    [kept] = store.claim_row_groups(run_id, 1, 60)
    assert (expired.row_group, kept.row_group) == (0, 1)
    [taken] = other.claim_row_groups(run_id, 1, 60)
    assert (taken.row_group, taken.epoch) == (0, 2)

    lost = store.record(run_id, [started(0, "x", 0), done(0, "x", 0, "zombie"), dropped(0, 1), complete(0),
                                 started(1, "x", 0)])
    assert lost == {0} and store.lease_epoch(run_id, 0) is None
    assert other.load_row_group(run_id, 0).done == {} and other.load_row_group(run_id, 0).dropped == set()
    assert store.load_row_group(run_id, 1).attempts == {("x", 0): 0}  # row group 1 was recorded
    group = store.row_groups(run_id)[0]
    assert (group["state"], group["rows_dropped"], group["lease_owner"]) == ("active", 0, other.owner)
    assert store.checkpoint_row_group(run_id, 0, "runs/x.parquet", 0) is False

    assert other.record(run_id, [done(0, "x", 0, "new owner")]) == set()
    assert other.load_row_group(run_id, 0).done == {("x", 0): "new owner"}


def test_only_the_lease_holder_makes_its_file_current_and_its_size_and_digest_are_recorded(stores):
    a, b = stores
    run_id = new_run(a, num_records=20)
    [stale] = a.claim_row_groups(run_id, 1, -1)  # expired at once
    assert a.lease_epoch(run_id, 0) == stale.epoch == 1
    [taken] = b.claim_row_groups(run_id, 1, 60)
    assert (taken.row_group, taken.epoch) == (0, 2)
    assert b.checkpoint_row_group(run_id, 0, "runs/x/rg-000000-e2.parquet", 1, file_bytes=123, file_sha256="ab" * 32)
    assert b.lease_epoch(run_id, 0) is None  # released with the checkpoint
    assert a.checkpoint_row_group(run_id, 0, "runs/x/rg-000000-e1.parquet", 0, file_bytes=99,
                                  file_sha256="cd" * 32) is False
    assert a.lease_epoch(run_id, 0) is None
    group = b.row_groups(run_id)[0]
    assert (group["state"], group["path"], group["rows_dropped"], group["file_bytes"], group["file_sha256"]) == (
        "checkpointed", "runs/x/rg-000000-e2.parquet", 1, 123, "ab" * 32)
    # A retry of the checkpoint that made this very file current (its answer lost) is told so,
    # so the caller never removes the current file.
    assert b.checkpoint_row_group(run_id, 0, "runs/x/rg-000000-e2.parquet", 1, file_bytes=123,
                                  file_sha256="ab" * 32) is True


def test_model_usage_is_recorded_with_each_transition_and_a_zombie_adds_nothing(stores):
    store, other = stores
    run_id = new_run(store)
    store.claim_row_groups(run_id, 1, -1)
    store.claim_row_groups(run_id, 1, 60)
    other.claim_row_groups(run_id, 1, 60)  # takes row group 0 over
    usage = ("writer", 1, 10, 4, 0, 8, "stop", 0, None, None)
    lost = store.record(run_id, [done(1, "x", 0, "a", usage=usage),
                                 deferred(1, "x", 1, 1, 0.0, "429", usage=("writer", 1, 0, 0, 1, 4, None, 0, None, None)),
                                 done(1, "x", 1, "b", usage=usage), done(0, "x", 0, "zombie", usage=usage)])
    assert lost == {0}
    assert store.model_usage(run_id) == {"writer": {"requests": 3, "prompt_tokens": 20, "completion_tokens": 8,
                                                    "rate_limited": 1, "concurrency": 8, "calls_saved": 0,
                                                    "cost": None, **dict.fromkeys(PACING_KEYS)}}
    store.add_calls_saved(run_id, {("writer", "x"): 5})
    assert store.model_usage(run_id)["writer"]["calls_saved"] == 5


def test_a_run_that_ends_between_reading_its_status_and_its_workers_is_shown_ended(store_factory):
    """`status --watch` saw a run end as `interrupted`: it read `running`, then the worker
    recorded `complete` and left, then it counted no live worker."""
    from pipeline.api.reads import shown_status

    store = store_factory()
    run_id = new_run(store)
    store.register_worker(run_id)
    read_before = store.get_run(run_id)
    assert shown_status(store, read_before)[0] == "running"
    store.set_run_status(run_id, "complete")
    store.unregister_worker(run_id)
    assert shown_status(store, read_before)[0] == "complete"
    store.set_run_status(run_id, "running")  # and a running run whose worker is gone: interrupted
    assert shown_status(store, store.get_run(run_id))[0] == "interrupted"
