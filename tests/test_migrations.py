"""The Alembic migrations reproduce pipeline.store.schema exactly, on SQLite and PostgreSQL."""

from __future__ import annotations

import importlib.resources
import threading

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from pipeline.errors import StoreError
from pipeline.store import migrate, open_store
from pipeline.store.schema import metadata
from pipeline.store.sql import make_engine

TABLES = {"runs", "run_columns", "row_groups", "tasks", "dropped_records", "workers", "model_usage",
          "run_fingerprints", "run_changes", "generator_states", "task_traces"}


def schema_differences(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
            return compare_metadata(context, metadata)
    finally:
        engine.dispose()


def objects(url: str) -> tuple[set[str], set[str]]:
    engine = make_engine(url)
    try:
        inspector = sa.inspect(engine)
        return set(inspector.get_table_names()), set(inspector.get_view_names())
    finally:
        engine.dispose()


def test_upgrade_head_gives_exactly_the_schema_and_the_view(empty_db_url):
    assert migrate.current(empty_db_url) is None
    migrate.upgrade(empty_db_url)
    assert migrate.current(empty_db_url) == migrate.head()
    assert schema_differences(empty_db_url) == []
    tables, views = objects(empty_db_url)
    assert tables == TABLES | {"alembic_version"}
    assert views == {"column_progress"}


@pytest.mark.slow
def test_downgrade_to_base_then_upgrade_round_trips(empty_db_url):
    migrate.upgrade(empty_db_url)
    migrate.downgrade(empty_db_url, "base")
    assert migrate.current(empty_db_url) is None
    assert objects(empty_db_url) == ({"alembic_version"}, set())
    migrate.upgrade(empty_db_url)
    assert migrate.current(empty_db_url) == migrate.head()
    assert schema_differences(empty_db_url) == []
    assert objects(empty_db_url)[1] == {"column_progress"}


def test_a_store_at_0001_with_runs_upgrades_to_head_keeping_its_data(empty_db_url):
    migrate.upgrade(empty_db_url, "0001")
    engine = make_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO runs (run_id, name, status, num_records, row_group_size, seed, config, fingerprint, "
                "created_at, updated_at) VALUES ('old', 'n', 'interrupted', 5, 5, 0, '{}', 'f', 1, 1)"))
            conn.execute(sa.text("INSERT INTO row_groups (run_id, row_group, num_rows, state, rows_dropped, "
                                 "lease_epoch) VALUES ('old', 0, 5, 'active', 0, 1)"))
            conn.execute(sa.text(
                "INSERT INTO tasks (run_id, row_group, column_name, slot, row_index, task_type, state, attempts, "
                "value, updated_at) VALUES ('old', 0, 'c', 3, 3, 'cell', 'done', 0, '7', 1)"))
    finally:
        engine.dispose()
    if empty_db_url.startswith("postgresql"):  # a shared database: upgraded on purpose only
        with pytest.raises(StoreError, match="pipeline db upgrade"):
            open_store(empty_db_url)
        assert migrate.current(empty_db_url) == "0001"
        migrate.upgrade(empty_db_url)
    store = open_store(empty_db_url)  # a SQLite file upgrades on open
    try:
        assert migrate.current(empty_db_url) == migrate.head()
        assert store.get_run("old").status == "interrupted"
        assert store.load_row_group("old", 0).done == {("c", 3): 7}
        assert store.model_usage("old") == {}
        assert store.run_fingerprints("old") == {}
    finally:
        store.close()
    assert schema_differences(empty_db_url) == []


def test_open_store_upgrades_an_empty_database(empty_db_url):
    with open_store(empty_db_url) as store:
        assert store.list_runs() == []
    assert migrate.current(empty_db_url) == migrate.head()


def test_workers_opening_a_new_database_together_upgrade_it_once(empty_db_url):
    errors: list[BaseException] = []

    def open_one():
        try:
            open_store(empty_db_url).close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert migrate.current(empty_db_url) == migrate.head()


