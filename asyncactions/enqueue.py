"""The outbox: record actions inside the caller's own transaction.

The row and, on PostgreSQL, the wake-up notification belong to the caller's
transaction, so a rolled-back transaction leaves no action and wakes nobody.
"""

from __future__ import annotations

import functools
import gc
import inspect
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Float,
    Integer,
    Row,
    Text,
    bindparam,
    cast,
    func,
    insert,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlalchemy.util import await_only

from . import codec, payloads, pipelined, tracing
from .action import Action, Status, row_to_action
from .database import Database, HotStatement, connection, kept_cursor
from .durations import check_duration
from .errors import AsyncActionsError
from .notifier import NOTIFY_CHANNEL
from .processors import MAX_RETRIES, lookup
from .schema import (
    ACTIVE_STATUSES,
    ID_SEQUENCE,
    LIVE_KEY,
    NOW,
    action_columns,
    as_payload,
    async_action,
    db_now,
    upsert,
)

# _options' answer when every option is left at its default: the common enqueue.
_DEFAULT_OPTIONS = {"retries": None, "priority": 0, "delay": 0.0, "eligible_at": None}


def _options(processor: str, delay: timedelta | None, eligible_at: datetime | None,
             retries: int | None, priority: int) -> dict[str, Any]:
    if delay is None and eligible_at is None and retries is None and priority == 0:
        return _DEFAULT_OPTIONS
    if delay is not None and eligible_at is not None:
        raise AsyncActionsError("give either delay or eligible_at, not both")
    # None stays NULL: the worker that first claims the action sets it from the
    # processor's settings there (the producer need not know the processor).
    if retries is not None and not 0 <= retries <= MAX_RETRIES:
        raise AsyncActionsError(f"retries must be from 0 to {MAX_RETRIES}, got {retries}")
    if delay is not None:
        check_duration(delay, what="delay")
    if not -32768 <= priority <= 32767:
        raise AsyncActionsError(f"priority must fit a smallint (-32768..32767), got {priority}")
    return {"retries": retries, "priority": priority,
            "delay": (delay or timedelta(0)).total_seconds(), "eligible_at": eligible_at}


# The options of a single enqueue, each with the value that means "not given": a column
# not given is left out of the statement and takes its default (NULL, priority 0,
# eligible now). The common enqueue then binds 2 parameters, not 13, which saves the
# client and the server ~7 us of a ~200 us statement (issue 17's S2 kept).
_OPTIONAL = (("related_id", None), ("priority", 0), ("retries", None), ("unique_key", None),
             ("ordering_key", None), ("trace_context", None), ("event", None),
             ("delay", 0.0), ("eligible_at", None))


def _insert_values(explicit_time: bool, data: Any,
                   given: Iterable[str] | None = None) -> dict[str, Any]:
    """Column values shared by single and bulk inserts; `data` is the data expression.
    With `given`, the optional columns not in it are left out (see _OPTIONAL)."""
    values = {
        "processor": bindparam("processor", type_=Text),
        "status": literal_column(f"'{Status.PENDING.value}'", Text),  # a constant, not bound
        "data": data,
        "related_id": bindparam("related_id", type_=Text),
        "priority": bindparam("priority"),
        "retries": bindparam("retries"),
        "unique_key": bindparam("unique_key", type_=Text),
        "ordering_key": bindparam("ordering_key", type_=Text),
        "trace_context": bindparam("trace_context", type_=Text),
        "event": bindparam("event", type_=Text),
        "next_eligible_at": (bindparam("eligible_at", type_=async_action.c.next_eligible_at.type)
                             if explicit_time else db_now(bindparam("delay", type_=Float))),
        "created_at": NOW,
    }
    if given is not None:
        left_out = {name for name, _ in _OPTIONAL} - set(given)
        for name in left_out & values.keys():
            del values[name]
        if not explicit_time and "delay" in left_out:
            values["next_eligible_at"] = NOW
    return values


def _insert_for(dialect: str, params: dict[str, Any]) -> HotStatement:
    """The single-row insert of `params`: one statement per set of options given."""
    return _insert_stmt(dialect, tuple([name for name, unset in _OPTIONAL
                                        if params[name] != unset]))


