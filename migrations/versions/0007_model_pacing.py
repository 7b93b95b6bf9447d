"""Model pacing and cost: model_usage.cost (money spent at the model's configured prices) and
model_usage.pacing_json (tokens and requests per minute, budgets and the last x-ratelimit-*
headers, as the model's process last saw them).

Revision ID: 0007
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: Union[str, Sequence[str], None] = "0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("model_usage") as batch:
        batch.add_column(sa.Column("cost", sa.Double, nullable=True))
        batch.add_column(sa.Column("pacing_json", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_usage") as batch:
        batch.drop_column("pacing_json")
        batch.drop_column("cost")
