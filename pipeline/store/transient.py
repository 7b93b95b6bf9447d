"""Which failures of the state store (and of the files beside it) are worth trying again.

The one place that says so, for the retry loops (tenacity) of the journal, the checkpoints and
schema migrations. Transient:

- ``OSError``: a full disk, an I/O error, a file that another process holds;
- SQLAlchemy's ``OperationalError`` (SQLite busy or locked, a lost PostgreSQL connection, a lock
  or statement timeout, a serialization failure, a deadlock), any ``DBAPIError`` that
  invalidated its connection, and the pool's ``TimeoutError``.

Either raised as it is or as the ``__cause__`` of a :class:`~pipeline.errors.StoreError` (the
SQL store translates driver errors at its boundary). Everything else (a ``TypeError``, an
``IntegrityError``, a ``ProgrammingError``, a StoreError of the store's own) is a bug or a fact
that another try does not change: it surfaces at once.

SQLAlchemy is not imported here (the engine on the in-memory store never loads it): while it is
not loaded, no error can be one of its.
"""

from __future__ import annotations


from pipeline.errors import StoreError
from pipeline.loaded import loaded

__all__ = ["is_transient"]


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or, for a StoreError, its cause) is worth another try; see above."""
    if isinstance(exc, StoreError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, OSError):
        return True
    sa_exc = loaded("sqlalchemy.exc")
    if sa_exc is None:
        return False
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.TimeoutError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)
