"""Helpers of the store tests (the fixtures built on them are in conftest.py).

PostgreSQL tests run in a schema of their own (``search_path`` set through the URL), created
for them and dropped afterwards, so that they never touch tables other test runs on the same
database are using.
"""

from __future__ import annotations

import os
import secrets
import uuid
from contextlib import contextmanager
from typing import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from pipeline.store.base import ColumnSpec, NewRun
from pipeline.store.events import DEFERRED, DONE, FAILED, STARTED, Completed, Dropped, TaskEvent, Usage
from pipeline.values import encode

PG_ENV = "PIPELINE_TEST_POSTGRES_URL"
PG_URL = os.environ.get(PG_ENV)
BACKENDS = ["sqlite", "postgresql"]


def _admin_url(url: str) -> sa.engine.URL:
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


@contextmanager
def postgres_schema_url() -> Iterator[str]:
    """A URL on a fresh, empty PostgreSQL schema (dropped on exit)."""
    if not PG_URL:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)")
    admin = sa.create_engine(_admin_url(PG_URL))
    schema = f"pipeline_test_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = _admin_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        try:
            yield url.render_as_string(hide_password=False)
        finally:
            with admin.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        admin.dispose()


def sqlite_url(folder) -> str:
    return f"sqlite:///{folder}/home/state.db"


def dead_owner() -> str:
    """An owner id of this host whose process cannot exist (a pid above pid_max)."""
    from pipeline.workers import HOST

    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1
    return f"{HOST}:{pid}:12345:deadbeef"


@contextmanager
def empty_database_url(backend: str, tmp_path) -> Iterator[str]:
    if backend == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        with postgres_schema_url() as url:
            yield url


def claim_all_concurrently(store, other, run_id: str) -> tuple[list[int], list[int]]:
    """Two stores (two owners) claim the run's row groups one at a time from two threads until
    none is left; the row groups each took."""
    import threading

    taken: dict[str, list[int]] = {store.owner: [], other.owner: []}
    errors: list[BaseException] = []

    def work(s):
        try:
            while claims := s.claim_row_groups(run_id, 1, 60):
                taken[s.owner].extend(c.row_group for c in claims)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in (store, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    return taken[store.owner], taken[other.owner]


# The journal's events as the engine builds them (pipeline.engine), in one place for the tests.
def started(rg, gen, i, kind="cell"):
    return TaskEvent(STARTED, rg, gen, i, kind)


def done(rg, gen, i, value, kind="cell", usage=None):
    return TaskEvent(DONE, rg, gen, i, kind, encode(value), usage=usage and Usage(*usage))


def deferred(rg, gen, i, attempts, at, error, kind="cell", usage=None):
    return TaskEvent(DEFERRED, rg, gen, i, kind, attempts=attempts, next_eligible_at=at, error=error,
                     usage=usage and Usage(*usage))


def failed(rg, gen, i, attempts, error, kind="cell", usage=None):
    return TaskEvent(FAILED, rg, gen, i, kind, attempts=attempts, error=error, usage=usage and Usage(*usage))


def dropped(rg, i=None):
    return Dropped(rg, i)


def complete(rg):
    return Completed(rg)


# The store contract suite's runs (tests/store/test_contract*.py).

COLUMNS = [
    ColumnSpec("x", "x", "cell", 0),
    ColumnSpec("y", "yz", "batch", 1),  # one batch generator with two output columns
    ColumnSpec("z", "yz", "batch", 2),
    ColumnSpec("w", "w", "cell", 3),
]
ELSEWHERE = "elsewhere.example:4242:999:cafe"  # an owner of another host: its leases expire only
ZERO = (0, 0, 0, 0)


def new_run(store, *, num_records: int = 25, row_group_size: int = 10, name: str = "test", columns=COLUMNS) -> str:
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    store.create_run(NewRun(run_id, name, num_records, row_group_size, 7, '{"name": "test"}', "f" * 16, columns))
    return run_id


def claimed(store, **kwargs) -> str:
    run_id = new_run(store, **kwargs)
    store.claim_row_groups(run_id, 100, 60)
    return run_id


def counts(store, run_id):
    return {name: (c["done"], c["failed"], c["deferred"], c["in_flight"])
            for name, c in store.column_counts(run_id).items()}
