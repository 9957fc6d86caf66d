"""Events and rules (SPEC §3): `publish(db, event, data)` records one action per
processor bound to the event, in the caller's transaction; rules live in
`async_action_rule`, so a producer needs neither the processors nor the config.

A worker adds the rules of the processors it serves (`@processor(on=[...])`) when it
starts; operators add and remove them by hand (`asyncactions rule add|remove`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, delete, select

from . import codec
from .action import Action
from .database import Database, connection
from .enqueue import init_action
from .errors import AsyncActionsError
from .schema import NOW, async_action_rule, upsert

r = async_action_rule
MAX_NAME = 200  # characters of an event or processor name in a rule


class Rule(NamedTuple):
    event: str
    processor: str
    created_at: datetime
    created_by: str | None


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
        raise AsyncActionsError(f"{what} must be a name of 1 to {MAX_NAME} characters, got "
                                f"{value!r:.60}")
    codec.check_text(value, what)
    return value


def bound(conn: Connection, event: str) -> list[str]:
    """The processors bound to `event`, by name."""
    return list(conn.execute(select(r.c.processor).where(r.c.event == event)
                             .order_by(r.c.processor)).scalars())


def publish(db: Database, event: str, data: Any = None, *, related_id: str | None = None,
            delay: timedelta | None = None, priority: int = 0,
            ordering_key: str | None = None,
            max_data_bytes: int = codec.MAX_DATA_BYTES) -> list[Action]:
    """Record one action per processor bound to `event` (each with `event` set) in the
    caller's transaction, all or none; returns them, empty when no rule matches."""
    check_name(event, "event")
    with connection(db) as conn:
        return [init_action(conn, name, data, related_id=related_id, delay=delay,
                            priority=priority, ordering_key=ordering_key,
                            max_data_bytes=max_data_bytes, _event=event)
                for name in bound(conn, event)]


def add_rule(db: Database, event: str, processor: str, *,
             created_by: str | None = None) -> bool:
    """Bind `processor` to `event`; false if the rule was there already."""
    check_name(event, "event")
    check_name(processor, "processor")
    with connection(db) as conn:
        stmt = upsert(conn.dialect.name, r).values(event=event, processor=processor,
                                                   created_at=NOW, created_by=created_by)
        added = conn.execute(stmt.on_conflict_do_nothing().returning(r.c.event)).first()
    return added is not None


def add_rules(db: Database, rules: Iterable[tuple[str, str]], *,
              created_by: str | None = None) -> int:
    """add_rule for each (event, processor), in one transaction; how many were new."""
    with connection(db) as conn:
        return sum(add_rule(conn, event, name, created_by=created_by) for event, name in rules)


def remove_rule(db: Database, event: str, processor: str) -> bool:
    """Unbind `processor` from `event`; false if there was no such rule."""
    with connection(db) as conn:
        gone = conn.execute(delete(r).where(r.c.event == event, r.c.processor == processor)
                            .returning(r.c.event)).first()
    return gone is not None


def list_rules(db: Database) -> list[Rule]:
    with connection(db) as conn:
        rows = conn.execute(select(r.c.event, r.c.processor, r.c.created_at, r.c.created_by)
                            .order_by(r.c.event, r.c.processor))
        return [Rule(*row) for row in rows]
