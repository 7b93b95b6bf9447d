"""Alembic environment of the state store.

`pipeline` runs its migrations in code (pipeline.store.migrate) on a connection it opened, passed
in ``config.attributes["connection"]`` inside a transaction that holds the schema lock; Alembic
then neither commits nor closes it. Without one (the ``alembic`` command with ``-x`` or a
``sqlalchemy.url`` option), this opens its own engine with the store's settings.
"""

from __future__ import annotations

from alembic import context

from pipeline.store.schema import metadata

config = context.config


def _configure(**kwargs) -> None:
    # SQLite cannot ALTER most things; batch mode recreates tables for later migrations.
    context.configure(target_metadata=metadata, render_as_batch=True, compare_type=True, **kwargs)


def run_migrations_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return

    from pipeline.store.sql import make_engine

    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
