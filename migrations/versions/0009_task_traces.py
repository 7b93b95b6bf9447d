"""Per-attempt traces of runs traced with --trace (task_traces), read by `pipeline report`.

Revision ID: 0009
Revises: 0007 (re-chained on merge)
Create Date: 2026-11-30
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: Union[str, Sequence[str], None] = "0007"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "task_traces",
        sa.Column("trace_id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("worker", sa.Text, nullable=False),
        sa.Column("column_name", sa.String(128), nullable=False),
        sa.Column("row_group", sa.Integer, nullable=False),
        sa.Column("row_index", sa.Integer, nullable=True),
        sa.Column("task_type", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("dispatched_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double, nullable=True),
        sa.Column("finished_at", sa.Double, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name=op.f("fk_task_traces_run_id_runs")),
        sa.PrimaryKeyConstraint("trace_id", name=op.f("pk_task_traces")),
    )
    op.create_index("ix_task_traces_run_id_dispatched_at", "task_traces", ["run_id", "dispatched_at"])


def downgrade() -> None:
    op.drop_index("ix_task_traces_run_id_dispatched_at", table_name="task_traces")
    op.drop_table("task_traces")
