"""Questions operators ask of the table: which actions, how each processor is doing,
which workers are alive. Read-only; admin.py changes things.

Every statement is SQLAlchemy Core, so one statement serves PostgreSQL and SQLite.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Float,
    FromClause,
    and_,
    bindparam,
    case,
    func,
    literal,
    literal_column,
    select,
    true,
    union_all,
)
from sqlalchemy.sql.expression import ColumnElement

from .action import Action, Status, read_action
from .database import Database, connection
from .errors import AsyncActionsError
from .schema import (
    LIVE_KEY,
    NOW,
    STATUSES,
    action_columns,
    async_action,
    async_action_worker,
    db_now,
    elapsed_seconds,
)

t = async_action
w = async_action_worker
FINAL = tuple(s.value for s in Status if s.is_final)  # in Status order: stable messages


def parse_statuses(value: str | Iterable[str], allowed: Iterable[str] = STATUSES,
                   *, why: str = "") -> tuple[str, ...]:
    """'failed,canceled' -> ('failed', 'canceled'); unknown or disallowed names are an
    error that lists the allowed ones."""
    names = value.split(",") if isinstance(value, str) else value
    wanted = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    allowed = tuple(allowed)
    for name in wanted:
        if name not in allowed:
            kind = "unknown status" if name not in STATUSES else "status"
            raise AsyncActionsError(f"{kind} {name!r}{why}; use {', '.join(allowed)} "
                                    "(comma-separated for several)")
    if not wanted:
        raise AsyncActionsError(f"no status given; use {', '.join(allowed)}")
    return wanted


@dataclass(frozen=True)
class Filter:
    """Which actions a command is about. Every part is optional; all given parts hold."""

    statuses: tuple[str, ...] = ()
    processor: str | None = None
    related_id: str | None = None
    since: timedelta | None = None  # created within this long before now
    event: str | None = None  # created by this event's rules

    def where(self, table: FromClause = t) -> ColumnElement[bool]:
        c = table.c
        conditions: list[ColumnElement[bool]] = []
        if self.statuses:
            conditions.append(c.status.in_(self.statuses))
        if self.processor is not None:
            conditions.append(c.processor == self.processor)
        if self.related_id is not None:
            conditions.append(c.related_id == self.related_id)
        if self.event is not None:
            conditions.append(c.event == self.event)
        if self.since is not None:
            ago = db_now(literal(-self.since.total_seconds(), Float))
            conditions.append(c.created_at >= ago)
        return and_(true(), *conditions)


def live_holder(db: Database, unique_key: str) -> int | None:
    """The id of the pending or running action holding `unique_key`, if one does."""
    with connection(db) as conn:
        return conn.execute(select(t.c.id).where(LIVE_KEY, t.c.unique_key == unique_key)
                            ).scalar()


def list_actions(db: Database, where: Filter = Filter(), *, limit: int = 50,
                 before: int | None = None) -> list[Action]:
    """Matching actions, newest first (by id: the order they were enqueued); `before`
    pages on from an id (keyset paging: the primary key, however deep the page)."""
    matching = where.where()
    if before is not None:
        matching = and_(matching, t.c.id < before)

    def newest(*also: ColumnElement[bool]) -> Any:
        return (select(*action_columns()).where(matching, *also)
                .order_by(t.c.id.desc()).limit(limit))

    if where.processor is None:
        stmt = newest()
    else:
        # The (processor, id) index leaves running rows out (schema.NOT_RUNNING): its
        # predicate spelled the same, so the planner sees the index applies; the
        # running rows, few, come apart.
        running = literal_column("'running'")
        parts = [newest(t.c.status != running).subquery(),
                 newest(t.c.status == running).subquery()]
        both = union_all(*(select(part) for part in parts)).subquery()
        stmt = select(both).order_by(both.c.id.desc()).limit(limit)
    with connection(db) as conn:
        return [read_action(r) for r in conn.execute(stmt)]


def db_clock(db: Database) -> datetime:
    """The database's time: ages are measured on the clock that stamped the rows."""
    with connection(db) as conn:
        return conn.execute(select(NOW)).scalar_one()


def timings(action: Action, now: datetime) -> dict[str, timedelta | None]:
    """How long the action waited before its latest attempt started (or has waited so
    far), and how long that attempt ran (or has run so far)."""
    started, finished = action.started_at, action.finished_at
    queued_until = started or (now if action.status == Status.PENDING else finished)
    run_until = finished or (now if action.status == Status.RUNNING else None)
    return {
        "queued": queued_until - action.created_at if queued_until else None,
        "run_time": run_until - started if started and run_until else None,
    }


# --- stats ------------------------------------------------------------------------------

TOP_ERRORS = 5
_window = t.c.created_at >= db_now(bindparam("neg_window", type_=Float))
_run_time = elapsed_seconds(t.c.started_at, t.c.finished_at)
_ran_to_the_end = and_(t.c.status.in_(FINAL), t.c.started_at.is_not(None),
                       t.c.finished_at.is_not(None))

STATS_TOTALS = (
    select(t.c.processor,
           *(func.count().filter(t.c.status == s).label(s) for s in STATUSES),
           func.count().filter(t.c.attempts > 0).label("attempted"),
           func.count().filter(t.c.attempts > 1).label("retried"),
           func.avg(case((_ran_to_the_end, _run_time))).label("mean_run"))
    .where(_window)
    .group_by(t.c.processor)
)

