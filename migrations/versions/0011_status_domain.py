"""PostgreSQL: the status is checked by a domain, not by a table constraint

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

PostgreSQL prepares a table's CHECK constraints anew for every INSERT or UPDATE
statement (it reads the stored expression back and plans it), which cost a one-row
enqueue ~13 us of the ~75 us the server spends on it. A domain's constraint is cached
by the server, already planned: ~2 us. The rule is the same (one of the five statuses), and a
status outside it is refused with the constraint's name as before.

The table is not rewritten: the column first becomes a domain with no constraint
(binary-compatible with text), then the constraint is added NOT VALID, since every
existing row has passed the table constraint it replaces. PostgreSQL does rebuild the
seven indexes that mention the status, under the table's lock: 2.3 s for a table of
1,000,000 actions on a 2-core machine (statements on the table wait meanwhile).
SQLite keeps its table constraint, which costs next to nothing there.
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

STATUSES = ("pending", "running", "completed", "failed", "canceled")
CHECK = f"VALUE IN {STATUSES}"


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("CREATE DOMAIN async_action_status AS text")
    op.drop_constraint("async_action_status_check", "async_action", type_="check")
    op.execute("ALTER TABLE async_action ALTER COLUMN status TYPE async_action_status")
    op.execute("ALTER DOMAIN async_action_status ADD CONSTRAINT async_action_status_check "
               f"CHECK ({CHECK}) NOT VALID")


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE async_action ALTER COLUMN status TYPE text")
    op.execute("DROP DOMAIN async_action_status")
    op.create_check_constraint("async_action_status_check", "async_action",
                               f"status IN {STATUSES}")
