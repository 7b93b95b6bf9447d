"""Fingerprints per file and per column of each run (run_fingerprints), and the changes a
resume accepted (run_changes).

Revision ID: 0004
Revises: 0002 (re-chained after 0003 on merge)
Create Date: 2026-12-01
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "run_fingerprints",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.CheckConstraint("kind IN ('file', 'column')", name=op.f("ck_run_fingerprints_kind")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name=op.f("fk_run_fingerprints_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", "kind", "name", name=op.f("pk_run_fingerprints")),
    )
    op.create_table(
        "run_changes",
        sa.Column("change_id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("changed_at", sa.Double, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("old_digest", sa.String(64), nullable=True),
        sa.Column("new_digest", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name=op.f("fk_run_changes_run_id_runs")),
        sa.PrimaryKeyConstraint("change_id", name=op.f("pk_run_changes")),
    )


def downgrade() -> None:
    op.drop_table("run_changes")
    op.drop_table("run_fingerprints")
