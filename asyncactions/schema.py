"""Table definitions and the few SQL constructs whose spelling differs by dialect.

The migrations create these tables; the queries are written against them with
SQLAlchemy Core so that one statement serves PostgreSQL and SQLite alike.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    cast,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import DOMAIN, JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnClause, ColumnElement, FromClause, FunctionElement

from .action import Status


class UtcDateTime(TypeDecorator[datetime]):
    """timestamptz on PostgreSQL; on SQLite, UTC text that sorts like time does.

    Naive datetimes given by callers are taken to be UTC; values always come back aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        # psycopg already returns aware datetimes: nothing to do for every row it reads.
        if dialect.name == "postgresql":
            return None
        return super().result_processor(dialect, coltype)


# Payload columns hold JSON written by our own codec (see codec.py). SQLite gets
# plain TEXT: a column declared JSON would have NUMERIC affinity there and turn
# the document `5` into the integer 5.
Payload = Text().with_variant(JSONB(), "postgresql")

STATUSES = tuple(s.value for s in Status)
ACTIVE_STATUSES = (Status.PENDING.value, Status.RUNNING.value)
# One of the five: on PostgreSQL a domain's constraint, which the server caches already
# planned (a table's CHECK is planned anew for every INSERT or UPDATE: ~13 us of a one-row
# enqueue, migration 0011); on SQLite a table constraint, which costs next to nothing there.
STATUS_CHECK = "async_action_status_check"
StatusType = Text().with_variant(
    DOMAIN("async_action_status", Text(), constraint_name=STATUS_CHECK,
           check=f"VALUE IN {STATUSES!r}"), "postgresql")

metadata = MetaData()

async_action = Table(
    "async_action",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("processor", Text, nullable=False),
    Column("status", StatusType, nullable=False, server_default="pending"),
    Column("data", Payload),
    Column("related_id", Text),
    Column("priority", SmallInteger, nullable=False, server_default="0"),
    Column("retries", Integer),  # NULL: the processor's, set at the first claim
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("error", Text),
    Column("errors", Payload),
    Column("result", Payload),
    Column("unique_key", Text),
    Column("next_eligible_at", UtcDateTime, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime),
    Column("finished_at", UtcDateTime),
    Column("claimed_by", Text),
    Column("lease_expires_at", UtcDateTime),
    Column("ordering_key", Text),
    Column("progress", Payload),
    Column("trace_context", Text),  # W3C traceparent of the enqueuing span (tracing on)
    Column("event", Text),  # the event whose rule created it
    CheckConstraint(f"status IN {STATUSES!r}", name=STATUS_CHECK).ddl_if(dialect="sqlite"),
)

# The claim query's index: only runnable rows, in the claim's sort order, so the
# claim stays fast however many finished rows the table keeps. Processor first: a claim
# walks each of its processors' parts apart, so one processor's backlog never stands
# in front of another's actions (queries._fair). The claim says the same predicate in
# the same words (a literal, not a bound status): only then can the plan PostgreSQL
# caches for the prepared claim use this index, instead of re-planning every claim.
PENDING_ONLY = text("status = 'pending'")
Index("async_action_claim_idx", async_action.c.processor, async_action.c.priority,
      async_action.c.next_eligible_at, async_action.c.id,
      postgresql_where=PENDING_ONLY, sqlite_where=PENDING_ONLY)
# The leader's wake-up for actions that became eligible by time alone reads this index
# too (queries.WAKE): an index of its own cost every enqueue an entry (migration 0010).
# The id column's sequence, for statements that draw ids before inserting.
ID_SEQUENCE = literal_column("'async_action_id_seq'::regclass")
# unique_key is unique among live actions only; finished ones keep theirs for audit.
# Spelled with literals: ON CONFLICT names the index by this predicate, and PostgreSQL
# cannot match it to the index when the statuses are bind parameters of a prepared
# statement (psycopg prepares a statement once it has run a few times).
LIVE_KEY = text("status IN ('pending', 'running') AND unique_key IS NOT NULL")
Index("async_action_unique_key_idx", async_action.c.unique_key, unique=True,
      postgresql_where=LIVE_KEY, sqlite_where=LIVE_KEY)
# Lease recovery scans running rows by lease expiry.
Index("async_action_lease_idx", async_action.c.lease_expires_at,
      postgresql_where=text("status = 'running'"), sqlite_where=text("status = 'running'"))
Index("async_action_related_idx", async_action.c.related_id,
      postgresql_where=text("related_id IS NOT NULL"),
      sqlite_where=text("related_id IS NOT NULL"))
Index("async_action_status_finished_idx", async_action.c.status, async_action.c.finished_at,
      postgresql_where=text("finished_at IS NOT NULL"),
      sqlite_where=text("finished_at IS NOT NULL"))