def _returning(dialect: str) -> list[Any]:
    cols: list[Any] = [async_action.c.id, async_action.c.created_at,
                       async_action.c.next_eligible_at]
    if dialect == "postgresql":
        # Delivered at commit, never on rollback; an uncorrelated subquery runs once,
        # so a bulk insert sends one notification.
        cols.append(select(func.pg_notify(literal_column(f"'{NOTIFY_CHANNEL}'", Text),
                                          bindparam("processor", type_=Text)))
                    .scalar_subquery())
    return cols


def init_action(db: Database, processor: str, data: Any = None, *,
                related_id: str | None = None, delay: timedelta | None = None,
                eligible_at: datetime | None = None, retries: int | None = None,
                priority: int = 0, unique_key: str | None = None,
                ordering_key: str | None = None,
                max_data_bytes: int = codec.MAX_DATA_BYTES, wait: bool = True,
                _event: str | None = None) -> Action:
    """Record one action in the caller's transaction and return it with its id.

    With a `unique_key` held by a pending or running action, nothing is inserted and
    that action is returned instead. Actions sharing an `ordering_key` run one at a
    time, in id order.

    `wait=False` saves the statement's round trip: on PostgreSQL (psycopg, a Session or
    Connection in a transaction) the row and its notification are sent with the
    transaction's COMMIT, in one message, or just before the next statement on that
    connection, whichever comes first (pipelined.py). The returned action's id,
    created_at and next_eligible_at are known from then on. Elsewhere (SQLite, an Engine,
    autocommit, asyncio, a transaction pooler) it is the plain enqueue.
    """
    options = _options(processor, delay, eligible_at, retries, priority)
    _check_key(ordering_key, "ordering_key")
    if not wait and unique_key is not None:
        raise AsyncActionsError("init_action(wait=False) cannot take a unique_key: which action "
                                "holds the key is only known by waiting; drop one of them")
    data = payloads.for_enqueue(_schema(processor), data)
    text = None if data is None else codec.dumps(data, max_bytes=max_data_bytes)
    span = tracing.start_producer(processor)  # None unless the application traces
    params = {"processor": processor, "data": text, "related_id": related_id,
              "unique_key": unique_key, "ordering_key": ordering_key,
              "trace_context": None if span is None else tracing.traceparent(span),
              "event": _event, **options}
    # One statement, unless a unique_key is taken: then each look-up and retry is a
    # statement of its own anyway (see _insert_one).
    action: Action | None = None
    try:
        conn = db.connection() if isinstance(db, Session) else db
        if type(conn) is Connection:  # the common case, without a generator's set-up
            stmt = _insert_for(conn.dialect.name, params)
            if wait or not pipelined.usable(conn):
                action = _insert_one(conn, stmt, data, params)
            else:
                action = pipelined.queue(conn, stmt, params,
                                         _new_action((None, None, None), data, params))
        else:
            with connection(db, one_statement=True) as conn:
                action = _insert_one(conn, _insert_for(conn.dialect.name, params), data,
                                     params)
    finally:
        if span is not None:
            tracing.end_producer(span, [action.id] if action else [])
    return action


def _schema(processor: str) -> Any:
    """The schema of `processor` where it is registered in this process, else None."""
    registered = lookup(processor)
    return None if registered is None else registered.settings.schema


UniqueKeys = Callable[[Any], str | None] | Sequence[str | None]


