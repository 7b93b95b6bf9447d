"""The tables of the state store, defined once (SQLAlchemy Core) for SQLite and PostgreSQL.

This is the documented, stable layout that `pipeline sql` and plain ``sqlite3`` read (contract
section 8). The Alembic migrations in ``migrations/`` reproduce it exactly; a test compares them.

Times are Unix seconds stored as floating point numbers (``time.time()``). To read them:
``datetime(created_at, 'unixepoch')`` in SQLite, ``to_timestamp(created_at)`` in PostgreSQL.

``runs``
    One row per run. ``status``: running, interrupted, complete, failed. ``config`` is the run's
    config as JSON text, so that a resume needs no file.
``run_columns``
    One row per output column, in config order (``position``), with the generator (config
    entry) that produces it: several columns share one generator for multi-output entries.
``row_groups``
    One row per row group, created 1000 at a time (``ROW_GROUP_BATCH``): with the run, then as
    workers reach the last ones created; a row group with no row yet is pending, and
    ``runs.num_records`` / ``row_group_size`` gives their number. ``state``: pending, active,
    complete, checkpointed. ``rows_dropped``
    counts the distinct dropped records. ``path`` (relative to the home folder) is the Parquet
    file once checkpointed, ``file_bytes`` and ``file_sha256`` its size and SHA-256 digest (hex)
    as written: exports check them, ``pipeline resume --repair`` recomputes a row group whose
    file no longer matches. The file name carries the lease epoch of the worker that wrote it
    (``rg-000007-e2.parquet``); only the file named here is the row group's.
    ``lease_owner``/``lease_epoch``/``lease_expires_at``: the worker holding it; the epoch
    grows with every claim and fences off a worker that lost its lease.
``tasks``
    One row per task that has started, keyed by ``slot`` = ``row_index`` for cell tasks and -1
    for from_scratch and batch tasks (whose ``row_index`` is NULL). ``column_name`` holds the
    generator's name. ``value`` is the JSON of the result (:mod:`pipeline.values`).
    ``requests``/``prompt_tokens``/``completion_tokens``/``finish_reason``: the model calls of an
    ``llm_*`` task and why its last answer stopped (``stop``, ``length``, ...). Rows of a
    checkpointed row group are deleted (compaction), except ``failed`` ones and, in a row group
    with dropped records, the ``done`` rows of those records and of batch/from_scratch tasks
    (what `pipeline retry` needs to bring the records back; the view does not count them).
``dropped_records``
    Dropped records, kept after the checkpoint; ``rows_dropped`` counts them per row group.
``workers``
    Processes working on a run, with their heartbeat.
``run_fingerprints``
    What the run's values were computed from (:mod:`pipeline.fingerprints`): ``kind = 'file'``
    rows name a python module or seed file by absolute path with the sha256 of its bytes;
    ``kind = 'column'`` rows name a generator with the fingerprint of its definition and inputs.
``run_changes``
    One row per change accepted into a run (``resume --accept-changes``): ``kind = 'file'``,
    the file's ``name``, its digest before and after (NULL: not read before / gone) and a
    ``detail`` in words.
``generator_states``
    The state of a stateful generator after each row group it finished
    (``Generator.state_dict()``, JSON as :mod:`pipeline.values` encodes it): resume and takeover
    hand the one of the row group before to ``load_state_dict()``.
view ``column_progress``
    Progress per output column, counted in records (see :data:`COLUMN_PROGRESS_SQL`).
"""

from __future__ import annotations

import sqlalchemy as sa

from pipeline.states import RowGroupState, RunStatus, TaskState

__all__ = [
    "COLUMN_PROGRESS_SQL",
    "SALVAGE_INDEX_WHERE",
    "metadata",
    "runs",
    "run_columns",
    "row_groups",
    "tasks",
    "dropped_records",
    "workers",
    "run_fingerprints",
    "run_changes",
    "generator_states",
    "task_traces",
]

# Named constraints so that migrations can refer to (and later alter) them on every database.
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    """``column IN ('a', 'b')``: the text the migrations hold (values are plain words)."""
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


SALVAGE_INDEX_WHERE = f"state = '{TaskState.DEFERRED}'"

# Unix seconds: DOUBLE PRECISION on PostgreSQL, DOUBLE (REAL affinity) on SQLite.
Time = sa.Double

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("num_records", sa.BigInteger, nullable=False),
    sa.Column("row_group_size", sa.Integer, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.String(128), nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("finished_at", Time, nullable=True),
    sa.CheckConstraint(_one_of("status", tuple(RunStatus)), name="status"),
    sa.Index(None, "created_at"),
)

run_columns = sa.Table(
    "run_columns",
    metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), primary_key=True),
    sa.Column("column_name", sa.Text, primary_key=True),
    sa.Column("generator", sa.Text, nullable=False),
    sa.Column("strategy", sa.String(16), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
)

