"""Who this process is, and whether the owner of a lease is still alive.

An owner id is ``host:pid:start:token``. ``start`` is the process start time (clock ticks since
boot, from /proc), so a recycled pid is not mistaken for the old owner. On the same host a lease
whose owner process is gone is free at once; leases of other hosts expire after ``lease_s``.
"""

from __future__ import annotations

import os
import secrets
import socket

__all__ = ["make_owner_id", "owner_is_gone", "HOST"]

HOST = socket.gethostname()


def _process_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields resume after the last ')'.
    rest = stat.rsplit(")", 1)[-1].split()
    if not rest or rest[0] in ("Z", "X"):  # field 3, the state: a killed child not yet reaped is gone
        return None
    return rest[19] if len(rest) > 19 else None  # field 22: starttime


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
    if start is None:  # no /proc entry: gone on Linux; elsewhere ask the kernel
        return True if os.path.isdir("/proc/self") else not _pid_alive(pid)
    return parts[2] != "0" and start != parts[2]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
