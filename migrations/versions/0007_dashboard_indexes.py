"""Dashboard indexes: lists filtered by processor, and windows by created_at

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

A list filtered by a processor that has few (or no) actions walked the whole primary key
(434 ms with 1,000,000 actions); `stats` and the bulk confirmation scanned by created_at.
Each costs an enqueue one index entry; neither column ever changes, so outcome writes
keep their cost.
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("async_action_processor_id_idx", "async_action", ["processor", "id"])
    op.create_index("async_action_created_idx", "async_action", ["created_at"])


def downgrade() -> None:
    op.drop_index("async_action_created_idx", "async_action")
    op.drop_index("async_action_processor_id_idx", "async_action")
