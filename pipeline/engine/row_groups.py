"""This worker's row groups: claimed from the store, admitted (new, or rebuilt from what the store
recorded: a resume or a takeover), finished into a checkpoint once their events are committed, and
abandoned when their lease goes to another worker.

At most ``max_concurrent_row_groups`` are live; finished ones waiting for their checkpoint still
hold their values, so past as many of those admission waits too, and memory stays flat even if the
disk is slow. A checkpoint that fails gives its lease back: admission claims the row group again
(a new epoch), replays its recorded values and tries once more; one that fails
:attr:`RowGroups.CHECKPOINT_ROUNDS` rounds stops the run, resumably.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.engine.buffer import RowGroupBuffer
from pipeline.engine.checkpoints import write_checkpoint
from pipeline.engine.failures import describe
from pipeline.engine.journal import Journal
from pipeline.engine.options import RunStats, SchedulerOptions
from pipeline.engine.stateful import StatefulLanes
from pipeline.engine.tracker import Plan, RowGroupTracker
from pipeline.states import RowGroupState
from pipeline.store.base import RowGroupClaim, Store
from pipeline.store.events import Completed
from pipeline.surface import command

__all__ = ["Ready", "RowGroup", "RowGroups"]

log = logging.getLogger("pipeline.scheduler")

#: A task ready to run: (generator's plan index, row; None for a batch task).
Ready = tuple[int, int | None]


@dataclass(slots=True, eq=False)  # eq=False: compared and hashed by identity, as a live object
class RowGroup:
    """A live row group: which of its tasks are left (``tracker``) and its values (``buffer``)."""

    id: int
    tracker: RowGroupTracker
    buffer: RowGroupBuffer
    dead: bool = False  # finished or abandoned (lease lost): late results are ignored
    #: Its tasks in flight. A row group finishes when it has no task left *and* none running: a
    #: cell still running on a record dropped meanwhile is recorded all the same, so that
    #: `pipeline retry` does not pay for it again.
    running: int = 0


class RowGroups:
    """Owns :attr:`live` (``{row group: RowGroup}``) and the checkpoints under way.

    ``admitted(rg, ready, loaded)`` is told of each row group admitted, with its ready tasks and
    what the store recorded of it (None for a new one); ``pump()`` after each round of admissions;
    ``fail(reason, advice)`` ends the run 'failed'; ``stopping()`` says whether it is ending."""

    #: A checkpoint that fails this many rounds (of 3 attempts each) stops the run, resumably.
    CHECKPOINT_ROUNDS = 3

    def __init__(self, plan: Plan, store: Store, journal: Journal, run_id: str, *, row_group_size: int,
                 home: str, opts: SchedulerOptions, stats: RunStats, stateful: StatefulLanes | None,
                 stopping: Callable[[], bool], admitted: Callable[[RowGroup, list[Ready], Any], None],
                 pump: Callable[[], None], fail: Callable[[str, str], None]) -> None:
        self.plan, self.store, self.journal, self.run_id = plan, store, journal, run_id
        self.row_group_size, self.home, self.opts, self.stats = row_group_size, home, opts, stats
        self._stateful = stateful
        self._stopping, self._admitted, self._pump, self._fail = stopping, admitted, pump, fail
        self._append = journal.append
        self.live: dict[int, RowGroup] = {}
        #: Set when a row group leaves (finished, abandoned) or a checkpoint ends: room to admit.
        self.wake = asyncio.Event()
        self._checkpoints: set[asyncio.Future] = set()
        self._checkpoint_rounds: dict[int, int] = {}  # row group -> failed checkpoint rounds

    async def admission(self) -> bool:
        """Claim and admit row groups while there is room, until every row group of the run is
        checkpointed (returns True) or the run is stopping (returns False)."""
        opts = self.opts
        loop = asyncio.get_running_loop()
        # When a claim finds fewer row groups than it asks for, every row group of the run
        # exists and the rest are leased or checkpointed: claiming again as each of ours ends
        # only costs a write transaction (and, after the last, the end of the run). Until
        # poll_s has passed (a lapsed or released lease of another worker), admission skips it.
        exhausted_at: float | None = None
        while not self._stopping():
            # Finished row groups waiting for their checkpoint still hold their values: past a
            # bound, admission waits for them, so memory stays flat even if the disk is slow.
            backlog = len(self._checkpoints) >= opts.max_concurrent_row_groups
            need = 0 if backlog else opts.max_concurrent_row_groups - len(self.live)
            if exhausted_at is not None and loop.time() - exhausted_at < opts.poll_s:
                need = 0
            claims: list[RowGroupClaim] = []
            if need > 0:
                claims = await self.journal.call(self.store.claim_row_groups, self.run_id, need, opts.lease_s)
                exhausted_at = loop.time() if len(claims) < need else None
                waiting = [c.row_group for c in claims]
                try:
                    for claim in claims:
                        loaded = None
                        if claim.state != RowGroupState.PENDING:
                            loaded = await self.journal.call(self.store.load_row_group, self.run_id, claim.row_group)
                        if self._stopping():
                            break
                        waiting.remove(claim.row_group)
                        self._admit(claim, loaded)
                finally:  # claimed, never admitted (a stop, or a row group that cannot be loaded)
                    if waiting:
                        self.journal.call(self.store.release_row_groups, self.run_id, waiting)
                self._pump()
            if not self.live and not claims and not backlog:
                if self._checkpoints:
                    await asyncio.wait(list(self._checkpoints))
                groups = await self.journal.call(self.store.row_group_counts, self.run_id)
                if groups[RowGroupState.CHECKPOINTED] == groups["total"]:  # row groups not created yet count
                    return True
                await asyncio.sleep(opts.poll_s)  # the rest is leased by other workers
                continue
            self.wake.clear()
            if backlog or len(self.live) >= opts.max_concurrent_row_groups or not claims:
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=None if claims else opts.poll_s)
                except asyncio.TimeoutError:
                    pass
        return False

    def _admit(self, claim: RowGroupClaim, loaded: Any) -> None:
        plan, n = self.plan, claim.num_rows
        tracker = RowGroupTracker(plan, n)
        buffer = RowGroupBuffer(claim.row_group, claim.row_group * self.row_group_size, n, plan.columns)
        rg = RowGroup(claim.row_group, tracker, buffer)
        self.live[rg.id] = rg
        ready: list[Ready] = []
        if loaded is None:
            tracker.initial(ready)
        else:
            ready = self._restore(rg, loaded)
        self._admitted(rg, ready, loaded)
        self.finish_if_done(rg)

    def _restore(self, rg: RowGroup, loaded: Any) -> list[Ready]:
        """Rebuild a row group's values and progress from what the store recorded (resume or
        takeover); returns the tasks that are ready."""
        index, nodes = self.plan.index, self.plan.nodes
        done: set[tuple[int, int | None]] = set()
        for (name, r), value in loaded.done.items():
            j = index.get(name)
            if j is None:
                continue
            done.add((j, r))
            rg.buffer.restore(nodes[j].outputs, r, value)
        return rg.tracker.replay(lambda j, r: (j, r) in done, loaded.dropped)

    def finish_if_done(self, rg: RowGroup) -> None:
        """Once ``rg`` has no task left and none running: recorded ``complete``, and
        checkpointed once that is committed."""
        if rg.dead or rg.running or rg.tracker.outstanding:
            return
        rg.dead = True
        del self.live[rg.id]
        if self._stateful is not None:
            self._stateful.finished(rg.id)
        self._append(Completed(rg.id))
        fut = self.journal.after_commit(self._checkpoint, rg)
        self._checkpoints.add(fut)
        fut.add_done_callback(functools.partial(self._checkpointed, rg.id))
        self.wake.set()

    def _checkpointed(self, rg_id: int, fut: asyncio.Future) -> None:
        self._checkpoints.discard(fut)
        self.wake.set()
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            self._checkpoint_rounds.pop(rg_id, None)
            if fut.result():
                self.stats.row_groups_checkpointed += 1
            return
        # It stays 'complete'. Giving its lease back lets admission claim it again (a new epoch),
        # replay its recorded values and try once more (a resume would do the same); a cause
        # that lasts (a full disk, the folder replaced by a file) stops the run after a few
        # rounds instead of retrying for ever.
        self.journal.call(self.store.release_row_groups, self.run_id, [rg_id])
        rounds = self._checkpoint_rounds[rg_id] = self._checkpoint_rounds.get(rg_id, 0) + 1
        if rounds < self.CHECKPOINT_ROUNDS:
            log.error("%s; will try again (round %d of %d)", exc, rounds, self.CHECKPOINT_ROUNDS)
        else:
            self._fail(str(exc), f"; fix the cause, then {command('resume', self.run_id)}")

    def _checkpoint(self, rg: RowGroup) -> bool:
        """On a side thread, after all the row group's events are committed: its file, made
        current under the lease (:func:`pipeline.engine.checkpoints.write_checkpoint`)."""
        live = rg.tracker.live_rows()  # none when every record was dropped: an empty file
        return write_checkpoint(self.store, self.run_id, self.home, rg.id,
                                lambda: rg.buffer.table(self.plan.columns, live), rg.tracker.n_dropped, describe)

    def lost(self, row_groups: set[int]) -> None:
        """The leases on ``row_groups`` went to other workers: those live here are abandoned."""
        for rg_id in row_groups:
            rg = self.live.pop(rg_id, None)
            if rg is not None:
                log.warning("lost the lease on row group %d to another worker; abandoning it", rg_id)
                rg.dead = True
                if self._stateful is not None:
                    self._stateful.lost(rg_id)
        self.wake.set()

    def give_back(self) -> None:
        """This worker leaves: the leases of its live row groups go back to the store (finished
        ones have left :attr:`live` already)."""
        if self.live:
            self.journal.call(self.store.release_row_groups, self.run_id, list(self.live))
