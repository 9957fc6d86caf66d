"""Audit indexes only on the rows they serve

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Every status change writes a new row version and so an entry in every index whose
# predicate it meets: leaving out the rows an index never serves (no related_id; not
# finished yet) saves work on each claim and each outcome.
RELATED = sa.text("related_id IS NOT NULL")
FINISHED = sa.text("finished_at IS NOT NULL")


def upgrade() -> None:
    op.drop_index("async_action_related_idx", "async_action")
    op.drop_index("async_action_status_finished_idx", "async_action")
    op.create_index("async_action_related_idx", "async_action", ["related_id"],
                    postgresql_where=RELATED, sqlite_where=RELATED)
    op.create_index("async_action_status_finished_idx", "async_action",
                    ["status", "finished_at"], postgresql_where=FINISHED,
                    sqlite_where=FINISHED)


def downgrade() -> None:
    op.drop_index("async_action_related_idx", "async_action")
    op.drop_index("async_action_status_finished_idx", "async_action")
    op.create_index("async_action_related_idx", "async_action", ["related_id"])
    op.create_index("async_action_status_finished_idx", "async_action",
                    ["status", "finished_at"])
