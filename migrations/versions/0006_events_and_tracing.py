"""Events and tracing: event and trace_context columns, the async_action_rule table

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

HAS_EVENT = sa.text("event IS NOT NULL")


def upgrade() -> None:
    op.add_column("async_action", sa.Column("trace_context", sa.Text()))
    op.add_column("async_action", sa.Column("event", sa.Text()))
    # `list --event`: newest first among the actions an event created.
    op.create_index("async_action_event_idx", "async_action", ["event", "id"],
                    postgresql_where=HAS_EVENT, sqlite_where=HAS_EVENT)
    op.create_table(
        "async_action_rule",
        sa.Column("event", sa.Text(), primary_key=True),
        sa.Column("processor", sa.Text(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("created_by", sa.Text()),
    )


def downgrade() -> None:
    op.drop_table("async_action_rule")
    op.drop_index("async_action_event_idx", "async_action")
    op.drop_column("async_action", "event")
    op.drop_column("async_action", "trace_context")
