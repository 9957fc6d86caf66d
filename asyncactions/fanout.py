"""The built-in processor of background fan-outs (`enqueue_all(..., background=True)`),
served by every worker.

It streams the cross product in batches; each batch is one transaction that also
advances the fan-out action's `done` (fenced like an outcome, so a worker that lost its
claim writes nothing). A worker that dies mid-way loses at most its open batch: the next
attempt starts at combination `done`, so none is enqueued twice and none is missed.
`on_complete` is enqueued in a last transaction that marks the fan-out completed, so it
runs once.

The combinations never become Python objects: every value of `each` is encoded once,
and a batch's text is joined from those pieces (one combination costs a string join in
C, not a dict, a JSON encoding and an Action). On PostgreSQL (psycopg) it goes by COPY,
sent while the next lines are built, so the server writes rows while Python works; on
SQLite as one JSON array to one INSERT … SELECT. With a schema registered for the
processor, or while tracing, each batch goes through init_actions instead.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Text, bindparam, func, insert, select, update

from . import codec, tracing
from .action import Action, Status
from .enqueue import (
    FANOUT,
    LINES_PER_WRITE,
    _batched,
    _copy,
    _copy_field,
    _insert_values,
    _options,
    _schema,
    combinations,
    fanout_iterables,
    init_action,
    init_actions,
)
from .errors import UnserializableData
from .live import current_attempt
from .notifier import NOTIFY_CHANNEL
from .processors import Processor, ProcessorSettings
from .schema import NOW, as_payload, async_action

t = async_action
# Writes combinations [start, stop) in the batch's transaction, given its time.
Writer = Callable[[Connection, int, int, datetime], None]


@functools.cache
def _advance_stmt(dialect: str) -> Any:
    """Record the progress, fenced on the attempt; on PostgreSQL also read the
    transaction's time (for a delay) and send the processor's wake-up, delivered when
    the batch commits."""
    stmt = (update(t)
            .where(t.c.id == bindparam("p_id"), t.c.attempts == bindparam("p_attempts"),
                   t.c.claimed_by == bindparam("p_worker"),
                   t.c.status == Status.RUNNING.value)
            .values(data=as_payload(bindparam("p_data")),
                    progress=as_payload(bindparam("p_progress"))))
    if dialect == "postgresql":
        notify = select(func.pg_notify(NOTIFY_CHANNEL, bindparam("p_processor", type_=Text)))
        return stmt.returning(NOW, notify.scalar_subquery())
    return stmt.returning(NOW)


class ClaimLost(Exception):
    """This attempt no longer holds the fan-out action: its batch must not land."""


def fan_out(action: Action) -> dict[str, Any]:
    spec = dict(action.data)
    engine = current_attempt().engine
    total, processor = spec["total"], spec["processor"]
    options = dict(spec["options"])
    if options.get("delay") is not None:
        options["delay"] = timedelta(seconds=options["delay"])
    if spec["done"] < total:
        write = _text_writer(engine, spec, options)
        # Text costs far less memory than items, so its batches can be larger.
        batch = COPY_BATCH if write else spec["batch"]
        write = write or _init_actions_writer(spec, options)
    while spec["done"] < total:
        if current_attempt().cancel_requested:
            raise ClaimLost("the fan-out was canceled")
        stop = min(total, spec["done"] + batch)
        with engine.begin() as conn:
            _write_batch(conn, action, spec, stop, write)
        spec["done"] = stop
    if not spec["completed"]:
        with engine.begin() as conn:
            if spec["on_complete"]:
                init_action(conn, spec["on_complete"], {"count": total, "processor": processor})
            spec["completed"] = True
            _advance(conn, action, spec, total)
    return {"count": total, "processor": processor}


def _write_batch(conn: Connection, action: Action, spec: dict[str, Any], stop: int,
                 write: Writer) -> None:
    """One batch: combinations [done, stop) and the progress that says so."""
    now = _advance(conn, action, spec, stop)
    write(conn, spec["done"], stop, now)


def _advance(conn: Connection, action: Action, spec: dict[str, Any], done: int) -> datetime:
    """Record `done` in the batch's transaction (before its rows: the row lock is taken
    first, so two attempts cannot both write); raise if the claim is gone."""
    total = spec["total"]
    progress = {"fraction": done / total if total else 1.0,
                "message": f"{done} of {total} enqueued",
                "at": datetime.now(UTC).isoformat(timespec="milliseconds")}
    rows = conn.execute(_advance_stmt(conn.dialect.name), {
        "p_id": action.id, "p_attempts": action.attempts, "p_worker": action.claimed_by,
        "p_data": codec.dumps({**spec, "done": done}), "p_progress": codec.dumps(progress),
        "p_processor": spec["processor"]}).all()
    if len(rows) != 1:
        raise ClaimLost(f"{action.display_id} lost its claim; its batch was rolled back")
    return rows[0][0]


def _init_actions_writer(spec: dict[str, Any], options: dict[str, Any]) -> Writer:
    """Combinations [start, stop) as dicts through init_actions: for the schema checks
    of a processor registered here, tracing, or a driver without the text path."""
    each = fanout_iterables(spec)
    (first_key, first), *_ = each.items()

    def write(conn: Connection, start: int, stop: int, _now: datetime) -> None:
        per_first = math.prod(len(v) for v in each.values()) // len(first)
        lead, skip = divmod(start, per_first)
        items = itertools.islice(combinations({**each, first_key: first[lead:]}, spec["static"]),
                                 skip, skip + stop - start)
        for batch in _batched(items, stop - start):
            init_actions(conn, spec["processor"], batch, **options)

    return write


# Combinations per transaction on the COPY path: a commit (and its WAL flush) per 20,000
# rows instead of per 5,000 (enqueue_all's batch, which init_actions holds in memory).
COPY_BATCH = 20_000
# The combinations of the last iterables are kept as text, up to this many: each line
# is then one join of a prefix and one of these.
SUFFIXES = 100_000


def _text_writer(engine: Engine, spec: dict[str, Any], options: dict[str, Any]
                 ) -> Writer | None:
    """Combinations [start, stop) joined from their encoded values: by COPY on
    PostgreSQL, as one JSON array on SQLite. None where init_actions must see each item
    (a schema registered here, tracing)."""
    processor = spec["processor"]
    if _schema(processor) is not None or tracing._tracer() is not None:
        return None
    copy = engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
    if not copy and engine.dialect.name != "sqlite":
        return None
    max_bytes = options.get("max_data_bytes", codec.MAX_DATA_BYTES)
    texts = _Product(fanout_iterables(spec), spec["static"], max_bytes,
                     _escape if copy else str)
    opts = _options(processor, options.get("delay"), options.get("eligible_at"),
                    options.get("retries"), options.get("priority", 0))
    shared = {"processor": processor, "related_id": options.get("related_id"),
              "priority": opts["priority"], "retries": opts["retries"]}
    if options.get("ordering_key") is not None:
        shared["ordering_key"] = options["ordering_key"]
    if not copy:
        params = {**opts, **shared, "ordering_key": options.get("ordering_key"),
                  "unique_key": None, "trace_context": None, "event": None}
        explicit_time = opts["eligible_at"] is not None

        def insert(conn: Connection, start: int, stop: int, _now: datetime) -> None:
            datas = "".join(texts.lines(start, stop, ","))
            conn.execute(_json_each_insert(explicit_time), {**params,
                                                            "datas": f"[{datas[:-1]}]"})

        return insert
    delay, eligible_at = timedelta(seconds=opts["delay"]), opts["eligible_at"]
    if eligible_at is not None:
        eligible_at = t.c.next_eligible_at.type.process_bind_param(eligible_at, engine.dialect)

    def write(conn: Connection, start: int, stop: int, now: datetime) -> None:
        columns = dict(shared)
        # Without a delay next_eligible_at, like created_at, takes the default now().
        if eligible_at is not None or delay:
            columns["next_eligible_at"] = (eligible_at or now + delay).isoformat()
        end = "\t" + "\t".join(_copy_field(v) for v in columns.values()) + "\n"
        sql = f"COPY {t.name} (data, {', '.join(columns)}) FROM STDIN"
        _copy(conn, sql, texts.lines(start, stop, end), lambda: None)

    return write


@functools.cache
def _json_each_insert(explicit_time: bool) -> Any:
    """SQLite: one INSERT … SELECT of a JSON array's items, in order."""
    items = func.json_each(bindparam("datas", type_=Text)).table_valued("key", "value")
    values = _insert_values(explicit_time, items.c.value)
    return insert(t).from_select(list(values), select(*values.values())
                                 .select_from(items).order_by(items.c.key))


