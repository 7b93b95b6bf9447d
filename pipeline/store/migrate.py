"""Schema migrations of the state store (Alembic), usable from an installed `pipeline`.

The migration scripts ship inside the package as ``pipeline_migrations`` (the ``migrations/``
folder of the source tree); no ``alembic.ini`` is needed. ``pipeline db upgrade`` calls
:func:`upgrade`, ``pipeline db current`` calls :func:`current`, and every store opened with
:func:`pipeline.store.open_store` checks (and by default upgrades) its schema through
:func:`ensure_schema`.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from pipeline.errors import StoreError
from pipeline.store import postgres, sqlite

__all__ = ["alembic_config", "current", "downgrade", "ensure_schema", "head", "upgrade"]


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
    return ScriptDirectory.from_config(alembic_config())


@functools.cache
def head() -> str:
    """The newest revision this version of `pipeline` knows (read once per process: Alembic
    compiles every migration script to find it, ~2.5 ms per store opened)."""
    revision = _scripts().get_current_head()
    assert revision is not None
    return revision


def _revision_of(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


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


def ensure_schema(engine: Engine, *, upgrade: bool = True) -> None:
    """Make sure the database's schema is this code's head: upgrade it (under the schema lock)
    when ``upgrade``, else raise StoreError naming ``pipeline db upgrade``. A database whose
    revision is newer than this code raises StoreError either way."""
    with _database_errors(engine):
        for attempt in range(6):
            try:
                _ensure_schema(engine, upgrade)
                return
            except sa_exc.OperationalError as exc:
                # Several processes opening a new SQLite file at once: some lock states (WAL
                # set-up, a schema change seen mid-read) answer SQLITE_BUSY without waiting for
                # busy_timeout. The upgrade is idempotent under the schema lock: try again.
                if attempt == 5 or "locked" not in str(exc.orig).lower():
                    raise
                time.sleep(0.05 * 2 ** attempt)


def _ensure_schema(engine: Engine, upgrade: bool) -> None:
    target = head()
    with engine.execution_options(**sqlite.READ_ONLY).connect() as connection:
        revision = _revision_of(connection)
    if revision == target:
        return
    _check_known(revision, engine.url)
    if not upgrade:
        raise StoreError(
            f"the state store {engine.url.render_as_string(hide_password=True)} has schema "
            f"revision {revision or 'none (empty database)'}, this pipeline needs {target}; "
            "run `pipeline db upgrade`"
        )
    with _schema_transaction(engine) as connection:
        revision = _revision_of(connection)
        if revision == target:
            return
        _check_known(revision, engine.url)
        _run_command(command.upgrade, connection, target)


def upgrade(engine_or_url: Engine | str, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (default: the newest)."""
    with _engine(engine_or_url) as engine:
        if revision == "head":
            ensure_schema(engine, upgrade=True)
            return
        with _schema_transaction(engine) as connection:
            _run_command(command.upgrade, connection, revision)


def downgrade(engine_or_url: Engine | str, revision: str) -> None:
    """Migrate the database down to ``revision`` (``"base"``: drop everything)."""
    with _engine(engine_or_url) as engine:
        with _schema_transaction(engine) as connection:
            _run_command(command.downgrade, connection, revision)
