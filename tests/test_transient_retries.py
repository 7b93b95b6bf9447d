"""The retry loops of the journal, the checkpoints and schema migrations (tenacity) try again
only what another try can fix (pipeline.store.transient); a bug surfaces at once."""

from __future__ import annotations

import asyncio
import sqlite3

import pyarrow as pa
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from pipeline.engine.checkpoints import ATTEMPTS, write_checkpoint
from pipeline.engine.journal import Journal
from pipeline.errors import StoreError
from pipeline.store import migrate
from pipeline.store.transient import is_transient


def busy() -> sa_exc.OperationalError:
    return sa_exc.OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))


def translated(exc: Exception) -> StoreError:
    """As the SQL store raises a driver error: a StoreError whose cause it is."""
    try:
        raise StoreError(f"state store error: {exc}") from exc
    except StoreError as error:
        return error


@pytest.mark.parametrize("exc, transient", [
    (OSError(28, "No space left on device"), True),
    (busy(), True),
    (translated(busy()), True),
    (sa_exc.DBAPIError("SELECT 1", {}, Exception("server closed the connection"), connection_invalidated=True), True),
    (sa_exc.IntegrityError("INSERT ...", {}, sqlite3.IntegrityError("UNIQUE constraint failed")), False),
    (translated(sa_exc.ProgrammingError("SELEC 1", {}, sqlite3.ProgrammingError("syntax error"))), False),
    (StoreError("run 'r1' has no row group 9"), False),
    (TypeError("unsupported operand"), False),
])
def test_only_failures_that_another_try_can_fix_are_transient(exc, transient):
    assert is_transient(exc) is transient


class CheckpointStore:
    """The two calls write_checkpoint makes; checkpoint_row_group fails with ``failures`` first."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0

    def lease_epoch(self, run_id, rg_id):
        return 1

    def checkpoint_row_group(self, run_id, rg_id, path, n_dropped, **file):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return True


def checkpoint(store, home) -> bool:
    return write_checkpoint(store, "r1", str(home), 0, lambda: pa.table({"v": [1, 2]}), 0, str)


def test_a_bug_in_a_checkpoint_surfaces_at_once_as_itself(tmp_path):
    store = CheckpointStore(TypeError("a bug"), TypeError("a bug"), TypeError("a bug"))
    with pytest.raises(TypeError, match="a bug"):
        checkpoint(store, tmp_path)
    assert store.calls == 1


def test_a_busy_database_or_a_full_disk_is_tried_again_then_named_as_an_os_error(tmp_path):
    store = CheckpointStore(translated(busy()), OSError(28, "No space left on device"))
    assert checkpoint(store, tmp_path) is True
    assert store.calls == 3
    store = CheckpointStore(*[OSError(28, "No space left on device")] * ATTEMPTS)
    with pytest.raises(OSError, match="could not write the checkpoint of row group 0 .*No space left"):
        checkpoint(store, tmp_path)
    assert store.calls == ATTEMPTS


class JournalStore:
    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.batches: list[list] = []

    def record(self, run_id, events):
        self.batches.append(list(events))
        if self.failures:
            raise self.failures.pop(0)
        return set()


async def journal_of(store: JournalStore) -> tuple[Journal, list]:
    told: list = []
    journal = Journal(store, "r1", on_lost=told.append)
    journal.start()
    journal.append(("event",))
    return journal, told


async def test_a_bug_in_the_store_stops_the_journal_at_once():
    store = JournalStore(TypeError("a bug"), TypeError("a bug"))
    journal, told = await journal_of(store)
    with pytest.raises(TypeError, match="a bug"):
        await journal.close()
    await asyncio.sleep(0)
    assert len(store.batches) == 1 and told == [None]


async def test_a_busy_database_is_tried_again_and_the_batch_commits():
    store = JournalStore(translated(busy()), busy())
    journal, told = await journal_of(store)
    await journal.close()
    assert len(store.batches) == 3 and journal.events_written == 1 and journal.error is None and told == []


def test_a_schema_upgrade_tries_again_only_while_the_database_is_locked(tmp_path, monkeypatch):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'state.db'}")
    calls = []

    def ensure(errors):
        def fake(engine, upgrade):
            calls.append(upgrade)
            if errors:
                raise errors.pop(0)
        return fake

    monkeypatch.setattr(migrate, "_at_head", lambda engine: False)
    monkeypatch.setattr(migrate, "_ensure_schema", ensure([busy(), busy()]))
    migrate.ensure_schema(engine)
    assert len(calls) == 3
    calls.clear()
    missing = sa_exc.OperationalError("SELECT ...", {}, sqlite3.OperationalError("no such table: runs"))
    monkeypatch.setattr(migrate, "_ensure_schema", ensure([missing, missing]))
    with pytest.raises(StoreError, match="no such table"):
        migrate.ensure_schema(engine)
    assert len(calls) == 1
    engine.dispose()
