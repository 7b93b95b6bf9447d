"""The initial state store: runs, run_columns, row_groups, tasks, dropped_records, workers and
the column_progress view.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# The column_progress view as 0001 creates it: its own copy of the text, so that a later
# change to the view (in pipeline.store.schema and a new migration) never changes what 0001 made.
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


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("num_records", sa.BigInteger, nullable=False),
        sa.Column("row_group_size", sa.Integer, nullable=False),
        sa.Column("seed", sa.BigInteger, nullable=False),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("finished_at", sa.Double, nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'interrupted', 'complete', 'failed')", name=op.f("ck_runs_status")
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_runs")),
    )
    op.create_index(op.f("ix_runs_created_at"), "runs", ["created_at"])

    op.create_table(
        "run_columns",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("column_name", sa.Text, nullable=False),
        sa.Column("generator", sa.Text, nullable=False),
        sa.Column("strategy", sa.String(16), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name=op.f("fk_run_columns_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", "column_name", name=op.f("pk_run_columns")),
    )

    op.create_table(
        "row_groups",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("row_group", sa.Integer, nullable=False),
        sa.Column("num_rows", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("rows_dropped", sa.Integer, nullable=False, server_default="0"),
        sa.Column("path", sa.Text, nullable=True),
        sa.Column("lease_owner", sa.Text, nullable=True),
        sa.Column("lease_epoch", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_expires_at", sa.Double, nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'active', 'complete', 'checkpointed')", name=op.f("ck_row_groups_state")
        ),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name=op.f("fk_row_groups_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", "row_group", name=op.f("pk_row_groups")),
    )

    op.create_table(
        "tasks",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("row_group", sa.Integer, nullable=False),
        sa.Column("column_name", sa.Text, nullable=False),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("row_index", sa.Integer, nullable=True),
        sa.Column("task_type", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_eligible_at", sa.Double, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("value", sa.Text, nullable=True),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "row_group", "column_name", "slot", name=op.f("pk_tasks")),
    )
    op.create_index(
        op.f("ix_tasks_run_id_state_next_eligible_at"),
        "tasks",
        ["run_id", "state", "next_eligible_at"],
        sqlite_where=sa.text("state = 'deferred'"),
        postgresql_where=sa.text("state = 'deferred'"),
    )

    op.create_table(
        "dropped_records",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("row_group", sa.Integer, nullable=False),
        sa.Column("row_index", sa.Integer, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id", "row_group"],
            ["row_groups.run_id", "row_groups.row_group"],
            name=op.f("fk_dropped_records_run_id_row_groups"),
        ),
        sa.PrimaryKeyConstraint("run_id", "row_group", "row_index", name=op.f("pk_dropped_records")),
    )

    op.create_table(
        "workers",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("heartbeat_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name=op.f("fk_workers_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", "owner", name=op.f("pk_workers")),
    )

    op.execute(COLUMN_PROGRESS_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS column_progress")
    op.drop_table("workers")
    op.drop_table("dropped_records")
    op.drop_index(op.f("ix_tasks_run_id_state_next_eligible_at"), table_name="tasks")
    op.drop_table("tasks")
    op.drop_table("row_groups")
    op.drop_table("run_columns")
    op.drop_index(op.f("ix_runs_created_at"), table_name="runs")
    op.drop_table("runs")
