"""PostgreSQL specifics of the SQL store."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import NullPool

from pipeline.errors import ReadOnlyQueryError, StoreError
from pipeline.store.schema import ON_CONFLICT_FULL, ON_CONFLICT_STATE

__all__ = [
    "READ_QUERY_TIMEOUT_S",
    "SCHEMA_LOCK_KEY",
    "create_engine",
    "read_query",
    "lock_schema",
    "upsert_tasks",
]

#: pg_advisory_xact_lock key held while the schema is checked and upgraded, so that workers
#: starting together do not race to create the tables. (An arbitrary constant: "pipeline".)
SCHEMA_LOCK_KEY = 0x706970656C696E65

_READ_ONLY_SQLSTATE = "25006"  # read_only_sql_transaction
_QUERY_CANCELED_SQLSTATE = "57014"  # query_canceled: statement_timeout


def create_engine(url: URL) -> Engine:
    # A bare postgresql:// URL means psycopg2 to SQLAlchemy; psycopg 3 is what we depend on.
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return sa.create_engine(url)


def lock_schema(connection: Connection) -> None:
    """Wait for the schema lock; it is released when the connection's transaction ends."""
    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})")


#: `pipeline sql` stops a query after this long (seconds): statement_timeout.
READ_QUERY_TIMEOUT_S = 300.0


def _read_only_engine(url: URL, timeout_s: float) -> Engine:
    """An Engine whose one connection is read-only for its whole life: the server starts the
    session with ``default_transaction_read_only`` (what ``SET SESSION CHARACTERISTICS AS
    TRANSACTION READ ONLY`` sets), so no COMMIT inside the text can open a transaction that
    writes, and with ``statement_timeout``. Options already in the URL (a search_path) stay."""
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    options = url.query.get("options", "")
    options = " ".join(options) if isinstance(options, tuple) else options
    options += f" -c default_transaction_read_only=on -c statement_timeout={max(1, int(timeout_s * 1000))}"
    return sa.create_engine(url.update_query_dict({"options": options.strip()}), poolclass=NullPool)


def read_query(url: URL, sql: str, *, timeout_s: float = READ_QUERY_TIMEOUT_S) -> tuple[list[str], list[tuple]]:
    """Run one statement of `pipeline sql` (checked by :mod:`pipeline.store.readonly`) in a
    READ ONLY transaction of a read-only session, rolled back after, stopped after
    ``timeout_s``. ReadOnlyQueryError for a statement refused, StoreError for any other failure."""
    import psycopg  # an optional dependency: only PostgreSQL stores get here

    from pipeline.store import readonly  # sqlparse: only `pipeline sql` pays for it

    statement = readonly.single_read_statement(sql, "postgresql")
    engine = _read_only_engine(url, timeout_s)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            # The raw cursor: the statement reaches PostgreSQL as written, with no parsing of
            # ':' or '%' placeholders. prepare=True sends it with the extended protocol, which
            # refuses a text of several statements (the simple protocol would run them all).
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                cursor.execute(statement, prepare=True)
                if cursor.description is None:
                    return [], []
                return [d.name for d in cursor.description], [tuple(r) for r in cursor.fetchall()]
            finally:
                cursor.close()
                conn.rollback()
    except (psycopg.Error, sa_exc.DBAPIError) as exc:
        orig = getattr(exc, "orig", exc)
        sqlstate = getattr(orig, "sqlstate", None)
        if sqlstate == _READ_ONLY_SQLSTATE:
            raise ReadOnlyQueryError(
                f"`pipeline sql` only reads the state store; PostgreSQL refused this statement "
                f"because it would write ({orig}): {sql.strip()[:200]}"
            ) from exc
        if sqlstate == _QUERY_CANCELED_SQLSTATE:
            raise StoreError(f"the query ran longer than {timeout_s:g} s and was stopped; narrow it "
                             f"(a WHERE on run_id, a LIMIT)") from exc
        raise StoreError(f"the query failed: {orig}") from exc
    finally:
        engine.dispose()


# The journal's upserts as one statement per batch over arrays: executemany costs a round trip
# per row (about 30k rows/s here), unnest about 150k. Rows are unique per key (record()
# coalesces), which ON CONFLICT DO UPDATE requires within one statement. Same semantics as the
# SQLite statements in pipeline.store.sqlite.
_UNNEST_STATE = (
    "INSERT INTO tasks (run_id, row_group, column_name, slot, row_index, task_type, state, value, "
    "updated_at, attempts) "
    "SELECT %s, u.row_group, u.column_name, u.slot, u.row_index, u.task_type, u.state, u.value, %s, 0 "
    "FROM unnest(%b::int[], %b::text[], %b::int[], %b::int[], %b::text[], %b::text[], %b::text[]) "
    "AS u(row_group, column_name, slot, row_index, task_type, state, value) "
    + ON_CONFLICT_STATE
)
_UNNEST_FULL = (
    "INSERT INTO tasks (run_id, row_group, column_name, slot, row_index, task_type, state, value, "
    "updated_at, attempts, next_eligible_at, last_error) "
    "SELECT %s, u.row_group, u.column_name, u.slot, u.row_index, u.task_type, u.state, u.value, %s, "
    "u.attempts, u.next_eligible_at, u.last_error "
    "FROM unnest(%b::int[], %b::text[], %b::int[], %b::int[], %b::text[], %b::text[], %b::text[], "
    "%b::int[], %b::float8[], %b::text[]) "
    "AS u(row_group, column_name, slot, row_index, task_type, state, value, attempts, "
    "next_eligible_at, last_error) "
    + ON_CONFLICT_FULL
)


def upsert_tasks(connection: Connection, run_id: str, now: float, plain: list[tuple], full: list[tuple]) -> None:
    """Write coalesced task rows: ``plain`` rows are (run_id, row_group, generator, slot,
    row_index, task_type, state, value, now); ``full`` rows add (attempts, next_eligible_at,
    last_error)."""
    if plain:
        columns = list(zip(*plain))
        connection.exec_driver_sql(_UNNEST_STATE, (run_id, now, *(list(c) for c in columns[1:8])))
    if full:
        columns = list(zip(*full))
        connection.exec_driver_sql(
            _UNNEST_FULL, (run_id, now, *(list(c) for c in columns[1:8]), *(list(c) for c in columns[9:12]))
        )