def init_actions(db: Database, processor: str, data: Sequence[Any], *,
                 related_id: str | None = None, delay: timedelta | None = None,
                 eligible_at: datetime | None = None, retries: int | None = None,
                  priority: int = 0, unique_key: UniqueKeys | None = None,
                 ordering_key: OrderingKeys | None = None,
                 max_data_bytes: int = codec.MAX_DATA_BYTES) -> list[Action]:
    """Record many actions of one processor in one statement (one round trip); returns
    one Action per item of `data`, in order.

    `unique_key` gives each action its own key: a function of its data, or a list as
    long as `data` (None for no key). Where a pending or running action, or an earlier
    item of the same call, already holds the key, nothing is inserted and that action
    takes the item's place in the result.

    `ordering_key` likewise: a function of the data, a list, or one str for them all.
    """
    options = _options(processor, delay, eligible_at, retries, priority)
    data = payloads.many_for_enqueue(_schema(processor), data)
    if not isinstance(data, list | tuple):
        data = list(data)  # encoded in slices
    keys = _unique_keys(unique_key, data)
    okeys = _ordering_keys(ordering_key, data)
    if not data:
        return []

    def encode(start: int, stop: int) -> list[str | None]:
        """The data of items [start, stop), encoded (or the bad item named)."""
        with _gc_paused():
            return [None if d is None else codec.dumps(d, what=f"data[{i}]",
                                                        max_bytes=max_data_bytes)
                    for i, d in enumerate(data[start:stop], start)]
    span = tracing.start_producer(processor)  # None unless the application traces
    params = {"processor": processor, "related_id": related_id, "unique_key": None,
              "ordering_key": None, "trace_context": tracing.traceparent(span),
              "event": None, **options}
    actions: list[Action] = []
    try:
        actions = _insert_many(db, data, encode, keys, okeys, params,
                               explicit_time=eligible_at is not None)
    finally:
        tracing.end_producer(span, [a.id for a in actions])
    return actions


Encode = Callable[[int, int], list[str | None]]


def _insert_many(db: Database, data: Sequence[Any], encode: Encode,
                 keys: list[str | None] | None, okeys: list[str | None] | None,
                 params: dict[str, Any], *, explicit_time: bool) -> list[Action]:
    ordered = okeys is not None
    bind = db.get_bind() if isinstance(db, Session) else db
    copy = keys is None and len(data) >= COPY_FROM and \
        getattr(getattr(bind, "dialect", None), "driver", None) == "psycopg"
    # Other paths encode first, before the transaction (SQLite's takes the write lock).
    texts = [] if copy else encode(0, len(data))
    with connection(db) as conn:
        pipelined.send(conn)
        if copy:
            # The caller's transaction survives an item that fails to encode mid-COPY.
            own = isinstance(db, Engine) or conn.connection.driver_connection.autocommit
            with nullcontext() if own else conn.begin_nested():
                return _copy_in(conn, data, encode, params, okeys)
        if conn.dialect.name != "postgresql":
            # SQLite has no round trips to save: the single-row statement, many times.
            items = ({**params, "data": t, "unique_key": k, "ordering_key": o}
                     for t, k, o in zip(texts, keys or [None] * len(texts),
                                        okeys or [None] * len(texts), strict=True))
            return [_insert_one(conn, _insert_for(conn.dialect.name, item), d, item)
                    for d, item in zip(data, items, strict=True)]
        if keys is None:
            rows = conn.execute(_bulk_insert_pg(conn.dialect.name, explicit_time, ordered),
                                {**params, "datas": _json_array(texts),
                                 **({"okeys": json.dumps(okeys)} if ordered else {})}).all()
            rows.sort(key=lambda r: r[0])
            return [_new_action(row, d, params, o) for row, d, o in
                    zip(rows, data, okeys or [None] * len(rows), strict=True)]
        rows = conn.execute(_bulk_insert_unique_pg(conn.dialect.name, explicit_time, ordered),
                            {**params, "datas": texts, "keys": keys,
                             "okeys": okeys or [None] * len(texts)}).all()
        return _resolve_unique(conn, rows, data, texts, keys, params, okeys)


def _unique_keys(unique_key: UniqueKeys | None, data: Sequence[Any]) -> list[str | None] | None:
    if unique_key is None:
        return None
    if isinstance(unique_key, str | bytes):
        raise AsyncActionsError("init_actions takes one unique_key per action: pass a function "
                                "data -> key, or a list of keys as long as data")
    if inspect.iscoroutinefunction(unique_key):
        raise AsyncActionsError("unique_key must be a plain function data -> key, not an "
                                "async def")
    return _one_per_item(unique_key, data, "unique_key")


def _one_per_item(given: Callable[[Any], str | None] | Sequence[str | None],
                  data: Sequence[Any], what: str) -> list[str | None]:
    """A key per item of data: a function of its data, or a list as long as data."""
    keys = [given(d) for d in data] if callable(given) else list(given)
    if len(keys) != len(data):
        raise AsyncActionsError(f"{what} has {len(keys)} keys for {len(data)} actions; "
                                "give one per action (None for no key)")
    for i, key in enumerate(keys):
        _check_key(key, f"{what} of data[{i}]")
    return keys


