"""Model usage: requests and tokens per task, and the model_usage table (sums per run, model
alias and generator, the model's concurrency, and the finished calls resumes saved). On SQLite,
`tasks` becomes a WITHOUT ROWID table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from pipeline.store.schema import COLUMN_PROGRESS_SQL  # unchanged since 0001

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # SQLite rebuilds `tasks` (now WITHOUT ROWID: one B-tree per write instead of two); the view
    # over it must not exist meanwhile. PostgreSQL just adds the columns.
    op.execute("DROP VIEW IF EXISTS column_progress")
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table("tasks", recreate="always" if sqlite else "auto",
                              table_kwargs={"sqlite_with_rowid": False} if sqlite else {}) as batch:
        batch.add_column(sa.Column("requests", sa.Integer, nullable=True))
        batch.add_column(sa.Column("prompt_tokens", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("completion_tokens", sa.BigInteger, nullable=True))
    op.execute(COLUMN_PROGRESS_SQL)
    op.create_table(
        "model_usage",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("generator", sa.Text, nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("rate_limited", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("concurrency", sa.Integer, nullable=True),
        sa.Column("calls_saved", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name=op.f("fk_model_usage_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", "model", "generator", name=op.f("pk_model_usage")),
    )


def downgrade() -> None:
    op.drop_table("model_usage")
    op.execute("DROP VIEW IF EXISTS column_progress")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("completion_tokens")
        batch.drop_column("prompt_tokens")
        batch.drop_column("requests")
    op.execute(COLUMN_PROGRESS_SQL)
