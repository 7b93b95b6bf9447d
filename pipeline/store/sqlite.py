"""SQLite specifics of the SQL store: connection setup, transactions, `pipeline sql`'s read-only connection."""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine

from pipeline.errors import ReadOnlyQueryError, StoreError
from pipeline.store.schema import ON_CONFLICT_FULL, ON_CONFLICT_STATE
from pipeline.surface import flag

__all__ = ["READ_ONLY", "READ_QUERY_TIMEOUT_S", "create_engine", "read_only_fallback", "read_query", "sqlite_file",
           "unwritable_folder", "upsert_tasks"]

#: Execution option of the store's reading transactions: a plain (deferred) BEGIN, so that a
#: `status` in the main thread never waits for the write lock.
READ_ONLY = {"pipeline_read_only": True}

BUSY_TIMEOUT_MS = 30_000


def _prepare_path(url: URL) -> None:
    path = sqlite_file(url)
    if path is None:
        raise StoreError(
            f"the state store must be a file, not an in-memory SQLite database ({url}); "
            "use sqlite:///path/to/state.db"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            reason += ": a file is in the way of a folder on that path"
        where = flag("--db or --home", "db= or home=")
        raise StoreError(f"cannot create the folder {path.parent} of the state store {path}: {reason}; "
                         f"put the state store in a folder you can write ({where})") from exc


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


# What the authorizer of `pipeline sql` allows: reading tables and views, calling functions (but
# those of readonly.REFUSED_FUNCTIONS), recursive CTEs, and the PRAGMAs of readonly.READ_PRAGMAS
# and readonly.INTROSPECTION_PRAGMAS. Everything else is denied before it runs: writes, DDL,
# transactions, ATTACH (which would create a file, as VACUUM INTO does through it), ... An
# allowlist, so that a kind of statement SQLite adds later is refused until someone looks at it.
_ALLOWED_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE})
#: `pipeline sql` stops a query after this long (seconds); the same bound as PostgreSQL's.
READ_QUERY_TIMEOUT_S = 300.0


