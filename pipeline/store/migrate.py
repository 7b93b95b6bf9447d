"""Schema migrations of the state store (Alembic), usable from an installed `pipeline`.

The migration scripts ship inside the package as ``pipeline_migrations`` (the ``migrations/``
folder of the source tree); no ``alembic.ini`` is needed. ``pipeline db upgrade`` calls
:func:`upgrade`, ``pipeline db current`` calls :func:`current`, and every store opened with
:func:`pipeline.store.open_store` checks its schema through :func:`ensure_schema`: a SQLite file
is upgraded on open, a PostgreSQL database (shared by many workers and machines, perhaps running
another version of `pipeline`) is not: an out-of-date one is refused with a message naming
``pipeline db upgrade``, and only an empty one gets its schema created.

Opening a current store costs one query (``SELECT version_num FROM alembic_version``, compared
with :data:`HEAD`) and no import of Alembic, which takes ~0.3 s of CPU to import and compile
the migration scripts: `pipeline status`, `runs` and `sql` answer at once. Alembic is imported
only when the revision is not :data:`HEAD`.
"""

from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from pipeline.errors import StoreError
from pipeline.store import postgres, sqlite

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

__all__ = ["HEAD", "alembic_config", "current", "downgrade", "ensure_schema", "head", "upgrade"]

#: The newest revision in migrations/versions, written out so that opening a current store need
#: not import Alembic. A new migration updates it; a test compares it with Alembic's head. When
#: it lags behind, stores still open correctly (through Alembic), only slower.
HEAD = "0009"


def _script_location() -> str:
    # In a source tree, the migrations beside this `pipeline` package: an editable install maps
    # pipeline_migrations to the tree it was installed from, which may be another checkout.
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "migrations")
    if os.path.isfile(os.path.join(beside, "env.py")) and os.path.isdir(os.path.join(beside, "versions")):
        return os.path.normpath(beside)
    import pipeline_migrations

    return os.path.dirname(os.path.abspath(pipeline_migrations.__file__))


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the shipped migrations; ``connection``, when given, is the one the
    migrations run on (inside its transaction)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", _script_location())
    if connection is not None:
        config.attributes["connection"] = connection
    return config


# Alembic runs env.py through module-level state (alembic.context, alembic.op): two upgrades
# in two threads of one process would run each other's steps. One at a time per process.
_ALEMBIC = threading.Lock()


def _run_command(fn: Callable, connection: Connection, revision: str) -> None:
    with _ALEMBIC:
        fn(alembic_config(connection), revision)


def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


@functools.cache
def head() -> str:
    """The newest revision this version of `pipeline` knows, as Alembic finds it (read once per
    process: Alembic compiles every migration script to find it)."""
    revision = _scripts().get_current_head()
    assert revision is not None
    return revision