row_groups = sa.Table(
    "row_groups",
    metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), primary_key=True),
    sa.Column("row_group", sa.Integer, primary_key=True),
    sa.Column("num_rows", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("rows_dropped", sa.Integer, nullable=False, server_default="0"),
    sa.Column("path", sa.Text, nullable=True),
    sa.Column("lease_owner", sa.Text, nullable=True),
    sa.Column("lease_epoch", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_expires_at", Time, nullable=True),
    sa.Column("file_bytes", sa.BigInteger, nullable=True),
    sa.Column("file_sha256", sa.String(64), nullable=True),
    sa.CheckConstraint(_one_of("state", tuple(RowGroupState)), name="state"),
)

# The hot table: every event writes it. Hence no foreign key (record() checks the row group's
# lease in the same transaction anyway) and no CHECK on state/task_type (measured on SQLite 3.40:
# two IN-list CHECKs halve the upsert rate, 255k -> 110k rows/s); the store writes only the
# values of pipeline.states.TaskState and TaskType.
tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("row_group", sa.Integer, primary_key=True),
    sa.Column("column_name", sa.Text, primary_key=True),
    sa.Column("slot", sa.Integer, primary_key=True),
    sa.Column("row_index", sa.Integer, nullable=True),
    sa.Column("task_type", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_eligible_at", Time, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("value", sa.Text, nullable=True),
    sa.Column("updated_at", Time, nullable=False),
    # Model calls of llm_* tasks (all attempts): NULL for other tasks.
    sa.Column("requests", sa.Integer, nullable=True),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=True),
    sa.Column("completion_tokens", sa.BigInteger, nullable=True),
    # Why the model stopped in the task's last answer (stop, length, ...): NULL for other tasks.
    sa.Column("finish_reason", sa.String(64), nullable=True),
    # Salvage: "deferred tasks of this run whose time has come", in eligibility order. Partial,
    # so that the hot path's transitions between in_flight and done never touch it (measured:
    # a full index on state costs a third of the upsert rate on SQLite).
    sa.Index(
        None,
        "run_id",
        "state",
        "next_eligible_at",
        sqlite_where=sa.text(SALVAGE_INDEX_WHERE),
        # The migration (0001) makes it partial on PostgreSQL too. `postgresql_where` here would
        # import SQLAlchemy's PostgreSQL dialect into every SQLite process: 16 ms of each
        # command's start (measured). tests/test_migrations.py checks both indexes are partial.
    ),
    # SQLite: rows live in the primary key's B-tree (no rowid table beside it), so each write
    # updates one B-tree instead of two: upserts 17% and compaction deletes 25% cheaper (measured).
    sqlite_with_rowid=False,
)

#: The upsert of a task row, shared by the SQLite and PostgreSQL writers: a state change keeps
#: the attempts and error of the last DEFERRED/FAILED; a "full" change sets them too.
ON_CONFLICT_STATE = (
    "ON CONFLICT (run_id, row_group, column_name, slot) DO UPDATE SET "
    "task_type = excluded.task_type, state = excluded.state, value = excluded.value, "
    "updated_at = excluded.updated_at"
)
ON_CONFLICT_FULL = ON_CONFLICT_STATE + (
    ", attempts = excluded.attempts, next_eligible_at = excluded.next_eligible_at, last_error = excluded.last_error"
)

dropped_records = sa.Table(
    "dropped_records",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("row_group", sa.Integer, primary_key=True),
    sa.Column("row_index", sa.Integer, primary_key=True),
    sa.ForeignKeyConstraint(["run_id", "row_group"], ["row_groups.run_id", "row_groups.row_group"]),
)

# Model usage per run, model alias and generator: the sums of the tasks' usage, kept after
# compaction; ``concurrency`` is the model's adaptive limit at the last update; ``calls_saved``
# counts finished model calls that resumes did not have to make again (per resume, the cells done
# when it began, added once by the process that found no other live worker); ``truncated`` the kept
# llm_text answers cut by ``finish_reason = 'length'`` (status: columns.<name>.truncated).
model_usage = sa.Table(
    "model_usage",
    metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), primary_key=True),
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("generator", sa.Text, primary_key=True),
    sa.Column("requests", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("rate_limited", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("concurrency", sa.Integer, nullable=True),
    sa.Column("calls_saved", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("truncated", sa.BigInteger, nullable=False, server_default="0"),
    # Money spent at the model's configured prices (NULL without prices), and the model's pacing
    # as its process last saw it: JSON of pipeline.llm.pacing.Pacer.snapshot() (0007).
    sa.Column("cost", sa.Double, nullable=True),
    sa.Column("pacing_json", sa.Text, nullable=True),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), primary_key=True),
    sa.Column("owner", sa.Text, primary_key=True),
    sa.Column("heartbeat_at", Time, nullable=False),
    sa.Column("started_at", Time, nullable=False),
)

