"""Events and rules (SPEC §3): `publish(db, event, data)` records one action per
processor bound to the event, in the caller's transaction; rules live in
`async_action_rule`, so a producer needs neither the processors nor the config.

A worker adds the rules of the processors it serves (`@processor(on=[...])`) when it
starts; operators add and remove them by hand (`asyncactions rule add|remove`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, Text, bindparam, delete, exists, func, insert, select

from . import codec, payloads, processors, tracing
from .action import Action
from .database import Database, HotStatement, connection
from .enqueue import _check_key, _insert_values, _new_action, _options
from .errors import AsyncActionsError
from .notifier import NOTIFY_CHANNEL
from .schema import NOW, as_payload, async_action, async_action_rule, upsert

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


def publish(db: Database, event: str, data: Any = None, *, related_id: str | None = None,
            delay: timedelta | None = None, priority: int = 0,
            ordering_key: str | None = None,
            max_data_bytes: int = codec.MAX_DATA_BYTES) -> list[Action]:
    """Record one action per processor bound to `event` (each with `event` set) in the
    caller's transaction, all or none; returns them, empty when no rule matches.

    One statement, like init_action: it reads the rules and inserts their actions (and,
    on PostgreSQL, sends each processor's wake-up). The data is checked beforehand
    against every schema registered here; the statement inserts nothing when a
    processor whose schema refused it is bound, and that refusal is raised."""
    check_name(event, "event")
    options = _options(event, delay, None, None, priority)
    _check_key(ordering_key, "ordering_key")
    refused = _refusals(data)
    data = payloads.plain(data)
    text = None if data is None else codec.dumps(data, max_bytes=max_data_bytes)
    span = tracing.start_producer(event)  # None unless the application traces
    params = {"data": text, "related_id": related_id, "unique_key": None,
              "ordering_key": ordering_key, "trace_context": tracing.traceparent(span),
              "event": event, "refused": json.dumps(sorted(refused)), **options}
    actions: list[Action] = []
    try:
        with connection(db, one_statement=True) as conn:
            rows = _publish_stmt(conn.dialect.name).rows(conn, params)
            if not rows and refused:
                _raise_if_bound(conn, event, refused)
        rows.sort(key=lambda row: row[1])  # RETURNING's order is the server's
        actions = [_new_action((row[0], row[2], row[3]), data, {**params, "processor": row[1]})
                   for row in rows]
    finally:
        tracing.end_producer(span, [a.id for a in actions])
    return actions


def _refusals(data: Any) -> dict[str, Exception]:
    """What each schema registered here says against `data`, by processor. The rules are
    read by the statement itself, so every registered schema is asked, bound or not."""
    refused: dict[str, Exception] = {}
    if data is None:
        return refused
    for name, registered in processors.registered().items():
        if registered.settings.schema is not None:
            try:
                payloads.validate(registered.settings.schema, data)
            except Exception as exc:  # raised only if that processor is bound
                refused[name] = exc
    return refused


def _raise_if_bound(conn: Connection, event: str, refused: dict[str, Exception]) -> None:
    """The statement inserted nothing: raise the refusal of a bound processor, if any
    (as enqueueing them one by one in name order would have)."""
    first = conn.execute(select(r.c.processor).where(r.c.event == event,
                                                     r.c.processor.in_(refused))
                         .order_by(r.c.processor).limit(1)).scalar()
    if first is not None:
        raise refused[first]


@functools.cache
def _publish_stmt(dialect: str) -> HotStatement:
    """INSERT … SELECT from the event's rules, unless one of them names a processor in
    the JSON array `refused`; RETURNING (id, processor, created_at, next_eligible_at)
    and, on PostgreSQL, each processor's wake-up (delivered at commit)."""
    refused_json = as_payload(bindparam("refused", type_=Text))
    elements = (func.jsonb_array_elements_text(refused_json) if dialect == "postgresql"
                else func.json_each(bindparam("refused", type_=Text)))
    refused = elements.table_valued("value")
    other = r.alias("other")
    # Uncorrelated: PostgreSQL runs it once, not once per rule.
    none_refused = ~exists().where(other.c.event == bindparam("event", type_=Text),
                                   other.c.processor.in_(select(refused.c.value)))
    values = _insert_values(False, as_payload(bindparam("data", type_=Text)))
    values.update(processor=r.c.processor, event=r.c.event)
    rows = (select(*values.values()).where(r.c.event == bindparam("event", type_=Text),
                                           none_refused)
            .order_by(r.c.processor))
    t = async_action
    returning: list[Any] = [t.c.id, t.c.processor, t.c.created_at, t.c.next_eligible_at]
    if dialect == "postgresql":
        returning.append(func.pg_notify(NOTIFY_CHANNEL, t.c.processor))
    return HotStatement(insert(t).from_select(list(values), rows).returning(*returning))


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
