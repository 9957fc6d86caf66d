"""Processor-fair claim: the claim index leads with the processor

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

A claim for several processors walked one index of every pending action, oldest
eligibility first, so a backlog of one processor (a retry storm: 10,000 actions failing
with a zero retry interval) stood in front of every other processor's actions (a healthy
processor's pickup p99: 1.8 s). With the processor first, the claim walks each
processor's part apart and shares the free slots round robin (queries._fair), and a
claim of one processor no longer walks past another's backlog (15 ms -> 0.25 ms behind
90,000 pending actions of another processor). Same name, same predicate, so an action
costs no more index entries (see 0008); each is wider by the processor's name (a bulk
enqueue of 20,000: about 8% slower). The table's storage settings are untouched.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

PENDING = sa.text("status = 'pending'")


def _claim_index(columns: list[str]) -> None:
    op.drop_index("async_action_claim_idx", "async_action")
    op.create_index("async_action_claim_idx", "async_action", columns,
                    postgresql_where=PENDING, sqlite_where=PENDING)


def upgrade() -> None:
    _claim_index(["processor", "priority", "next_eligible_at", "id"])


def downgrade() -> None:
    _claim_index(["priority", "next_eligible_at", "id"])
