"""What the parts of :class:`pipeline.store.sql.SqlStore` share: the attributes it sets up, the
translation of driver errors, and a few small queries."""

from __future__ import annotations

import functools
import threading
from typing import Callable

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from pipeline.errors import StoreError
from pipeline.store import schema

__all__ = ["SqlParts", "WORKER_HEARTBEAT_FRESH_S", "translate_errors"]

#: A worker of another host counts as live while its heartbeat is younger than this.
WORKER_HEARTBEAT_FRESH_S = 60.0


def translate_errors(method):
    """Driver errors leave the store as StoreError, with the database's message."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sa_exc.DBAPIError as exc:
            raise StoreError(f"state store error ({self.url_text}): {exc.orig}") from exc

    return wrapper


class SqlParts:
    """The state every part of SqlStore reads; :meth:`SqlStore.__init__` sets it."""

    owner: str
    row_group_batch: int
    url_text: str  # the URL without its password, for messages
    _engine: Engine
    _reader: Engine  # the same pool, for reading transactions (plain BEGIN on SQLite)
    _pg: bool  # PostgreSQL, not SQLite
    _epochs: dict[tuple[str, int], int]  # (run_id, row_group) -> the epoch of our claim
    _lock: threading.Lock  # guards _epochs
    _upsert_tasks: Callable  # sqlite.upsert_tasks or postgres.upsert_tasks

    @staticmethod
    def _has_run(conn: Connection, run_id: str) -> bool:
        runs = schema.runs
        return conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id == run_id)).first() is not None
