"""SQLite specifics of the SQL store: connection setup, transactions, the read-only connection."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import NullPool

from pipeline.errors import ReadOnlyQueryError, StoreError
from pipeline.store.schema import ON_CONFLICT_FULL, ON_CONFLICT_STATE

__all__ = ["READ_ONLY", "create_engine", "create_read_only_engine", "read_query", "upsert_tasks"]

#: Execution option of the store's reading transactions: a plain (deferred) BEGIN, so that a
#: `status` in the main thread never waits for the write lock.
READ_ONLY = {"pipeline_read_only": True}

BUSY_TIMEOUT_MS = 30_000

# PRAGMAs that only read a table's or index's layout; every other PRAGMA with an argument may
# change how the database is written (journal_mode, query_only, writable_schema, ...).
_INTROSPECTION_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
     "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check"}
)


def _prepare_path(url: URL) -> None:
    database = url.database
    if not database or database == ":memory:" or url.query.get("mode") == "memory":
        raise StoreError(
            f"the state store must be a file, not an in-memory SQLite database ({url}); "
            "use sqlite:///path/to/state.db"
        )
    if not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _setup_connection(dbapi_connection: sqlite3.Connection) -> None:
    # Take transaction control away from the sqlite3 module (it would BEGIN lazily, DEFERRED,
    # and only before DML); SQLAlchemy's "begin" event below emits our own BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: the PRAGMAs below may themselves wait for another process.
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # WAL: readers (`sqlite3 state.db "select * from column_progress"` every 100 ms, the
        # API's status calls) read a snapshot and never block the writer, nor it them.
        cursor.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL syncs at checkpoints, not at each commit: a committed transaction
        # survives the crash or SIGKILL of the process (the contract's durability), and only
        # an OS crash or power cut may lose the last commits, never corrupting the file.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        # The live row groups' task rows and their key index outgrow the default 2 MB page
        # cache; 64 MB (allocated as used) keeps upserts and compaction deletes in memory.
        cursor.execute("PRAGMA cache_size = -65536")
        # The WAL file is reset after checkpoints, and kept at most this large (bytes).
        cursor.execute("PRAGMA journal_size_limit = 67108864")
    finally:
        cursor.close()


def create_engine(url: URL) -> Engine:
    """An Engine (a pool of connections) on a SQLite file, set up for several writers."""
    _prepare_path(url)
    engine = sa.create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        _setup_connection(dbapi_connection)

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        # Writers take the write lock up front (BEGIN IMMEDIATE) and wait for it under
        # busy_timeout. A DEFERRED transaction that reads and then writes would have to upgrade
        # its read lock; if another process committed in between, SQLite fails it at once with
        # SQLITE_BUSY (busy_timeout does not help), and two such writers can deadlock. Under
        # WAL, readers in other processes never block this writer.
        if connection.get_execution_options().get("pipeline_read_only"):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _authorize(action, arg1, arg2, _db, _trigger):
    if action == sqlite3.SQLITE_PRAGMA and arg2 is not None and arg1 not in _INTROSPECTION_PRAGMAS:
        return sqlite3.SQLITE_DENY
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def create_read_only_engine(url: URL) -> Engine:
    """An Engine whose connections cannot write: for `pipeline sql`."""
    _prepare_path(url)
    engine = sa.create_engine(url, poolclass=NullPool)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        dbapi_connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        dbapi_connection.execute("PRAGMA query_only = ON")
        # query_only still lets PRAGMAs such as journal_mode change the file, and ATTACH create
        # one; the authorizer refuses those.
        dbapi_connection.set_authorizer(_authorize)

    return engine


def read_query(engine: Engine, sql: str) -> tuple[list[str], list[tuple]]:
    """Run one statement of `pipeline sql` on a connection of ``create_read_only_engine``."""
    try:
        with engine.connect() as conn:
            # The raw cursor: the statement reaches SQLite as written, with no parsing of ':'.
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                cursor.execute(sql)
                if cursor.description is None:
                    return [], []
                return [d[0] for d in cursor.description], [tuple(r) for r in cursor.fetchall()]
            finally:
                cursor.close()
    except (sqlite3.Error, sa_exc.DBAPIError) as exc:
        orig = getattr(exc, "orig", exc)
        # SQLITE_READONLY: query_only refused a write; SQLITE_AUTH: the authorizer did.
        if getattr(orig, "sqlite_errorname", None) in ("SQLITE_READONLY", "SQLITE_AUTH"):
            raise ReadOnlyQueryError(
                f"`pipeline sql` only reads the state store; SQLite refused this statement because "
                f"it would write ({orig}): {sql.strip()[:200]}"
            ) from exc
        raise StoreError(f"the query failed: {orig}") from exc


# The journal's upserts, in the driver's own SQL: executemany over plain tuples is the fastest
# path from Python to SQLite. A STARTED or DONE leaves attempts, next_eligible_at and last_error
# as they are (a resumed task keeps counting its attempts); DEFERRED and FAILED set them.
_UPSERT_STATE = (
    "INSERT INTO tasks (run_id, row_group, column_name, slot, row_index, task_type, state, "
    "value, updated_at, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0) "
    + ON_CONFLICT_STATE
)
_UPSERT_FULL = (
    "INSERT INTO tasks (run_id, row_group, column_name, slot, row_index, task_type, state, "
    "value, updated_at, attempts, next_eligible_at, last_error) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    + ON_CONFLICT_FULL
)


def upsert_tasks(connection: Connection, run_id: str, now: float, plain: list[tuple], full: list[tuple]) -> None:
    """Write coalesced task rows: ``plain`` rows are (run_id, row_group, generator, slot,
    row_index, task_type, state, value, now); ``full`` rows add (attempts, next_eligible_at,
    last_error)."""
    if plain:
        connection.exec_driver_sql(_UPSERT_STATE, plain)
    if full:
        connection.exec_driver_sql(_UPSERT_FULL, full)