OrderingKeys = Callable[[Any], str | None] | Sequence[str | None] | str


def _check_key(key: Any, what: str) -> None:
    if key is not None and not isinstance(key, str):
        raise AsyncActionsError(f"{what} must be a str or None, not {type(key).__name__}")


def _ordering_keys(ordering_key: OrderingKeys | None,
                   data: Sequence[Any]) -> list[str | None] | None:
    """One ordering key per item: a function of its data, a list, or one str for all."""
    if ordering_key is None:
        return None
    if isinstance(ordering_key, str):
        return [ordering_key] * len(data)
    if isinstance(ordering_key, bytes):
        raise AsyncActionsError("ordering_key must be a str, a list of str or a function "
                                "data -> str, not bytes")
    keys = _one_per_item(ordering_key, data, "ordering_key")
    return keys if any(k is not None for k in keys) else None


def _resolve_unique(conn: Connection, rows: Sequence[Row[Any]],
                    data: Sequence[Any], texts: list[str | None], keys: list[str | None],
                    params: dict[str, Any],
                    okeys: list[str | None] | None = None) -> list[Action]:
    """One Action per item from the bulk statement's rows: the new action, the one an
    earlier item with the same key got, or the live action that held the key."""
    actions: list[Action] = []
    by_key: dict[str, Action] = {}
    for (new_id, created_at, eligible_at, *live), d, text, key, okey in zip(
            rows, data, texts, keys, okeys or [None] * len(rows), strict=True):
        item = {**params, "unique_key": key, "ordering_key": okey}
        if new_id is not None:
            action = _new_action((new_id, created_at, eligible_at), d, item)
        elif key in by_key:  # an earlier item with this key decided it
            action = by_key[key]
        elif live[0] is not None:
            action = row_to_action(live)
        else:
            # The key's holder committed while the statement ran, after its snapshot was
            # taken: look again with a statement of its own.
            item = {**item, "data": text}
            action = _insert_one(conn, _insert_for(conn.dialect.name, item), d, item)
        if key is not None:
            by_key.setdefault(key, action)
        actions.append(action)
    return actions


def _insert_one(conn: Connection, stmt: HotStatement, data: Any, params: dict[str, Any]) -> Action:
    """Insert one action, or return the live action that holds its unique_key."""
    pipelined.send(conn)  # actions queued before this one get the smaller ids
    while True:
        rows = stmt.rows(conn, params)
        if rows:
            return _new_action(rows[0], data, params)
        existing = _live_action_with_key(conn, params["unique_key"])
        if existing is not None:
            return existing
        # The holder of the key finished between our insert and our look-up: try again.


# The statements are built once per shape: building one costs more than running it.
@functools.cache
def _insert_stmt(dialect: str, given: tuple[str, ...]) -> HotStatement:
    stmt = upsert(dialect, async_action).values(
        _insert_values("eligible_at" in given, as_payload(bindparam("data", type_=Text)),
                       given))
    if "unique_key" in given:
        stmt = stmt.on_conflict_do_nothing(index_elements=["unique_key"],
                                           index_where=LIVE_KEY)
    return HotStatement(stmt.returning(*_returning(dialect)))


@functools.cache
def _bulk_insert_pg(dialect: str, explicit_time: bool, ordered: bool = False) -> Any:
    # The data travel as one JSON array (joining encoded items costs nothing; a text[]
    # parameter would be escaped item by item); WITH ORDINALITY keeps the caller's
    # order in the ids, and a JSON null item is stored as no data.
    elems = (func.jsonb_array_elements(as_payload(bindparam("datas", type_=Text)))
             .table_valued("value", with_ordinality="ord").render_derived(name="elems"))
    values = _insert_values(explicit_time,
                            func.nullif(elems.c.value, literal_column("'null'::jsonb")))
    if ordered:  # the item's ordering key, from a JSON array alongside the data
        values["ordering_key"] = as_payload(bindparam("okeys", type_=Text)).op("->>")(
            cast(elems.c.ord - 1, Integer))
    select_rows = select(*values.values()).select_from(elems).order_by(elems.c.ord)
    return (insert(async_action).from_select(list(values), select_rows)
            .returning(*_returning(dialect)))


