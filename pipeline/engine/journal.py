"""The journal: every state change goes to the store through one writer thread, in batches.

The event loop only appends tuples to a deque (thread-safe and O(1) in CPython). The writer
thread commits what is queued as one transaction as soon as it is free (group commit): while
one commit runs, the next batch accumulates, so batches grow with the load and an event waits
about one commit (a millisecond or two on SQLite), far inside the contract's 20 ms. Batches
commit in order, so the store always holds a consistent prefix of what happened.

Anything else the engine asks of the store (claim row groups, load one, write a checkpoint)
goes through :meth:`Journal.call`, which queues the call behind the events already appended:
a row group's checkpoint therefore runs only after all its events are committed. The writer
also renews this process's leases every ``lease_s / 3``, but only while the event loop is
alive: the loop ticks once a second, and a loop that has not ticked for ``lease_s / 2`` (user
code blocking it) gets no renewal, so another worker can take its row groups over.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import tenacity

from pipeline.store.base import Store
from pipeline.store.transient import is_transient

__all__ = ["Journal"]

log = logging.getLogger("pipeline.journal")

# How long the idle writer waits before looking at the queue again: from 1 ms, doubled while
# nothing comes, up to 8 ms (the contract's commit interval is 20 ms).
_IDLE_MIN_S = 0.001
_IDLE_MAX_S = 0.008


class _Call:
    __slots__ = ("fn", "args", "future", "loop", "background")

    def __init__(self, fn, args, future, loop, background=False):
        self.fn, self.args, self.future, self.loop = fn, args, future, loop
        self.background = background


def _resolve(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class Journal:
    """Group commit of events to ``store.record``, in order, from one writer thread."""

    def __init__(self, store: Store, run_id: str, *, interval_s: float = 0.0, max_batch: int = 4000,
                 lease_s: float = 30.0, on_lost: Callable[[set[int]], None] | None = None,
                 announce: Callable[[], list[tuple]] | None = None):
        self.store = store
        self.run_id = run_id
        self.interval_s = interval_s
        self.max_batch = max_batch
        self.lease_s = lease_s
        self.on_lost = on_lost
        self.announce = announce  # events to put first in each commit (see Scheduler._announce)
        self._queue: collections.deque = collections.deque()
        self._stop = threading.Event()
        # Set by calls (awaited by the event loop: a claim, the end-of-run counts, a checkpoint)
        # and by close(), so an idle writer takes them at once instead of at its next look;
        # plain events need no signal (an append stays one deque operation).
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Slow work that must follow the commit of earlier events but must not hold up later
        # commits (a checkpoint's Parquet write and fsyncs): a kill then loses no more events.
        self._side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-checkpoint")
        self.error: BaseException | None = None
        self.events_written = 0
        self.batches = 0
        self.loop_seen = time.monotonic()  # last tick of the event loop
        self._ticker: asyncio.TimerHandle | None = None

    # -- event-loop side ------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tick()
        self._thread = threading.Thread(target=self._run, name="pipeline-journal", daemon=True)
        self._thread.start()

    @property
    def append(self) -> Callable[[tuple], None]:
        """``journal.append(event)``; bound once by callers on the hot path."""
        return self._queue.append

    def call(self, fn: Callable, *args: Any) -> asyncio.Future:
        """Run ``fn(*args)`` on the writer thread after everything queued before it."""
        fut = self._loop.create_future()
        self._queue.append(_Call(fn, args, fut, self._loop))
        self._wake.set()
        return fut

    def after_commit(self, fn: Callable, *args: Any) -> asyncio.Future:
        """Run ``fn(*args)`` on a side thread once everything queued before it is committed;
        later commits do not wait for it."""
        fut = self._loop.create_future()
        self._queue.append(_Call(fn, args, fut, self._loop, background=True))
        self._wake.set()
        return fut

    def _tick(self) -> None:
        self.loop_seen = time.monotonic()
        self._ticker = self._loop.call_later(1.0, self._tick)

    async def close(self) -> None:
        """Commit everything queued, then stop the writer."""
        if self._ticker is not None:
            self._ticker.cancel()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        if self.error is not None:
            raise self.error

    # -- writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        queue = self._queue
        next_renew = time.monotonic() + self.lease_s / 3
        idle_s = _IDLE_MIN_S
        while True:
            stopping = self._stop.is_set()
            if queue:
                # Commit as soon as the writer is free: events pile up while a commit runs, so
                # batches grow with the load and latency stays one commit (well under interval_s).
                if self.interval_s > 0 and len(queue) < self.max_batch and type(queue[0]) is not _Call:
                    time.sleep(min(self.interval_s, 0.001))  # let a few more events join the batch
                self._drain()
                idle_s = _IDLE_MIN_S
            elif stopping:
                self._side.shutdown(wait=True)  # pending checkpoints finish before close() returns
                return
            else:
                # Nothing to write: look again soon, less often the longer it stays quiet (a
                # run waiting on slow model calls should not wake this thread 1,000 times a
                # second). An event appended meanwhile waits at most _IDLE_MAX_S plus a commit;
                # a call wakes it at once.
                self._wake.wait(idle_s)
                self._wake.clear()
                idle_s = min(idle_s * 2, _IDLE_MAX_S)
            if time.monotonic() >= next_renew:
                next_renew = time.monotonic() + self.lease_s / 3
                stalled_s = time.monotonic() - self.loop_seen
                if stalled_s < max(self.lease_s / 2, 2.0):
                    self._guard(self.store.renew_leases, self.run_id, self.lease_s, report=True)
                else:
                    log.warning("the event loop has not run for %.0f s (user code blocking it?); leases "
                                "are not renewed, so other workers may take the row groups over", stalled_s)

    def _drain(self) -> None:
        queue = self._queue
        batch: list = self.announce() if self.announce is not None else []
        n = len(queue)
        for _ in range(n):
            item = queue.popleft()
            if type(item) is _Call:
                self._commit(batch)
                batch = []
                if item.background:
                    self._side.submit(self._run_call, item)
                else:
                    self._run_call(item)
            else:
                batch.append(item)
                if len(batch) >= self.max_batch:
                    self._commit(batch)
                    batch = []
        self._commit(batch)

    @staticmethod
    def _run_call(item: _Call) -> None:
        try:
            result = item.fn(*item.args)
        except BaseException as exc:  # handed to the awaiting coroutine
            item.loop.call_soon_threadsafe(_resolve, item.future, False, exc)
        else:
            item.loop.call_soon_threadsafe(_resolve, item.future, True, result)

    def _commit(self, batch: list) -> None:
        if batch:
            self._guard(self.store.record, self.run_id, batch, report=True)
            self.events_written += len(batch)
            self.batches += 1

    def _guard(self, fn: Callable, *args: Any, report: bool) -> None:
        """A transient store failure (:func:`pipeline.store.transient.is_transient`) is tried 5
        times in all, backing off 0.05 s, doubled each time. One that persists, or any other
        error (a bug: at once), is kept in ``error`` and the engine is told and stops (what was
        committed stays committed, the rest reruns on resume)."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(5), wait=tenacity.wait_exponential(multiplier=0.05),
            retry=tenacity.retry_if_exception(is_transient), reraise=True,
            after=lambda state: log.warning("state store call %s failed (attempt %d): %s", fn.__name__,
                                            state.attempt_number, state.outcome.exception()))
        try:
            lost = retrying(fn, *args)
        except Exception as exc:
            if not is_transient(exc):
                log.error("state store call %s failed: %s: %s", fn.__name__, type(exc).__name__, exc)
            self.error = exc
            if self.on_lost is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(self.on_lost, None)
            return
        if report and lost and self.on_lost is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_lost, set(lost))
