"""pipeline.states: the enums hold exactly the values the schema and its migrations allow, and a
member written to the store comes back, through `pipeline sql` too, as its plain string."""

from __future__ import annotations

import json
import re
import sqlite3

import sqlalchemy as sa

from pipeline import graph
from pipeline.states import RowGroupState, RunStatus, TaskState, TaskType
from pipeline.store import base, events, open_store, schema
from pipeline.store.base import ColumnSpec, NewRun
from pipeline.store.events import DEFERRED, DONE, FAILED, STARTED, Completed, TaskEvent
from tests.conftest import ROOT, cli
from tests.conftest_store import sqlite_url

MIGRATIONS = ROOT / "migrations" / "versions"


def in_lists(text: str) -> dict[str, set[str]]:
    """``{column: values}`` of every ``column IN ('a', 'b')`` in ``text``."""
    return {column: set(re.findall(r"'([^']*)'", values)) for column, values in re.findall(r"(\w+) IN \(([^)]*)\)", text)}


def test_run_status_and_row_group_state_are_what_the_migrations_check():
    allowed: dict[str, set[str]] = {}
    for path in sorted(MIGRATIONS.glob("[0-9]*.py")):  # a later migration's CHECK replaces an earlier one
        allowed.update(in_lists(path.read_text()))
    assert allowed["status"] == {s.value for s in RunStatus}
    assert allowed["state"] == {s.value for s in RowGroupState}


def test_the_schema_checks_are_the_migrations_text_word_for_word():
    checks = [str(c.sqltext) for table in (schema.runs, schema.row_groups) for c in table.constraints
              if isinstance(c, sa.CheckConstraint)]
    assert checks == ["status IN ('running', 'interrupted', 'complete', 'failed')",
                      "state IN ('pending', 'active', 'complete', 'checkpointed')"]
    initial = (MIGRATIONS / "0001_initial.py").read_text()
    assert all(check in initial for check in checks)
    assert schema.SALVAGE_INDEX_WHERE == "state = 'deferred'"


def test_task_states_and_types_are_the_values_the_store_writes():
    assert base.TASK_STATES == ("frontier", "in_flight", "deferred", "done", "failed") == tuple(TaskState)
    assert base.RUN_STATES == ("running", "interrupted", "complete", "failed")
    assert base.ROW_GROUP_STATES == ("pending", "active", "complete", "checkpointed")
    assert base.TASK_TYPES == ("from_scratch", "cell", "batch") == tuple(TaskType)
    # What the journal binds per task row: plain str (a driver binds a str subclass more slowly).
    assert set(events.TASK_STATE) == set(TaskState) - {TaskState.FRONTIER}
    assert events.TASK_STATE[DONE] == "done" and events.TASK_STATE[FAILED] == "failed"
    plain = [*events.TASK_STATE, graph.FROM_SCRATCH, graph.CELL, graph.BATCH]
    assert all(type(v) is str for v in plain)
    assert {graph.FROM_SCRATCH, graph.CELL, graph.BATCH} == set(TaskType)
    # Every task state the column_progress view counts is one of them.
    view_states = set(re.findall(r"t\.state = '(\w+)'", schema.COLUMN_PROGRESS_SQL))
    assert view_states and view_states <= set(TaskState)


def test_members_format_as_their_plain_value():
    for member in (*RunStatus, *RowGroupState, *TaskState, *TaskType):
        assert f"{member}" == str(member) == "%s" % member == member.value
        assert repr(member) == repr(member.value) and f"{member!r}" == f"{member.value!r}"
        assert json.dumps({member: member}) == json.dumps({member.value: member.value})


def test_members_round_trip_through_the_sqlite_store_as_plain_text(tmp_path):
    url = sqlite_url(tmp_path)
    store = open_store(url)
    columns = [ColumnSpec("x", "x", TaskType.CELL, 0), ColumnSpec("y", "y", TaskType.BATCH, 1)]
    try:
        for status in RunStatus:
            store.create_run(NewRun(f"run-{status}", "t", 4, 1, 0, "{}", "f", columns))
            store.set_run_status(f"run-{status}", status)
        run = "run-running"
        # Row groups 0-2 claimed (active), 1 complete, 2 checkpointed; 3 not claimed (pending).
        assert [c.row_group for c in store.claim_row_groups(run, 3, 60)] == [0, 1, 2]
        # A member (not its plain value) in the events, to see what the store makes of it.
        store.record(run, [TaskEvent(STARTED, 0, "x", 0, TaskType.CELL),
                           TaskEvent(DONE, 0, "a", None, TaskType.FROM_SCRATCH, "1"),
                           TaskEvent(DEFERRED, 0, "y", None, TaskType.BATCH, attempts=1, next_eligible_at=0.0,
                                     error="later"),
                           TaskEvent(FAILED, 1, "x", 0, TaskType.CELL, attempts=3, error="no"),
                           Completed(1), Completed(2)])
        assert store.checkpoint_row_group(run, 2, "rg-2.parquet", 0)
        assert store.get_run(run).status == RunStatus.RUNNING
        assert type(store.get_run(run).status) is str
    finally:
        store.close()

    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        assert set(conn.execute("SELECT typeof(status) FROM runs")) == {("text",)}
        assert set(conn.execute("SELECT typeof(state), typeof(task_type) FROM tasks")) == {("text", "text")}
        assert sorted(conn.execute("SELECT state, task_type FROM tasks")) == [
            ("deferred", "batch"), ("done", "from_scratch"), ("failed", "cell"), ("in_flight", "cell")]

    proc = cli("sql", "SELECT run_id, status FROM runs ORDER BY run_id", "--json", home=tmp_path / "home", check=True)
    assert json.loads(proc.stdout) == [{"run_id": f"run-{s}", "status": s.value} for s in sorted(RunStatus)]
    proc = cli("sql", "SELECT row_group, state FROM row_groups WHERE run_id = 'run-running' ORDER BY row_group",
               "--json", home=tmp_path / "home", check=True)
    assert [r["state"] for r in json.loads(proc.stdout)] == ["active", "complete", "checkpointed", "pending"]