# From this many actions on, COPY beats the one-statement insert despite its two more
# round trips: the server writes COPY's rows in multi-row batches (20,000 actions:
# about 90 ms for COPY, 240 ms for INSERT … SELECT).
COPY_FROM = 1000
BACKSLASH = "\\"
# Lines per write of a COPY: sent to the server while the next ones are built.
LINES_PER_WRITE = 2000


def _copy_in(conn: Connection, data: Sequence[Any], encode: Encode,
             params: dict[str, Any], okeys: list[str | None] | None = None) -> list[Action]:
    """A large bulk insert by COPY. COPY returns nothing, so one statement first draws
    the ids (in the caller's order), reads the transaction's time and sends the
    notification. The items are encoded a write's worth at a time, while the server
    inserts the ones before: a bad item ends the COPY, and the caller's transaction
    rolls back to before it."""
    ids, now, _ = conn.execute(_reserve_ids_pg(), {"n": len(data),
                                                "processor": params["processor"]}).one()
    shared = {"processor": params["processor"], "related_id": params["related_id"],
              "priority": params["priority"], "retries": params["retries"]}
    if params["trace_context"] is not None:
        shared["trace_context"] = params["trace_context"]
    # created_at and, without a delay, next_eligible_at take the column default now(),
    # the transaction's time: parsing 20,000 timestamps would cost the server 35 ms.
    explicit = params["eligible_at"]
    eligible_at = (now + timedelta(seconds=params["delay"]) if explicit is None
                   else async_action.c.next_eligible_at.type.process_bind_param(explicit,
                                                                                conn.dialect))
    if eligible_at != now:
        shared["next_eligible_at"] = eligible_at.isoformat()
    columns = ", ".join(["id", "data", *shared, *(["ordering_key"] if okeys else [])])
    # Every row ends alike: its shared columns are escaped once.
    tail = "\t".join(_copy_field(v) for v in shared.values())

    def chunks() -> Iterator[str]:
        """The lines, a write's worth at a time: the server inserts each while the next
        is built. JSON text holds no tab or newline, only backslashes to escape (rarely);
        an ordering key (rarely) ends its line, escaped."""
        for at in range(0, len(ids), LINES_PER_WRITE):
            part = slice(at, at + LINES_PER_WRITE)
            with _gc_paused():
                texts = encode(at, at + LINES_PER_WRITE)
                if okeys is None:
                    lines = "".join([
                        f"{i}\t{t if t is not None and BACKSLASH not in t else _copy_field(t)}"
                        f"\t{tail}\n" for i, t in zip(ids[part], texts, strict=True)])
                else:
                    lines = "".join([f"{i}\t{_copy_field(t)}\t{tail}\t{_copy_field(o)}\n"
                                     for i, t, o in zip(ids[part], texts, okeys[part],
                                                        strict=True)])
            yield lines

    def actions() -> list[Action]:
        with _gc_paused():
            return [_new_action((i, now, eligible_at), d, params, o)
                    for i, d, o in zip(ids, data, okeys or [None] * len(ids), strict=True)]

    return _copy(conn, f"COPY {async_action.name} ({columns}) FROM STDIN", chunks(), actions)


T = TypeVar("T")


def _copy(conn: Connection, sql: str, chunks: Iterable[str], meanwhile: Callable[[], T]) -> T:
    """COPY … FROM STDIN on psycopg's cursor, each chunk sent as it is made; returns what
    `meanwhile` makes while the server finishes the last ones. Under SQLAlchemy's
    asyncio (this code then runs in a greenlet of the caller's event loop) on psycopg's
    async cursor, awaited."""
    if conn.dialect.is_async:
        return await_only(_copy_async(conn.connection.driver_connection, sql, chunks,
                                      meanwhile))
    with kept_cursor(conn).copy(sql) as copy:
        for chunk in chunks:
            copy.write(chunk)
        return meanwhile()