def _escape(text: str) -> str:
    """JSON text in COPY's text format: it holds no tab or newline, only backslashes."""
    return text.replace("\\", "\\\\") if "\\" in text else text


class _Product:
    """The cross product of `each` (plus `static`) as codec JSON text, item by item
    index, without building the items: `{"a":1,"b":"x","s":true}` is the prefix of the
    first iterables' values and a suffix, kept for every combination of the last ones.
    """

    def __init__(self, each: dict[str, Sequence[Any]], static: dict[str, Any],
                 max_bytes: int, escape: Callable[[str], str]) -> None:
        keys, self.values = list(each), list(each.values())
        # The same checks as encoding a whole item: its structure (reserved one-key
        # objects) is every item's; each value is checked as it is encoded.
        codec.dumps(dict(zip(keys, (v[0] for v in self.values), strict=True)) | static)
        self.max_bytes, self.escape = max_bytes, escape
        split = len(keys)  # the suffix is built from keys[split:]
        self.per_prefix = 1
        while split > 1 and self.per_prefix * len(self.values[split - 1]) <= SUFFIXES:
            split -= 1
            self.per_prefix *= len(self.values[split])
        self.labels = [json.dumps(k) + ":" for k in keys]
        self.split = split
        # Pieces of the prefix's iterables after the first, encoded once.
        self.pieces = [[] if d == 0 else [self._piece(d, v) for v in self.values[d]]
                       for d in range(split)]
        closing = codec.dumps(static)[1:-1]
        closing = ("," + closing if closing else "") + "}"
        self.suffixes = ["".join(p) + closing for p in itertools.product(
            *([self._piece(d, v) for v in self.values[d]] for d in range(split, len(keys))))]
        self.longest = max(len(s) for s in self.suffixes)
        self.escaped = [escape(s) for s in self.suffixes]
        self._ends: tuple[str, list[str]] = ("", [])

    def _piece(self, d: int, value: Any) -> str:
        if type(value) is int:  # a range's: nothing to check
            return f",{self.labels[d]}{value}"
        return "," + self.labels[d] + codec.dumps(value, what=f"data[{self.labels[d][:-1]}]")

    def lines(self, start: int, stop: int, end: str) -> Iterator[str]:
        """Items [start, stop), each as its escaped text + `end`, a few thousand at a
        time."""
        if self._ends[0] != end:  # changes only with a delay (from the batch's time)
            self._ends = (end, [s + end for s in self.escaped])
        ends = self._ends[1]
        at, parts, count = start, [], 0
        while at < stop:
            lead, first = divmod(at, self.per_prefix)
            last = min(self.per_prefix, first + stop - at, first + LINES_PER_WRITE)
            prefix = self._prefix(lead)
            parts.append(prefix + prefix.join(ends[first:last]))
            count += last - first
            at += last - first
            if count >= LINES_PER_WRITE:  # few suffixes: many prefixes to one write
                yield "".join(parts)
                parts, count = [], 0
        if parts:
            yield "".join(parts)

    def _prefix(self, lead: int) -> str:
        """`{"a":1,"b":"x"` of the `lead`-th combination of the prefix's iterables."""
        index = []
        for d in range(self.split - 1, 0, -1):
            lead, i = divmod(lead, len(self.values[d]))
            index.append(i)
        first = self._piece(0, self.values[0][lead])
        text = "{" + first[1:] + "".join(self.pieces[d][i] for d, i in
                                         zip(range(1, self.split), reversed(index),
                                             strict=True))
        if len(text) + self.longest > self.max_bytes:
            self._check_size(text)
        return self.escape(text)

    def _check_size(self, prefix: str) -> None:
        for i, suffix in enumerate(self.suffixes):
            size = len(prefix) + len(suffix)  # ASCII: the codec escapes the rest
            if size > self.max_bytes:
                raise UnserializableData(
                    f"data ({prefix}{suffix[:40]}…, combination {i} after this prefix) is "
                    f"{size} bytes encoded, over the limit of {self.max_bytes}; store large "
                    "payloads elsewhere and pass a reference, or raise max_data_bytes")


# Retried soon, then less often: a fan-out resumes where it stopped.
PROCESSOR = Processor(FANOUT, fan_out, ProcessorSettings(
    retries=10, retry_interval=timedelta(seconds=1), backoff="exponential"))
