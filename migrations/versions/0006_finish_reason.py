"""Why the model stopped: ``tasks.finish_reason`` per llm_* task, and ``model_usage.truncated``,
the kept llm_text answers cut by ``finish_reason = 'length'`` (kept after compaction).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from pipeline.store.schema import COLUMN_PROGRESS_SQL  # unchanged since 0001

revision: str = "0006"
down_revision: Union[str, Sequence[str], None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Nullable / defaulted columns: a plain ALTER TABLE ADD COLUMN on both databases (no rebuild
    # of the hot table, whatever it holds).
    op.add_column("tasks", sa.Column("finish_reason", sa.String(64), nullable=True))
    op.add_column("model_usage", sa.Column("truncated", sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS column_progress")  # SQLite rebuilds `tasks` under it
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table("model_usage") as batch:
        batch.drop_column("truncated")
    with op.batch_alter_table("tasks", recreate="always" if sqlite else "auto",
                              table_kwargs={"sqlite_with_rowid": False} if sqlite else {}) as batch:
        batch.drop_column("finish_reason")
    op.execute(COLUMN_PROGRESS_SQL)