async def _copy_async(driver: Any, sql: str, chunks: Iterable[str],
                      meanwhile: Callable[[], T]) -> T:
    async with driver.cursor() as cursor, cursor.copy(sql) as copy:
        for chunk in chunks:
            await copy.write(chunk)
        return meanwhile()


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Tens of thousands of new objects, none of them garbage: without the pause the
    cyclic collector runs over and over while they are built (20,000 actions: 15 ms
    with the pause, 20 to 130 ms without)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _copy_field(value: Any) -> str:
    """One value in COPY's text format."""
    if value is None:
        return "\\N"
    text = str(value)
    for char, escaped in (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r")):
        text = text.replace(char, escaped)
    return text


@functools.cache
def _reserve_ids_pg() -> Any:
    # array_agg takes the series in order, so the ids ascend in the caller's order.
    ids = func.array_agg(func.nextval(ID_SEQUENCE))
    notify = select(func.pg_notify(NOTIFY_CHANNEL, bindparam("processor", type_=Text)))
    return select(ids, NOW, notify.scalar_subquery()).select_from(
        func.generate_series(1, bindparam("n")))


@functools.cache
def _bulk_insert_unique_pg(dialect: str, explicit_time: bool, ordered: bool = False) -> Any:
    """One row per item, in order: the new action's (id, created_at, next_eligible_at),
    or NULLs and the live action that holds the item's key.

    Ids are drawn before the insert so that the rows it skipped on a key conflict can
    be told from the ones it wrote. The live actions are read from the statement's
    snapshot, which holds the actions committed before it, not the ones it inserts.
    """
    elems = (func.unnest(bindparam("datas", type_=postgresql.ARRAY(Text)),
                         bindparam("keys", type_=postgresql.ARRAY(Text)),
                         bindparam("okeys", type_=postgresql.ARRAY(Text)))
             .table_valued("value", "key", "okey", with_ordinality="ord")
             .render_derived(name="elems"))
    numbered = (select(func.nextval(ID_SEQUENCE).label("id"), elems.c.value, elems.c.key,
                       elems.c.okey, elems.c.ord)
                .cte("numbered").prefix_with("MATERIALIZED"))
    values = {"id": numbered.c.id,
              **_insert_values(explicit_time, as_payload(numbered.c.value)),
              "unique_key": numbered.c.key}
    if ordered:
        values["ordering_key"] = numbered.c.okey
    inserted = (
        postgresql.insert(async_action)
        # Insert in key order: concurrent bulk enqueues then wait for each other's keys
        # in one order and cannot deadlock (ids were drawn in the caller's order above).
        .from_select(list(values), select(*values.values())
                     .order_by(numbered.c.key, numbered.c.ord))
        .on_conflict_do_nothing(index_elements=["unique_key"], index_where=LIVE_KEY)
        .returning(*_returning(dialect))
        .cte("inserted")
    )
    live = async_action.alias("live")
    return (
        select(inserted.c.id, inserted.c.created_at, inserted.c.next_eligible_at,
               *action_columns(live))
        .select_from(numbered
                     .outerjoin(inserted, inserted.c.id == numbered.c.id)
                     .outerjoin(live, (live.c.unique_key == numbered.c.key)
                                & live.c.status.in_(ACTIVE_STATUSES)))
        .order_by(numbered.c.ord)
    )


def _new_action(row: Sequence[Any], data: Any, params: dict[str, Any],
                ordering_key: str | None = None) -> Action:
    """The action just inserted, from (id, created_at, next_eligible_at) and the values
    sent (a bulk insert gives each item's ordering key apart). Action._make: a bulk
    enqueue builds tens of thousands of these."""
    return Action._make((row[0], params["processor"], Status.PENDING, data,
                         params["related_id"], params["priority"], params["retries"], 0, None,
                         [], None, params["unique_key"], row[2], row[1], None, None, None,
                         None, ordering_key or params["ordering_key"], None,
                         params["trace_context"], params["event"]))


def _live_action_with_key(conn: Connection, unique_key: str | None) -> Action | None:
    row = conn.execute(select(*action_columns()).where(
        LIVE_KEY, async_action.c.unique_key == unique_key)).first()
    return row_to_action(row) if row else None


FANOUT_BATCH = 5000


def enqueue_all(db: Database, processor: str, *, each: dict[str, Iterable[Any]],
                static: dict[str, Any] | None = None, background: bool = False,
                on_complete: str | None = None, **options: Any) -> int:
    """Fan out: one action per combination of the `each` iterables (their cross product),
    each action's data being that combination plus `static`. Returns the count.

    Inserts in batches inside the caller's transaction, so memory stays flat however many
    combinations there are: the first iterable is streamed (it may be a generator of any
    length); the others are kept in memory, as they are gone through once per item of
    the first. The options are init_actions' (unique_key may be a function of the data).

    With `background=True` it records one fan-out action instead (FANOUT, run by every
    worker: fanout.py), so `each` must be stored: lists of JSON values or ranges. When
    all are enqueued, `on_complete` (a processor name) gets {"count", "processor"}.
    """
    if not each:
        raise AsyncActionsError("enqueue_all needs at least one iterable in each={...}")
    static = dict(static or {})
    overlap = sorted(set(static) & set(each))
    if overlap:
        raise AsyncActionsError(f"enqueue_all: {', '.join(overlap)} is both in each and in "
                                "static; give every key once")
    if background:
        spec = _fanout_spec(processor, each, static, on_complete, options)
        init_action(db, FANOUT, spec, related_id=options.get("related_id"))
        return spec["total"]
    if on_complete is not None:
        raise AsyncActionsError("enqueue_all: on_complete needs background=True (without it "
                                "the actions are all recorded when enqueue_all returns)")
    count = 0
    with connection(db) as conn:
        for batch in _batched(combinations(each, static), FANOUT_BATCH):
            count += len(init_actions(conn, processor, batch, **options))
    return count


FANOUT = "asyncactions.fanout"  # the built-in processor of background fan-outs
# What a fan-out can keep of init_actions' options (a function cannot be stored).
FANOUT_OPTIONS = ("related_id", "delay", "eligible_at", "retries", "priority", "ordering_key",
                  "max_data_bytes")


def _fanout_spec(processor: str, each: dict[str, Iterable[Any]], static: dict[str, Any],
                 on_complete: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The fan-out action's data: all a worker needs to stream the cross product, and
    `done`, how many combinations are enqueued so far (advanced with each batch)."""
    where = "enqueue_all(background=True)"
    other = sorted(set(options) - set(FANOUT_OPTIONS))
    if other:
        raise AsyncActionsError(f"{where}: {', '.join(other)} cannot be stored for the "
                                f"worker; it takes {', '.join(FANOUT_OPTIONS)}")
    if not isinstance(options.get("ordering_key"), str | None):
        raise AsyncActionsError(f"{where}: ordering_key must be one str (a function or list "
                                "cannot be stored for the worker)")
    if on_complete is not None and (not isinstance(on_complete, str) or not on_complete):
        raise AsyncActionsError(f"{where}: on_complete must be a processor name, got "
                                f"{on_complete!r:.60}")
    _options(processor, options.get("delay"), options.get("eligible_at"),
             options.get("retries"), options.get("priority", 0))
    stored: dict[str, Any] = {}
    total = 1
    for key, values in each.items():
        if isinstance(values, range):
            stored[key] = {"range": [values.start, values.stop, values.step]}
        elif isinstance(values, list | tuple):
            stored[key] = {"values": list(values)}
        else:
            raise AsyncActionsError(
                f"{where}: each[{key!r}] is a {type(values).__name__}; give a list of JSON "
                "values or a range (the worker reads them later), or drop background=True")
        total *= len(values)
    delay = options.get("delay")
    return {"processor": processor, "each": stored, "static": static,
            "options": {**options, **({"delay": delay.total_seconds()} if delay else {})},
            "on_complete": on_complete, "batch": FANOUT_BATCH, "total": total, "done": 0,
            "completed": False}


def fanout_iterables(spec: dict[str, Any]) -> dict[str, Iterable[Any]]:
    """`each` of a fan-out action's data, as enqueue_all was given it."""
    return {key: range(*value["range"]) if "range" in value else value["values"]
            for key, value in spec["each"].items()}


def combinations(each: dict[str, Iterable[Any]],
                 static: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The cross product as dicts, streaming the first iterable."""
    (first_key, first), *rest = each.items()
    rest_keys = [k for k, _ in rest]
    rest_values = [list(v) for _, v in rest]
    for value in first:
        for combo in itertools.product(*rest_values):
            yield {first_key: value, **dict(zip(rest_keys, combo, strict=True)), **static}


def _batched(items: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def _json_array(texts: list[str | None]) -> str:
    """Encoded items as one JSON array (None as null)."""
    return "[" + ",".join("null" if t is None else t for t in texts) + "]"
