"""Checks of a run's checkpointed row-group files against what their checkpoints recorded (size,
SHA-256), without reading them as tables: `status` stats every file, so this module imports
nothing heavy (pyarrow and pandas stay with :mod:`pipeline.dataset`, which reads them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.states import RowGroupState
from pipeline.surface import command, flag

__all__ = ["check_files", "content_problem", "damage_message", "os_problem"]


def check_files(home: Path, groups: list[dict], *, digest: bool = False) -> list[dict]:
    """The checkpointed row groups whose file is missing or does not match its checkpoint, as
    ``[{"row_group", "path" (absolute), "problem"}]``. Without ``digest`` a stat per file
    (existence and size: cheap enough for ``status``); with it, the SHA-256 of every file too."""
    damaged = []
    for g in groups:
        if g["state"] != RowGroupState.CHECKPOINTED or not g["path"]:
            continue
        path = home / g["path"]
        try:
            size = path.stat().st_size
            problem = None
            if g.get("file_bytes") is not None and size != g["file_bytes"]:
                problem = f"{size} bytes, its checkpoint recorded {g['file_bytes']}"
            elif digest and g.get("file_sha256"):
                problem = content_problem(path.read_bytes(), g)
        except OSError as exc:
            problem = os_problem(exc)
        if problem is not None:
            damaged.append({"row_group": g["row_group"], "path": str(path), "problem": problem})
    return damaged


def damage_message(run_id: str, damaged: list[dict], home: Path) -> str:
    """Why an export or resume of ``run_id`` stopped. When every file is missing and ``home`` has no folder
    of the run at all, the likelier cause is a wrong home (a run made with ``--db`` and another
    ``--home``, or none): the message says so before offering to compute them again."""
    files = "; ".join(f"row group {d['row_group']}: {d['path']} ({d['problem']})" for d in damaged[:5])
    more = f"; and {len(damaged) - 5} more" if len(damaged) > 5 else ""
    repair = f"{command('resume', run_id, '--repair', 'repair=True')} computes them again"
    if all(d["problem"] == "missing" for d in damaged) and not (home / "runs" / run_id).exists():
        repair = (f"there is no folder {home / 'runs' / run_id}: if the run was made with another home, give that "
                  f"one ({flag('--home DIR', 'home=')}); if the files are gone, {repair}")
    return f"run {run_id}: {len(damaged)} checkpointed row-group file(s) missing or damaged: {files}{more}. {repair}"


def os_problem(exc: OSError) -> str:
    return "missing" if isinstance(exc, FileNotFoundError) else f"unreadable: {exc.strerror or exc}"


def content_problem(data: bytes, group: dict) -> str | None:
    if group.get("file_bytes") is not None and len(data) != group["file_bytes"]:
        return f"{len(data)} bytes, its checkpoint recorded {group['file_bytes']}"
    if group.get("file_sha256") and hashlib.sha256(data).hexdigest() != group["file_sha256"]:
        return "its content differs from its checkpoint (SHA-256)"
    return None
