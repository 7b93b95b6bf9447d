"""The state of stateful generators after each row group (generator_states), so that resume and
takeover restore it (``Generator.state_dict`` / ``load_state_dict``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "generator_states",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("generator", sa.String(128), nullable=False),
        sa.Column("row_group", sa.Integer, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name=op.f("fk_generator_states_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", "generator", "row_group", name=op.f("pk_generator_states")),
    )


def downgrade() -> None:
    op.drop_table("generator_states")