# Ordering keys (SPEC §3): the claim's probe for an earlier live action of the key, and
# the guard that lets no two actions of one key run at once (see queries.claim_statement).
LIVE_ORDERED = text("ordering_key IS NOT NULL AND status IN ('pending', 'running')")
RUNNING_ORDERED = text("ordering_key IS NOT NULL AND status = 'running'")
Index("async_action_ordering_idx", async_action.c.ordering_key, async_action.c.id,
      postgresql_where=LIVE_ORDERED, sqlite_where=LIVE_ORDERED)
Index("async_action_ordering_running_idx", async_action.c.ordering_key, unique=True,
      postgresql_where=RUNNING_ORDERED, sqlite_where=RUNNING_ORDERED)

# Lists filtered by processor (newest first; running rows, few, are read apart: see
# audit.list_actions), and windows by creation (stats, bulk: recent rows, at the end of
# the table, so a BRIN index). Every claim and outcome write adds an entry to each index
# whose predicate its new row meets: these two stay off the claim (see migration 0008).
NOT_RUNNING = text("status <> 'running'")
Index("async_action_processor_id_idx", async_action.c.processor, async_action.c.id,
      postgresql_where=NOT_RUNNING, sqlite_where=NOT_RUNNING)
Index("async_action_created_idx", async_action.c.created_at, postgresql_using="brin")
Index("async_action_event_idx", async_action.c.event, async_action.c.id,
      postgresql_where=text("event IS NOT NULL"), sqlite_where=text("event IS NOT NULL"))

