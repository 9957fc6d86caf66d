"""Join the application's own Alembic setup (SPEC §2).

In the application's env.py::

    context.configure(..., include_name=asyncactions.alembic.include_name)

and in one of its migrations::

    def upgrade():
        asyncactions.alembic.upgrade(op, "0011")

    def downgrade():
        asyncactions.alembic.downgrade(op, "base")
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from alembic.operations import Operations

from . import migrate
from .errors import AsyncActionsError

VERSION_TABLE = migrate.VERSION_TABLE


def owns(table_name: str | None) -> bool:
    """Whether a table is asyncactions': ours now and those later releases add."""
    return table_name is not None and (table_name in ("async_action", VERSION_TABLE)
                                       or table_name.startswith("async_action_"))


def include_name(name: str | None, type_: str, parent_names: Mapping[str, Any]) -> bool:
    """Alembic's `include_name` hook: autogenerate then never proposes to create, alter
    or drop asyncactions' tables, their indexes or their version table."""
    if type_ == "table":
        return not owns(name)
    return not owns(parent_names.get("table_name"))


def upgrade(op: Operations | ModuleType, revision: str = "head") -> None:
    """Bring asyncactions' schema up to `revision` inside the application migration that
    calls this, in its transaction, recorded in asyncactions_alembic_version. Prefer a
    fixed revision (as "0011") to "head": the migration then does the same thing forever."""
    migrate.check_revision(revision)
    migrate.upgrade_on(_connection(op), revision)


def downgrade(op: Operations | ModuleType, revision: str) -> None:
    """Take asyncactions' schema down to `revision` ("base": remove it) inside the
    application migration that calls this."""
    migrate.check_revision(revision)
    migrate.downgrade_on(_connection(op), revision)


def _connection(op: Operations | ModuleType) -> Any:
    if op.get_context().as_sql:
        raise AsyncActionsError(
            "asyncactions.alembic cannot write offline SQL (alembic --sql): get asyncactions' "
            "part with `asyncactions db sql --from REV`")
    return op.get_bind()