def _authorize(action, arg1, arg2, _db, _trigger):
    if action in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:
        from pipeline.store import readonly  # loaded by read_query already

        return sqlite3.SQLITE_DENY if readonly.refused_function(arg2 or "") else sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master":
        # Asked while SQLite sets up a table-valued PRAGMA (SELECT * FROM pragma_table_info(...)).
        # sqlite_master cannot be written without PRAGMA writable_schema, which is denied, and
        # the file is open read-only besides.
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        from pipeline.store import readonly

        allowed = readonly.READ_PRAGMAS if arg2 is None else readonly.INTROSPECTION_PRAGMAS
        return sqlite3.SQLITE_OK if (arg1 or "").lower() in allowed else sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_DENY


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL (``sqlite:///path`` or a ``file:`` URI with ``uri=true``); None
    for an in-memory database."""
    database = url.database
    if not database or database == ":memory:" or url.query.get("mode") == "memory":
        return None
    if database.startswith("file:"):
        path = urllib.parse.unquote(urllib.parse.urlsplit(database).path)
        return Path(path) if path and path != ":memory:" else None
    return Path(database)


def _read_only_uri(url: URL) -> str:
    """A ``file:`` URI that opens the store read-only (``mode=ro``), built from the path, so
    that '%', '?' and '#' in folder names stay part of the path."""
    path = sqlite_file(url)
    if path is None:
        raise StoreError(f"the state store must be a file, not an in-memory SQLite database ({url})")
    immutable = "&immutable=1" if url.query.get("immutable") == "1" else ""
    return f"{path.absolute().as_uri()}?mode=ro{immutable}"


def read_only_fallback(url: URL, error: BaseException) -> URL | None:
    """How a command that only reads may still read a SQLite store that could not be opened
    (``error``), or None when that is not why it failed.

    A store in WAL mode is read through its ``-shm`` file, which SQLite creates beside
    ``state.db`` when it is not there: in a folder that cannot be written (a read-only mount, a
    backup, another user's home) opening fails with "unable to open database file". When no
    ``-wal`` file holds transactions (none there, or empty: the last process closed the store),
    ``state.db`` is the whole store, and it is opened ``mode=ro&immutable=1``: no ``-shm``, no
    locks (nothing can write a folder that nobody can write). When a ``-wal`` file holds
    transactions that ``state.db`` does not have yet, reading ``state.db`` alone would give an
    out-of-date store: StoreError saying why and what to do."""
    path = sqlite_file(url)
    if path is None or "unable to open database file" not in str(error) or not path.is_file():
        return None
    folder = path.parent
    if os.access(folder, os.W_OK):
        return None
    wal = path.with_name(path.name + "-wal")
    try:
        pending = wal.stat().st_size > 0
    except FileNotFoundError:
        pending = False
    except OSError:
        pending = True
    if pending:
        raise StoreError(
            f"cannot read the state store {path}: its folder {folder} cannot be written, and SQLite must create "
            f"{path.name}-shm beside it to read the transactions still in {wal.name}; copy the folder (with "
            f"{wal.name}) to a place you can write and point {flag('--home/--db', 'home=/db=')} there, or open it "
            "once where it can be written (the last process to close the store folds the -wal file in)")
    return URL.create("sqlite", database=path.absolute().as_uri(),
                      query={"uri": "true", "mode": "ro", "immutable": "1"})


def unwritable_folder(url: URL, error: BaseException) -> StoreError | None:
    """For a command that writes: the StoreError that says why a SQLite store could not be opened
    when the reason is its folder (SQLite keeps ``-wal`` and ``-shm`` files beside the store),
    else None."""
    path = sqlite_file(url)
    if path is None or "unable to open database file" not in str(error) or not path.parent.is_dir():
        return None
    if os.access(path.parent, os.W_OK):
        return None
    return StoreError(
        f"cannot open the state store {path} to write it: its folder {path.parent} cannot be written (SQLite "
        f"keeps {path.name}-wal and {path.name}-shm beside it); run this where the folder can be written, or copy "
        f"the folder to a place you can write and point {flag('--home/--db', 'home=/db=')} there (commands that "
        "only read, such as status, runs, sql and export, also read a read-only copy)")


def read_query(url: URL, sql: str, *, timeout_s: float = READ_QUERY_TIMEOUT_S) -> tuple[list[str], list[tuple]]:
    """Run one statement of `pipeline sql` (checked by :mod:`pipeline.store.readonly`) on a
    connection that cannot write: the file opened ``mode=ro``, ``PRAGMA query_only``, extension
    loading off, and an authorizer that allows reads only. Stopped after ``timeout_s``.
    ReadOnlyQueryError for a statement refused, StoreError for any other failure."""
    from pipeline.store import readonly  # sqlparse: only `pipeline sql` pays for it

    statement = readonly.single_read_statement(sql, "sqlite")
    deadline = time.monotonic() + timeout_s
    try:
        connection = sqlite3.connect(_read_only_uri(url), uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the state store {url} to read it: {exc}") from exc
    try:
        if hasattr(connection, "enable_load_extension"):  # absent when built without it
            connection.enable_load_extension(False)
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA query_only = ON")
        connection.set_authorizer(_authorize)
        # Called every few thousand steps of the virtual machine: a non-zero answer interrupts.
        connection.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        # execute() runs one statement and refuses a text holding more.
        cursor = connection.execute(statement)
        if cursor.description is None:
            return [], []
        return [d[0] for d in cursor.description], [tuple(r) for r in cursor.fetchall()]
    except sqlite3.Error as exc:
        name = getattr(exc, "sqlite_errorname", None)
        if name in ("SQLITE_READONLY", "SQLITE_AUTH") or "not authorized" in str(exc):
            raise ReadOnlyQueryError(
                f"`pipeline sql` only reads the state store; SQLite refused this statement because "
                f"it would write or is not allowed ({exc}): {sql.strip()[:200]}"
            ) from exc
        if name == "SQLITE_INTERRUPT":
            raise StoreError(f"the query ran longer than {timeout_s:g} s and was stopped; narrow it "
                             f"(a WHERE on run_id, a LIMIT)") from exc
        raise StoreError(f"the query failed: {exc}") from exc
    finally:
        connection.close()


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