async_action_worker = Table(
    "async_action_worker",
    metadata,
    Column("id", Text, primary_key=True),
    Column("hostname", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("processors", Text, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("heartbeat_at", UtcDateTime, nullable=False),
)

# Cluster-wide processor state operators change at run time (pause / resume).
async_action_processor = Table(
    "async_action_processor",
    metadata,
    Column("name", Text, primary_key=True),
    Column("paused_at", UtcDateTime),
    Column("paused_by", Text),
)

# The starts of rate-limited processors within their window, which their claims count
# (and trim). A table of its own: an index of starts on async_action would cost every
# claim and outcome write of every processor an entry (see migration 0008).
async_action_start = Table(
    "async_action_start",
    metadata,
    Column("processor", Text, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
)
Index("async_action_start_idx", async_action_start.c.processor,
      async_action_start.c.started_at)

# Rules bind events to processors: publish(event) creates one action per rule.
async_action_rule = Table(
    "async_action_rule",
    metadata,
    Column("event", Text, primary_key=True),
    Column("processor", Text, primary_key=True),
    Column("created_at", UtcDateTime, nullable=False, server_default=func.now()),
    Column("created_by", Text),
)
# The claim reads the paused processors: a tiny index of the paused ones.
PAUSED = text("paused_at IS NOT NULL")
Index("async_action_processor_paused_idx", async_action_processor.c.name,
      postgresql_where=PAUSED, sqlite_where=PAUSED)

async_action_schedule = Table(
    "async_action_schedule",
    metadata,
    Column("name", Text, primary_key=True),
    Column("last_fire_at", UtcDateTime, nullable=False),
)


# --- dialect-specific spellings --------------------------------------------------

class db_now(FunctionElement[datetime]):
    """The database's clock plus an offset in seconds (a bind parameter or literal), or
    the clock itself when given no offset.

    Using the database's clock keeps every worker and host on one time line.
    """

    type = UtcDateTime()
    inherit_cache = True


@compiles(db_now, "postgresql")
def _db_now_pg(element: db_now, compiler: Any, **kw: Any) -> str:
    if not element.clauses.clauses:
        return "now()"
    (offset,) = element.clauses
    return f"(now() + make_interval(secs => {compiler.process(offset, **kw)}))"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    # Same text layout as SQLAlchemy stores (microseconds), so comparisons sort correctly.
    if not element.clauses.clauses:
        return "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"
    (offset,) = element.clauses
    return (f"(strftime('%Y-%m-%d %H:%M:%f', 'now', ({compiler.process(offset, **kw)})"
            " || ' seconds') || '000')")


class statement_now(db_now):
    """As db_now, but the time the statement started, not its transaction: a claim that
    waited for its processor's lock counts its rate window from after the wait."""

    inherit_cache = True


class clock_now(db_now):
    """The time as the row is written (clock_timestamp() on PostgreSQL), after the
    statement's snapshot was taken: a claim's start is then later than the commit of
    every outcome its snapshot saw, so the table's own timestamps show the order the
    claims kept (one key's actions never overlap, a cap never exceeded)."""

    inherit_cache = True


def _another_clock(element: type[db_now], pg_clock: str) -> None:
    """db_now read from another of PostgreSQL's clocks. SQLite's 'now' serves as both:
    it is per statement, and its one writer runs statements in order."""

    @compiles(element, "postgresql")
    def _postgresql(element: db_now, compiler: Any, **kw: Any) -> str:
        return _db_now_pg(element, compiler, **kw).replace("now()", f"{pg_clock}()")

    @compiles(element, "sqlite")
    def _sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
        return _db_now_sqlite(element, compiler, **kw)


_another_clock(statement_now, "statement_timestamp")
_another_clock(clock_now, "clock_timestamp")


# The clock itself, with no offset to bind: a statement prepared with it plans like one
# that says now().
NOW = db_now()


class smallest(FunctionElement[int]):
    """The least of its arguments (LEAST on PostgreSQL, the scalar min() on SQLite)."""

    type = Integer()
    inherit_cache = True


class largest(FunctionElement[int]):
    """The greatest of its arguments (GREATEST on PostgreSQL, max() on SQLite)."""

    type = Integer()
    inherit_cache = True


def _named_by_dialect(element: type[FunctionElement[Any]], postgresql_name: str,
                      sqlite_name: str) -> None:
    """One function, spelled by each dialect its own way."""

    @compiles(element, "postgresql")
    def _postgresql(element: FunctionElement[Any], compiler: Any, **kw: Any) -> str:
        return f"{postgresql_name}({compiler.process(element.clauses, **kw)})"

    @compiles(element, "sqlite")
    def _sqlite(element: FunctionElement[Any], compiler: Any, **kw: Any) -> str:
        return f"{sqlite_name}({compiler.process(element.clauses, **kw)})"


_named_by_dialect(smallest, "LEAST", "min")
_named_by_dialect(largest, "GREATEST", "max")


class as_payload(FunctionElement[Any]):
    """A text bind parameter holding codec JSON, stored into a payload column."""

    type = Payload
    inherit_cache = True


class payload_text(FunctionElement[str]):
    """A payload column read back as JSON text, decoded by our codec (not the engine's)."""

    type = Text()
    inherit_cache = True


def _cast_on_postgresql(element: type[FunctionElement[Any]], sql_type: str) -> None:
    """PostgreSQL casts the text to its payload type and back; SQLite stores text."""

    @compiles(element, "postgresql")
    def _postgresql(element: FunctionElement[Any], compiler: Any, **kw: Any) -> str:
        return f"CAST({compiler.process(element.clauses, **kw)} AS {sql_type})"

    @compiles(element, "sqlite")
    def _sqlite(element: FunctionElement[Any], compiler: Any, **kw: Any) -> str:
        return compiler.process(element.clauses, **kw)


_cast_on_postgresql(as_payload, "JSONB")
_cast_on_postgresql(payload_text, "TEXT")


class elapsed_seconds(FunctionElement[float]):
    """Seconds from one timestamp to another, as a float (for run times and ages)."""

    type = Float()
    inherit_cache = True


@compiles(elapsed_seconds, "postgresql")
def _elapsed_seconds_pg(element: elapsed_seconds, compiler: Any, **kw: Any) -> str:
    start, end = (compiler.process(c, **kw) for c in element.clauses)
    return f"CAST(EXTRACT(EPOCH FROM ({end} - {start})) AS DOUBLE PRECISION)"


@compiles(elapsed_seconds, "sqlite")
def _elapsed_seconds_sqlite(element: elapsed_seconds, compiler: Any, **kw: Any) -> str:
    start, end = (compiler.process(c, **kw) for c in element.clauses)
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


PAYLOAD_COLUMNS = ("data", "errors", "result", "progress")


def upsert(dialect: str, table: Table) -> Any:
    """The dialect's INSERT, which has ON CONFLICT (both backends spell it alike)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def action_columns(table: FromClause = async_action) -> list[ColumnElement[Any]]:
    """Every column of async_action (or an alias of it), payloads as text, in Action's
    field order."""
    cols: list[ColumnElement[Any]] = []
    for col in table.c:
        if col.name in PAYLOAD_COLUMNS:
            cols.append(payload_text(col).label(col.name))
        else:
            cols.append(col)
    return cols


def json_rows(dialect: str, param: str, columns: list[ColumnClause[Any]]) -> FromClause:
    """Rows from a bind parameter holding a JSON array of objects, as a FROM clause `v`.

    Lets one set-based statement take a whole batch in a single parameter:
    json_to_recordset on PostgreSQL (reading the text as it goes costs the server under
    half what building a jsonb value first did), json_each on SQLite.
    """
    if dialect == "postgresql":
        return (func.json_to_recordset(cast(bindparam(param, type_=Text), postgresql.JSON))
                .table_valued(*columns).render_derived(name="v", with_types=True))
    each = func.json_each(bindparam(param, type_=Text)).table_valued("value")
    return select(*(cast(func.json_extract(each.c.value, f"$.{c.name}"), c.type).label(c.name)
                    for c in columns)).select_from(each).subquery("v")