run_fingerprints = sa.Table(
    "run_fingerprints",
    metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.CheckConstraint(_one_of("kind", ("file", "column")), name="kind"),
)

run_changes = sa.Table(
    "run_changes",
    metadata,
    sa.Column("change_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), nullable=False),
    sa.Column("changed_at", Time, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("old_digest", sa.String(64), nullable=True),
    sa.Column("new_digest", sa.String(64), nullable=True),
    sa.Column("detail", sa.Text, nullable=False),
)

#: The ``column_progress`` view, in SQL that SQLite and PostgreSQL both accept. Each migration
#: that creates the view carries its own copy of the text (0001, 0002), so that changing it here
#: never changes what an old migration makes: a change to the view is a new migration with the
#: new text, and this constant follows (a test compares the head's view with it).
#:
#: Counts are in records. A checkpointed row group counts its kept records as done for every
#: column (its task rows are gone). In a live row group a cell task counts 1 and a batch or
#: from_scratch task counts its row group's kept records, in the bucket of its state; cells of
#: dropped records count nowhere but in ``rows_failed`` (when they failed). Failed task rows,
#: kept forever, count 1 (cell) or the row group's rows (batch) in ``rows_failed``.
#:
#: Shaped so that ``WHERE run_id = ?`` reaches every table: the view is one aggregate grouped
#: by run_columns' key, so the filter lands on ``c.run_id`` and the joins walk the run's row
#: groups and, per row group, the generator's task rows by primary-key prefix. (A LEFT JOIN to
#: a subquery aggregated over all tasks would scan every run's tasks on each poll.)
COLUMN_PROGRESS_SQL = """\
CREATE VIEW column_progress AS
SELECT c.run_id AS run_id,
       c.column_name AS column_name,
       MAX(r.num_records) AS rows_total,
       COALESCE((SELECT SUM(k.num_rows - k.rows_dropped) FROM row_groups k
                 WHERE k.run_id = c.run_id AND k.state = 'checkpointed'), 0)
       + SUM(CASE WHEN t.state = 'done' AND g.state <> 'checkpointed' THEN
                 CASE WHEN t.row_index IS NULL THEN g.num_rows - g.rows_dropped
                      WHEN d.row_index IS NULL THEN 1 ELSE 0 END
             ELSE 0 END) AS rows_done,
       SUM(CASE WHEN t.state = 'failed' THEN
                 CASE WHEN t.row_index IS NULL THEN g.num_rows ELSE 1 END
           ELSE 0 END) AS rows_failed,
       SUM(CASE WHEN t.state = 'deferred' AND g.state <> 'checkpointed' THEN
                 CASE WHEN t.row_index IS NULL THEN g.num_rows - g.rows_dropped
                      WHEN d.row_index IS NULL THEN 1 ELSE 0 END
           ELSE 0 END) AS rows_deferred,
       SUM(CASE WHEN t.state = 'in_flight' AND g.state <> 'checkpointed' THEN
                 CASE WHEN t.row_index IS NULL THEN g.num_rows - g.rows_dropped
                      WHEN d.row_index IS NULL THEN 1 ELSE 0 END
           ELSE 0 END) AS rows_in_flight
FROM run_columns c
JOIN runs r ON r.run_id = c.run_id
LEFT JOIN row_groups g ON g.run_id = c.run_id
LEFT JOIN tasks t
       ON t.run_id = g.run_id AND t.row_group = g.row_group AND t.column_name = c.generator
LEFT JOIN dropped_records d
       ON d.run_id = t.run_id AND d.row_group = t.row_group AND d.row_index = t.row_index
GROUP BY c.run_id, c.column_name"""


generator_states = sa.Table(
    "generator_states",
    metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), primary_key=True),
    sa.Column("generator", sa.String(128), primary_key=True),
    sa.Column("row_group", sa.Integer, primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
)


#: One row per task attempt of a run traced with ``--trace`` (``settings.trace``): when it was
#: dispatched, started (its inputs read) and finished, and how it ended: ``ok``, ``deferred`` (a
#: retryable failure: tried again later), ``rate_limited`` (a 429: waits, not an attempt),
#: ``failed`` (for good), ``cancelled`` (the run stopped). ``worker`` is the process
#: (``host:pid:start:random``): each invocation of a killed and resumed run has its own.
#: ``attempt`` counts from 1 per task within one worker process.
task_traces = sa.Table(
    "task_traces",
    metadata,
    sa.Column("trace_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), nullable=False),
    sa.Column("worker", sa.Text, nullable=False),
    sa.Column("column_name", sa.String(128), nullable=False),
    sa.Column("row_group", sa.Integer, nullable=False),
    sa.Column("row_index", sa.Integer, nullable=True),
    sa.Column("task_type", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("dispatched_at", Time, nullable=False),
    sa.Column("started_at", Time, nullable=True),
    sa.Column("finished_at", Time, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Index("ix_task_traces_run_id_dispatched_at", "run_id", "dispatched_at"),
)
