"""Calling a function that runs an event loop of its own (``asyncio.Runner``) from code whose own
event loop may be running (a Jupyter notebook, an async program), where it could not start."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["off_the_loop"]


def off_the_loop(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` here, or in a worker thread when this thread's event loop is running
    (``fn`` runs a loop of its own, which cannot start inside another)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-loop") as pool:
        return pool.submit(fn, *args).result()
