"""`pipeline sql` only reads, whatever the text: on SQLite and on PostgreSQL, through the real
command line, each attempt below is refused (exit 2, a message saying why) and leaves every table,
and the disk, as it was."""

from __future__ import annotations

import json
import secrets
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline.store import schema
from tests.conftest import cli
from tests.conftest_store import postgres_schema_url

# {file} is replaced by a path that must not exist afterwards.
BOTH = [
    "COMMIT; UPDATE runs SET status = 'failed'",
    "UPDATE runs SET status = 'failed'",
    "DELETE FROM tasks",
    "SELECT 1; DELETE FROM runs",
    "select 1;\nCOMMIT;\nDELETE FROM runs",
    "/* a comment */ DELETE FROM runs",
    "-- a comment\nDELETE FROM runs",
    "WITH x AS (DELETE FROM row_groups RETURNING *) SELECT count(*) FROM x",
    "WITH x AS (UPDATE runs SET status = 'failed' RETURNING 1) SELECT * FROM x",
    "EXPLAIN ANALYZE DELETE FROM runs",
    "BEGIN",
    "COMMIT",
    "",
]
SQLITE = [
    "ATTACH '{file}' AS evil",
    "VACUUM INTO '{file}'",
    "VACUUM",
    "REINDEX",
    "ANALYZE",
    "PRAGMA writable_schema = 1",
    "PRAGMA journal_mode = DELETE",
    "PRAGMA user_version = 7",
    "PRAGMA wal_checkpoint",
    "PRAGMA optimize",
    "SELECT load_extension('{file}')",
    "SELECT * FROM runs WHERE 0 UNION SELECT load_extension('x'), 1, 1, 1, 1, 1, 1, 1, 1, 1, 1",
    "INSERT OR REPLACE INTO runs SELECT * FROM runs",
    "REPLACE INTO run_columns SELECT * FROM run_columns",
]
POSTGRES = [
    "COPY (SELECT 1) TO PROGRAM 'id > {file}'",
    "COPY (SELECT 1) TO '{file}'",
    "COPY runs TO STDOUT",
    "DO $$BEGIN EXECUTE 'COPY (SELECT 1) TO ''{file}'''; END$$",
    "SELECT query_to_xml('COPY (SELECT 1) TO ''{file}''', true, false, '')",
    "SELECT * FROM runs FOR UPDATE",
    "SELECT * FROM runs FOR SHARE",
    "SELECT * INTO evil FROM runs",
    "SET default_transaction_read_only = off",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT lo_import('/etc/hostname')",
    "SELECT pg_catalog.lo_import('/etc/hostname')",
    'SELECT "lo_import"(\'/etc/hostname\')',
    "SELECT U&\"\\006co_import\"('/etc/hostname')",
    "SELECT pg_read_file('/etc/hostname')",
    "SELECT pg_ls_dir('.')",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_notify('c', 'x')",
    "SELECT ts_stat('SELECT to_tsvector(name) FROM runs')",
    "CALL nothing()",
    "LOCK TABLE runs",
    "TRUNCATE runs CASCADE",
    "PREPARE p AS DELETE FROM runs",
]
READS = {
    "both": [
        ("SELECT run_id, status FROM runs ORDER BY run_id", ["run_id", "status"]),
        ("select column_name, rows_done from column_progress where run_id = 'done' order by 1", ["column_name", "rows_done"]),
        ("WITH g AS (SELECT * FROM row_groups) SELECT count(*) AS n FROM g", ["n"]),
        ("SELECT count(*) AS n FROM tasks WHERE last_error LIKE '%delete%';", ["n"]),
        ("VALUES (1)", None),
        ("SELECT CASE WHEN 1 = 1 THEN 'x' END AS c, replace('abc', 'b', '') AS r", ["c", "r"]),
    ],
    "sqlite": [
        ("PRAGMA table_info(tasks)", None),
        ("SELECT name FROM pragma_table_info('tasks')", ["name"]),
        ("PRAGMA journal_mode", None),
        ("EXPLAIN QUERY PLAN SELECT * FROM tasks WHERE run_id = 'x'", None),
        ("SELECT strftime('%s', 'now') AS now", ["now"]),
    ],
    "postgresql": [
        ("SHOW server_version", None),
        ("TABLE runs", None),
        ("EXPLAIN SELECT * FROM tasks", None),
        ("EXPLAIN ANALYZE SELECT * FROM runs", None),
        ("(SELECT 1 AS one)", ["one"]),
        ("SELECT '%s' AS pct, $$a;b$$ AS dollar", ["pct", "dollar"]),
    ],
}

CONFIG = textwrap.dedent("""\
    name: sqlsafe
    num_records: 20
    row_group_size: 10
    columns:
      - {name: id, type: sampler, sampler: uuid}
      - {name: n, type: sampler, sampler: integer, params: {low: 1, high: 9}}
      - {name: label, type: expression, expr: "n={{ n }}"}
    """)


def _fill(folder: Path, url: str) -> tuple[str, Path]:
    """A state store at ``url`` holding one complete run and one only created."""
    (folder / "cfg.yaml").write_text(CONFIG)
    home = folder / "home"
    cli("run", str(folder / "cfg.yaml"), "--run-id", "done", "--quiet", home=home, db=url, check=True)
    cli("run", str(folder / "cfg.yaml"), "--run-id", "created", "--create-only", home=home, db=url, check=True)
    return url, home


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sql-sqlite")
    return _fill(folder, f"sqlite:///{folder / 'home' / 'state.db'}")


@pytest.fixture(scope="module")
def postgres_store(tmp_path_factory):
    with postgres_schema_url() as url:
        yield _fill(tmp_path_factory.mktemp("sql-postgres"), url)


