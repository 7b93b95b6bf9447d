"""Python's cyclic garbage collector tuned for the length of a run.

A run allocates a few container objects per task (its asyncio task, coroutine, row dict,
journal event) and frees nearly all of them at once, by reference counting. With CPython's
default thresholds (700, 10, 10) the collector still walks the young generation every 700
allocations and, every 70,000, all the objects the process holds: the modules of numpy, pandas,
SQLAlchemy and pydantic are hundreds of thousands of them. :func:`tuned` freezes what exists when
the run starts (``gc.freeze``: imports, config, plan; never collected while frozen, and garbage
then is small) and collects the young generation every 10,000 allocations instead of 700.
Measured on the no-op overhead shapes (scripts/bench.py): 15-20 % less CPU per task.

Runs may nest (several jobs on one event loop, or in threads): the first to enter tunes the
collector, the last to leave restores the thresholds it found and unfreezes.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

__all__ = ["YOUNG_THRESHOLD", "tuned"]

#: Allocations between collections of the young generation during a run (CPython's default: 700).
YOUNG_THRESHOLD = 10_000

_lock = threading.Lock()
_depth = 0
_saved: tuple[int, ...] = ()


@contextlib.contextmanager
def tuned() -> Iterator[None]:
    """Within the block, the collector is tuned for a run (module docstring); restored after."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(YOUNG_THRESHOLD, *_saved[1:])
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.set_threshold(*_saved)
                gc.unfreeze()
