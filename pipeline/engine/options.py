"""The scheduler's knobs, its counters, and the optional per-task trace."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunStats", "SchedulerOptions", "TaskTrace"]


@dataclass
class SchedulerOptions:
    max_concurrent_row_groups: int = 3
    max_in_flight_tasks: int = 256
    salvage_max_rounds: int = 2
    retry_backoff_s: float = 0.5
    shutdown_error_rate: float = 0.5
    shutdown_error_window: int = 100
    lease_s: float = 30.0
    model_down_s: float = 120.0  # a model answering nothing (or only 429s) this long stops the run
    # 0: the journal commits as soon as its writer is free (batches grow while a commit runs).
    # A positive value naps up to 1 ms before each commit to gather events: measured, it only
    # halved the commit rate and doubled what a kill loses, at no gain in throughput.
    commit_interval_s: float = 0.0
    grace_s: float = 5.0
    poll_s: float = 0.5
    threads: int = 0  # 0: min(32, max_in_flight_tasks)
    trace: bool = False
    #: False for a run nobody can resume (a preview): stop messages then give no resume advice.
    resumable: bool = True

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> "SchedulerOptions":
        names = [f for f in cls.__dataclass_fields__ if hasattr(settings, f)]
        opts = cls(**{n: getattr(settings, n) for n in names})
        for k, v in overrides.items():
            setattr(opts, k, v)
        return opts


@dataclass(slots=True)
class TaskTrace:
    """One task attempt of a traced run; times are ``time.perf_counter()`` seconds, ``status``
    one of ok / deferred / rate_limited / failed / cancelled (see ``task_traces``)."""

    column: str
    row_group: int
    row_index: int | None
    task_type: str
    dispatched_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    status: str = ""
    error: str | None = None


@dataclass
class RunStats:
    tasks_done: int = 0
    tasks_failed: int = 0
    tasks_deferred: int = 0
    records_dropped: int = 0
    row_groups_checkpointed: int = 0
    started_at: float = field(default_factory=time.monotonic)