def dump(url: str) -> dict:
    """Every table of the store, every row, in key order (and, on PostgreSQL, the large objects)."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            out = {t.name: conn.execute(sa.select(t).order_by(*t.primary_key.columns)).all()
                   for t in schema.metadata.sorted_tables}
            if engine.dialect.name == "postgresql":
                out["pg_largeobject_metadata"] = conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_largeobject_metadata").scalar()
            else:
                out["sqlite_master"] = conn.exec_driver_sql("SELECT * FROM sqlite_master ORDER BY name").all()
                out["user_version"] = conn.exec_driver_sql("PRAGMA user_version").scalar()
                out["journal_mode"] = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            return out
    finally:
        engine.dispose()


def refused_and_nothing_changed(url: str, attempt: str, folder: Path) -> None:
    target = folder / f"pipeline-sqlsafe-{secrets.token_hex(4)}"
    text = attempt.replace("{file}", str(target))
    before = dump(url)
    proc = cli("sql", "--db", url, "--", text)  # "--": a text may start with "-- a comment"
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "only reads" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert dump(url) == before
    assert not target.exists()


def answers(url: str, query: str, columns: list[str] | None) -> None:
    before = dump(url)
    proc = cli("sql", query, "--json", db=url)
    assert proc.returncode == 0, (query, proc.stderr)
    rows = json.loads(proc.stdout)
    assert isinstance(rows, list) and rows, query
    if columns is not None:
        assert list(rows[0]) == columns, query
    assert dump(url) == before


@pytest.mark.parametrize("attempt", BOTH + SQLITE)
@pytest.mark.slow
def test_pipeline_sql_on_sqlite_refuses_every_attempt_to_write_and_changes_nothing(sqlite_store, attempt, tmp_path):
    refused_and_nothing_changed(sqlite_store[0], attempt, tmp_path)


# /tmp, not tmp_path: the PostgreSQL server runs as another user, who could not write into
# pytest's folder anyway (the test would pass for the wrong reason).
@pytest.mark.parametrize("attempt", BOTH + POSTGRES)
@pytest.mark.slow
def test_pipeline_sql_on_postgres_refuses_every_attempt_to_write_and_changes_nothing(postgres_store, attempt):
    refused_and_nothing_changed(postgres_store[0], attempt, Path("/tmp"))


@pytest.mark.parametrize("query,columns", READS["both"] + READS["sqlite"])
def test_pipeline_sql_on_sqlite_still_answers_reads(sqlite_store, query, columns):
    answers(sqlite_store[0], query, columns)


@pytest.mark.parametrize("query,columns", READS["both"] + READS["postgresql"])
@pytest.mark.slow
def test_pipeline_sql_on_postgres_still_answers_reads(postgres_store, query, columns):
    answers(postgres_store[0], query, columns)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_pipeline_sql_counts_progress_of_a_finished_run(request, backend):
    url = request.getfixturevalue(f"{'postgres' if backend == 'postgresql' else backend}_store")[0]
    progress = json.loads(cli("sql", "select column_name, rows_done from column_progress where run_id = 'done' "
                                      "order by column_name", "--json", db=url, check=True).stdout)
    assert progress == [{"column_name": c, "rows_done": 20} for c in ("id", "label", "n")]


def test_pipeline_sql_stops_a_query_that_runs_too_long(tmp_path):
    from pipeline.errors import StoreError
    from pipeline.store import open_store
    from pipeline.store import sqlite as sqlite_store

    with open_store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
        with pytest.raises(StoreError, match="longer than"):
            sqlite_store.read_query(store.engine.url, endless, timeout_s=0.2)


def test_pipeline_sql_on_postgres_stops_a_query_that_runs_too_long():
    from pipeline.errors import StoreError
    from pipeline.store import postgres
    from pipeline.store.sql import make_engine

    with postgres_schema_url() as url:
        engine = make_engine(url)
        try:
            with pytest.raises(StoreError, match="longer than"):
                postgres.read_query(engine.url, "SELECT pg_sleep(30)", timeout_s=0.2)
        finally:
            engine.dispose()


@pytest.mark.parametrize("backend, attempt, reason", [
    ("sqlite", "PRAGMA journal_mode=delete", "refused: a PRAGMA that sets a value (PRAGMA journal_mode = ...)"),
    ("sqlite", "PRAGMA main.journal_mode(DELETE)", "refused: PRAGMA journal_mode(...), which with an argument sets"),
    ("sqlite", "PRAGMA user_version = 7", "refused: a PRAGMA that sets a value (PRAGMA user_version = ...)"),
    ("sqlite", "PRAGMA optimize", "refused: PRAGMA optimize (it writes, or is not one of the PRAGMAs that only read"),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("postgresql", "SELECT * FROM runs FOR UPDATE", "refused: the locking clause FOR UPDATE (it takes row locks"),
        ("postgresql", "select * from runs for no key update nowait", "refused: the locking clause FOR NO KEY UPDATE"),
        ("postgresql", "SELECT * FROM runs FOR KEY SHARE", "refused: the locking clause FOR KEY SHARE"),
    ]),
])
def test_a_refused_statement_is_refused_for_what_it_is(request, backend, attempt, reason):
    """`PRAGMA journal_mode=delete` is a PRAGMA that sets a value, not a DELETE; `FOR UPDATE` a
    locking clause, not an UPDATE."""
    url = request.getfixturevalue(f"{'postgres' if backend == 'postgresql' else backend}_store")[0]
    before = dump(url)
    proc = cli("sql", attempt, db=url)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert reason in proc.stderr, proc.stderr
    assert dump(url) == before
