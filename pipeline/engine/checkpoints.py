"""A row group's checkpoint: its Parquet file, written on a side thread once all its events are
committed, and made current by the store under the lease (:meth:`Store.checkpoint_row_group`).

The file's name carries this worker's lease epoch (``rg-000012-e3.parquet``): a stale worker's
file can never be mistaken for the row group's, and readers use only ``row_groups.path``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable

import tenacity

from pipeline.engine.buffer import write_parquet_atomic
from pipeline.store.transient import is_transient

__all__ = ["ATTEMPTS", "write_checkpoint"]

log = logging.getLogger("pipeline.scheduler")

#: Attempts of one checkpoint (backing off 0.1, then 0.2 s) before it is left to the scheduler.
ATTEMPTS = 3


def write_checkpoint(store: Any, run_id: str, home: str, rg_id: int, table: Callable[[], Any], n_dropped: int,
                     describe: Callable[[BaseException], str]) -> bool:
    """Write row group ``rg_id``'s file (``table()``: its live records as an Arrow table) under
    a name that carries this worker's lease epoch (temporary name, fsync, rename), then make it
    current through ``checkpoint_row_group``, whose transaction checks the lease and records the
    path, size and digest. A worker that lost the lease writes nothing, or removes the file it
    wrote. Once current, files of older epochs of the row group go.

    Returns False when the lease was lost; raises OSError after :data:`ATTEMPTS` attempts that
    failed for a transient cause (:func:`pipeline.store.transient.is_transient`: a full disk, a
    busy database; the scheduler gives the lease back and tries again later). Any other error (a
    bug) is raised at once, as it is."""
    epoch = store.lease_epoch(run_id, rg_id)
    if epoch is None:
        return False  # lost already: another worker owns the row group now
    folder = os.path.join(home, "runs", run_id, "row_groups")
    name = f"rg-{rg_id:06d}-e{epoch}.parquet"
    path = os.path.join(folder, name)

    def attempt() -> bool:
        size, digest = write_parquet_atomic(table(), path)
        return store.checkpoint_row_group(run_id, rg_id, os.path.join("runs", run_id, "row_groups", name),
                                          n_dropped, file_bytes=size, file_sha256=digest)

    # A full disk, a busy database: try again, then leave it to the scheduler. A bug: at once.
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(ATTEMPTS), wait=tenacity.wait_exponential(multiplier=0.1),
        retry=tenacity.retry_if_exception(is_transient), reraise=True,
        after=lambda state: log.warning("checkpoint of row group %d failed (attempt %d): %s", rg_id,
                                        state.attempt_number, state.outcome.exception()))
    try:
        current = retrying(attempt)
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise OSError(f"could not write the checkpoint of row group {rg_id} to {path}: {describe(exc)}") from exc
    # Ours is current: older epochs' files (a stale worker's, a damaged one) go. Not ours: the
    # lease was taken over, and our file must never be mistaken for the row group's. Names of
    # other epochs only: never the current file.
    for gone in ([f"rg-{rg_id:06d}-e{e}.parquet" for e in range(1, epoch)] + [f"rg-{rg_id:06d}.parquet"]
                 if current else [name]):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, gone))
    return current
