"""Who this process is, and whether the owner of a lease is still alive.

An owner id is ``host:pid:start:token``. ``start`` is the process's creation time (milliseconds
since the epoch, from psutil: Linux, macOS, Windows), so a recycled pid is not mistaken for the
old owner. On the same host a lease whose owner process is gone (or a zombie: killed, not yet
reaped) is free at once; leases of other hosts expire after ``lease_s``.
"""

from __future__ import annotations

import os
import secrets
import socket

import psutil

__all__ = ["make_owner_id", "owner_is_gone", "HOST"]

HOST = socket.gethostname()


def _process_start(pid: int) -> str | None:
    """The process's creation time in ms as text, or None when it is gone or a zombie."""
    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return str(int(process.create_time() * 1000))
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # alive, but not ours to inspect
        return "?"


def make_owner_id() -> str:
    pid = os.getpid()
    return f"{HOST}:{pid}:{_process_start(pid) or 0}:{secrets.token_hex(4)}"


def owner_is_gone(owner: str | None) -> bool:
    """True when ``owner`` is a process of this host that no longer runs. Owners of other hosts
    are never judged gone here (their leases expire instead)."""
    if not owner:
        return True
    parts = owner.rsplit(":", 3)
    if len(parts) != 4 or parts[0] != HOST:
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    start = _process_start(pid)
    if start is None:
        return True
    return parts[2] != "0" and start != "?" and start != parts[2]