def _revision_of(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _at_head(engine: Engine) -> bool:
    """Whether the database is at :data:`HEAD`, in one query and without Alembic. False when it
    cannot tell (no alembic_version table, several heads, an error): Alembic then looks."""
    try:
        with engine.execution_options(**sqlite.READ_ONLY).connect() as connection:
            rows = connection.exec_driver_sql("SELECT version_num FROM alembic_version").fetchall()
    except sa_exc.DBAPIError:
        return False
    return len(rows) == 1 and rows[0][0] == HEAD


@contextmanager
def _engine(engine_or_url: Engine | str) -> Iterator[Engine]:
    if isinstance(engine_or_url, Engine):
        with _database_errors(engine_or_url):
            yield engine_or_url
        return
    from pipeline.store.sql import make_engine

    engine = make_engine(engine_or_url)
    try:
        with _database_errors(engine):
            yield engine
    finally:
        engine.dispose()


@contextmanager
def _database_errors(engine: Engine) -> Iterator[None]:
    try:
        yield
    except sa_exc.DBAPIError as exc:
        where = engine.url.render_as_string(hide_password=True)
        raise StoreError(f"cannot use the state store {where}: {exc.orig}") from exc


@contextmanager
def _schema_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the schema lock: pg_advisory_xact_lock on PostgreSQL, the write
    lock (BEGIN IMMEDIATE) on SQLite. DDL is transactional on both, so an upgrade is all or
    nothing, and a second process waits, then finds the schema up to date."""
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            postgres.lock_schema(connection)
        yield connection


def _check_known(revision: str | None, url: object) -> None:
    if revision is None:
        return
    known = {script.revision for script in _scripts().walk_revisions()}
    if revision not in known:
        raise StoreError(
            f"the state store {url} has schema revision {revision!r}, newer than this version "
            f"of pipeline knows (head {head()!r}); upgrade pipeline to use it"
        )


def current(engine_or_url: Engine | str) -> str | None:
    """The schema revision of the database, or None for an empty database."""
    with _engine(engine_or_url) as engine:
        with engine.execution_options(**sqlite.READ_ONLY).connect() as connection:
            return _revision_of(connection)


def ensure_schema(engine: Engine, *, upgrade: bool | None = None) -> None:
    """Make sure the database's schema is this code's head: upgrade it (under the schema lock)
    when ``upgrade``, else raise StoreError naming ``pipeline db upgrade``. ``upgrade=None`` (what
    opening a store does): a SQLite file is upgraded; a PostgreSQL database is upgraded only
    when it is empty (no schema yet), else refused when not current. A database whose revision
    is newer than this code raises StoreError either way."""
    if _at_head(engine):
        return
    import tenacity  # not on the path of a current store (see the module docstring)

    # Several processes opening a new SQLite file at once: some lock states (WAL set-up, a
    # schema change seen mid-read) answer SQLITE_BUSY without waiting for busy_timeout. The
    # upgrade is idempotent under the schema lock: try again, 6 times in all, from 0.05 s.
    retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(6), wait=tenacity.wait_exponential(multiplier=0.05),
                                 retry=tenacity.retry_if_exception(_locked), reraise=True)
    with _database_errors(engine):
        retrying(_ensure_schema, engine, upgrade)


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, sa_exc.OperationalError) and "locked" in str(exc.orig).lower()


def _ensure_schema(engine: Engine, upgrade: bool | None) -> None:
    target = head()
    with engine.execution_options(**sqlite.READ_ONLY).connect() as connection:
        revision = _revision_of(connection)
    if revision == target:
        return
    _check_known(revision, engine.url)
    if upgrade is None:
        upgrade = engine.dialect.name != "postgresql" or revision is None
    if not upgrade:
        raise StoreError(_out_of_date(engine, revision, target))
    with _schema_transaction(engine) as connection:
        revision = _revision_of(connection)
        if revision == target:
            return
        _check_known(revision, engine.url)
        from alembic import command

        _run_command(command.upgrade, connection, target)


def _out_of_date(engine: Engine, revision: str | None, target: str) -> str:
    url = engine.url.render_as_string(hide_password=True)
    if engine.dialect.name != "postgresql":
        return (f"the state store {url} has schema revision {revision or 'none (empty database)'}, this "
                f"pipeline needs {target}; run `pipeline db upgrade`")
    return (f"the state store {url} has schema revision {revision or 'none (empty database)'}, this "
            f"pipeline needs {target}; run `pipeline db upgrade` on it (a PostgreSQL store "
            "is shared, so opening it does not upgrade it: stop the workers of older versions first)")


def upgrade(engine_or_url: Engine | str, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (default: the newest)."""
    from alembic import command

    with _engine(engine_or_url) as engine:
        if revision == "head":
            ensure_schema(engine, upgrade=True)
            return
        with _schema_transaction(engine) as connection:
            _run_command(command.upgrade, connection, revision)


def downgrade(engine_or_url: Engine | str, revision: str) -> None:
    """Migrate the database down to ``revision`` (``"base"``: drop everything)."""
    from alembic import command

    with _engine(engine_or_url) as engine:
        with _schema_transaction(engine) as connection:
            _run_command(command.downgrade, connection, revision)