def test_an_out_of_date_schema_without_upgrade_names_the_command(empty_db_url):
    with pytest.raises(StoreError, match="pipeline db upgrade"):
        open_store(empty_db_url, upgrade=False)
    migrate.upgrade(empty_db_url)
    open_store(empty_db_url, upgrade=False).close()


def test_a_schema_newer_than_this_code_asks_to_upgrade_pipeline(empty_db_url):
    migrate.upgrade(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    finally:
        engine.dispose()
    for upgrade in (True, False):
        with pytest.raises(StoreError, match="upgrade pipeline"):
            open_store(empty_db_url, upgrade=upgrade)


def test_the_migrations_ship_inside_the_package():
    root = importlib.resources.files("pipeline_migrations")
    assert root.joinpath("env.py").is_file()
    assert root.joinpath("script.py.mako").is_file()
    assert root.joinpath("versions", "0001_initial.py").is_file()
    newest = max(f.name[:4] for f in root.joinpath("versions").iterdir() if f.name[:4].isdigit())
    assert migrate.head() == newest


def test_new_stores_opened_by_several_threads_at_once_all_reach_head(tmp_path):
    """Alembic keeps its running migration in module-level state; threads of one process that
    create new state stores at once (several ``pipeline.run`` calls) must not mix their steps."""
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def create(i: int) -> None:
        try:
            start.wait()
            open_store(f"sqlite:///{tmp_path / f'home-{i}' / 'state.db'}").close()
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    for i in range(4):
        url = f"sqlite:///{tmp_path / f'home-{i}' / 'state.db'}"
        assert migrate.current(url) == migrate.head()
        assert schema_differences(url) == []


def view_text(url: str) -> str:
    """The column_progress view's definition as the database keeps it (SQLite: the text run)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'column_progress'").scalar_one()
    finally:
        engine.dispose()


@pytest.mark.parametrize("revision", ["0001", "0002"])
def test_an_old_migration_creates_the_view_it_carries_whatever_the_schema_module_says_now(
        tmp_path, monkeypatch, revision):
    """0001 and 0002 carry their own text of the view: a later change of
    pipeline.store.schema.COLUMN_PROGRESS_SQL (with a migration of its own) must not change
    what they create."""
    from pipeline.store import schema

    original = schema.COLUMN_PROGRESS_SQL
    monkeypatch.setattr(schema, "COLUMN_PROGRESS_SQL", "CREATE VIEW column_progress AS SELECT 1 AS changed_later")
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate.upgrade(url, revision)
    assert view_text(url) == original
    assert "changed_later" not in view_text(url)


def test_the_head_creates_the_view_of_the_schema_module(tmp_path):
    from pipeline.store.schema import COLUMN_PROGRESS_SQL

    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate.upgrade(url)
    assert view_text(url) == COLUMN_PROGRESS_SQL


def test_the_head_written_in_migrate_is_alembics_head():
    """migrate.HEAD lets a current store open without importing Alembic; a new migration must
    update it (a stale one would make stores at the old head skip the upgrade)."""
    assert migrate.HEAD == migrate.head()


def test_the_salvage_index_is_partial_on_both_databases(empty_db_url):
    # The metadata leaves PostgreSQL's predicate to the migration (pipeline.store.schema): a full
    # index on state would make every task's transition update it.
    LIKE = "%next_eligible_at%"
    migrate.upgrade(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                ddl = conn.execute(sa.text("SELECT sql FROM sqlite_master WHERE type = 'index' "
                                           "AND tbl_name = 'tasks' AND sql LIKE :like"), {"like": LIKE}).scalars().all()
            else:
                ddl = conn.execute(sa.text("SELECT indexdef FROM pg_indexes WHERE tablename = 'tasks' "
                                           "AND schemaname = current_schema() AND indexdef LIKE :like"),
                                   {"like": LIKE}).scalars().all()
    finally:
        engine.dispose()
    assert len(ddl) == 1
    assert "WHERE" in ddl[0].upper() and "deferred" in ddl[0]
