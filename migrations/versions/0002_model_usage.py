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

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# The column_progress view as 0002 recreates it (over the rebuilt tasks table), the same text
# as 0001's, copied here so that a later change to the view never changes what 0002 made.
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
