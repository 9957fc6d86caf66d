"""async_action_schedule: the last fire time claimed per schedule

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per schedule: a worker enqueues a fire time only if it moves last_fire_at
    # forward, so any number of workers enqueue each fire time once.
    op.create_table(
        "async_action_schedule",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("last_fire_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("async_action_schedule")
