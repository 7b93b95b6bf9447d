"""Row-group files are checked: ``row_groups.file_bytes`` and ``row_groups.file_sha256`` record
the size and SHA-256 digest of each checkpointed Parquet file (NULL for files written before
this revision: those are only checked for existence and readability).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Nullable columns: a plain ALTER TABLE ADD COLUMN on both databases (SQLite keeps the
    # table, its foreign keys and the view over it as they are).
    op.add_column("row_groups", sa.Column("file_bytes", sa.BigInteger, nullable=True))
    op.add_column("row_groups", sa.Column("file_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    # SQLite 3.35+ drops a column in place (ALTER TABLE DROP COLUMN); the view does not read them.
    op.drop_column("row_groups", "file_sha256")
    op.drop_column("row_groups", "file_bytes")
