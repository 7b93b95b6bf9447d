"""The state store: the :class:`~pipeline.store.base.Store` protocol and its implementations.

``open_store(url)`` opens the SQL store (SQLite file or PostgreSQL) and makes sure its schema is
current (a SQLite file is upgraded; an out-of-date PostgreSQL database is refused: `pipeline db
upgrade` upgrades it). SQLAlchemy is imported only when a SQL store is opened, so that the engine and the
in-memory store do not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from pipeline.store.sql import SqlStore

__all__ = ["SqlStore", "open_store", "parse_url"]


def parse_url(url: "str | URL") -> "URL":
    """``url`` as a SQLAlchemy URL (parsed with ``make_url``, never sliced); StoreError for text
    that is not one."""
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import make_url

    from pipeline.errors import StoreError

    try:
        return make_url(url)
    except sa_exc.ArgumentError as exc:
        raise StoreError(f"not a database URL: {url!r} ({exc}); use sqlite:///path/to/state.db "
                         "or postgresql://user@host/db") from exc


def open_store(url: "str | URL", *, upgrade: bool | None = None, owner: str | None = None) -> "SqlStore":
    """Open the state store at ``url`` (``sqlite:///path/state.db`` or ``postgresql://...``).

    SQLite: the file's folder is created, and its schema upgraded to this code's head (under a
    lock, so that workers starting together do not race). PostgreSQL: an empty database gets
    the schema; one at an older revision raises StoreError naming ``pipeline db upgrade`` (a
    shared database is upgraded on purpose, not by whichever worker opens it first).
    ``upgrade=True`` upgrades either; ``upgrade=False`` refuses either when not at head. A
    database migrated by a newer `pipeline` raises StoreError either way.
    """
    from pipeline.store.migrate import ensure_schema
    from pipeline.store.sql import SqlStore

    store = SqlStore(url, owner=owner)
    try:
        ensure_schema(store.engine, upgrade=upgrade)
    except BaseException:
        store.close()
        raise
    return store


def __getattr__(name: str):
    if name == "SqlStore":
        from pipeline.store.sql import SqlStore

        return SqlStore
    raise AttributeError(f"module 'pipeline.store' has no attribute {name!r}")