# p95 by nearest rank: the smallest run time whose rank reaches 95 % of the count.
_ranked = (
    select(t.c.processor, _run_time.label("seconds"),
           func.row_number().over(partition_by=t.c.processor, order_by=_run_time).label("place"),
           func.count().over(partition_by=t.c.processor).label("n"))
    .where(_window, _ran_to_the_end)
    .subquery()
)
STATS_P95 = (
    select(_ranked.c.processor, func.min(_ranked.c.seconds))
    .where(_ranked.c.place * 100 >= _ranked.c.n * 95)
    .group_by(_ranked.c.processor)
)

_by_error = (
    select(t.c.processor, t.c.error, func.count().label("n"),
           func.row_number().over(partition_by=t.c.processor,
                                  order_by=(func.count().desc(), t.c.error)).label("place"))
    .where(_window, t.c.error.is_not(None))
    .group_by(t.c.processor, t.c.error)
    .subquery()
)
STATS_TOP_ERRORS = (
    select(_by_error.c.processor, _by_error.c.error, _by_error.c.n)
    .where(_by_error.c.place <= bindparam("top"))
    .order_by(_by_error.c.processor, _by_error.c.place)
)


@dataclass(frozen=True)
class ProcessorStats:
    """One processor over a window. Rates are fractions (0..1), None without data:
    success = completed / (completed + failed); retry = share of attempted actions
    that needed more than one attempt. Run times are of the latest attempt of actions
    that reached a final state. Top errors group the actions' latest error (`error`)
    by message, most frequent first."""

    processor: str
    counts: dict[str, int]
    success_rate: float | None
    retry_rate: float | None
    mean_run_time: timedelta | None
    p95_run_time: timedelta | None
    top_errors: list[tuple[str, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def stats(db: Database, since: timedelta = timedelta(hours=24), *,
          top_errors: int = TOP_ERRORS) -> list[ProcessorStats]:
    """Per processor, over the actions created within `since`, by processor name."""
    params = {"neg_window": -since.total_seconds(), "top": top_errors}
    with connection(db) as conn:
        totals = conn.execute(STATS_TOTALS, params).all()
        p95 = dict(conn.execute(STATS_P95, params).all())
        errors: dict[str, list[tuple[str, int]]] = {}
        for name, error, n in conn.execute(STATS_TOP_ERRORS, params):
            errors.setdefault(name, []).append((error, n))
    result = []
    for row in sorted(totals, key=lambda r: r.processor):
        counts = {s: getattr(row, s) for s in STATUSES}
        ended = counts["completed"] + counts["failed"]
        result.append(ProcessorStats(
            processor=row.processor, counts=counts,
            success_rate=counts["completed"] / ended if ended else None,
            retry_rate=row.retried / row.attempted if row.attempted else None,
            mean_run_time=_seconds(row.mean_run), p95_run_time=_seconds(p95.get(row.processor)),
            top_errors=errors.get(row.processor, [])))
    return result


def _seconds(value: Any) -> timedelta | None:
    return None if value is None else timedelta(seconds=float(value))


# --- workers ----------------------------------------------------------------------------

_held = (
    select(t.c.claimed_by, func.count().label("n"))
    .where(t.c.status == Status.RUNNING.value)
    .group_by(t.c.claimed_by)
    .subquery()
)
WORKERS = (
    select(w.c.id, w.c.hostname, w.c.pid, w.c.processors, w.c.started_at, w.c.heartbeat_at,
           elapsed_seconds(w.c.heartbeat_at, NOW).label("heartbeat_age"),
           func.coalesce(_held.c.n, 0).label("running"))
    .select_from(w.outerjoin(_held, _held.c.claimed_by == w.c.id))
    .order_by(w.c.started_at, w.c.id)
)


@dataclass(frozen=True)
class WorkerInfo:
    """A registered worker; `running` counts the actions it holds right now."""

    id: str
    hostname: str
    pid: int
    processors: list[str]
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age: timedelta
    running: int


def workers(db: Database) -> list[WorkerInfo]:
    """Registered workers, oldest first. A worker that stops heartbeating is removed by
    the others' maintenance once its lease has run out."""
    with connection(db) as conn:
        return [WorkerInfo(r.id, r.hostname, r.pid, r.processors.split(","), r.started_at,
                           r.heartbeat_at, timedelta(seconds=max(r.heartbeat_age, 0.0)),
                           r.running)
                for r in conn.execute(WORKERS)]


# --- processors no worker serves --------------------------------------------------------

_LIVE_WORKER_PROCESSORS = select(w.c.processors).where(
    elapsed_seconds(w.c.heartbeat_at, NOW) <= bindparam("lease", type_=Float))
_PENDING_BY_PROCESSOR = (select(t.c.processor, func.count())
                         .where(t.c.status == Status.PENDING.value).group_by(t.c.processor))


@dataclass(frozen=True)
class Serving:
    """Which processors live workers run, and the pending actions of those none runs: a
    typo in a processor name (or a worker that is down) is seen, not waited on."""

    served: frozenset[str]
    unserved: dict[str, int]  # processor -> pending actions


def serving(db: Database, lease: timedelta) -> Serving:
    """A worker is live while its last heartbeat is younger than `lease`."""
    with connection(db) as conn:
        served = {name for (names,) in conn.execute(_LIVE_WORKER_PROCESSORS,
                                                    {"lease": lease.total_seconds()})
                  for name in names.split(",")}
        pending = dict(conn.execute(_PENDING_BY_PROCESSOR).tuples().all())
    return Serving(frozenset(served), {p: n for p, n in sorted(pending.items())
                                       if p not in served})
