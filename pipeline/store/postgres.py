"""PostgreSQL specifics of the SQL store."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine

from pipeline.errors import ReadOnlyQueryError, StoreError
from pipeline.store.schema import ON_CONFLICT_FULL, ON_CONFLICT_STATE

__all__ = [
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


def create_engine(url: URL) -> Engine:
    # A bare postgresql:// URL means psycopg2 to SQLAlchemy; psycopg 3 is what we depend on.
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return sa.create_engine(url)


def lock_schema(connection: Connection) -> None:
    """Wait for the schema lock; it is released when the connection's transaction ends."""
    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})")


def read_query(engine: Engine, sql: str) -> tuple[list[str], list[tuple]]:
    """Run one statement of `pipeline sql` in a READ ONLY transaction, rolled back after."""
    import psycopg  # an optional dependency: only PostgreSQL stores get here

    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            # The raw cursor: the statement reaches PostgreSQL as written, with no parsing of
            # ':' or '%' placeholders.
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                cursor.execute(sql)
                if cursor.description is None:
                    return [], []
                return [d.name for d in cursor.description], [tuple(r) for r in cursor.fetchall()]
            finally:
                cursor.close()
                conn.rollback()
    except (psycopg.Error, sa_exc.DBAPIError) as exc:
        orig = getattr(exc, "orig", exc)
        if getattr(orig, "sqlstate", None) == _READ_ONLY_SQLSTATE:
            raise ReadOnlyQueryError(
                f"`pipeline sql` only reads the state store; PostgreSQL refused this statement "
                f"because it would write ({orig}): {sql.strip()[:200]}"
            ) from exc
        raise StoreError(f"the query failed: {orig}") from exc


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
