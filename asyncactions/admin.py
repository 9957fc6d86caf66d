"""Operator actions: look up, cancel, run again, wait for the end; by id or by filter;
and retention (purge)."""

from __future__ import annotations

import getpass
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import psycopg
from sqlalchemy import (
    Engine,
    Float,
    FromClause,
    and_,
    bindparam,
    delete,
    exists,
    func,
    literal,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.expression import ColumnElement

from . import processors as registry
from .action import Action, Status, read_action
from .audit import FINAL, Filter, parse_statuses
from .database import Database, connection
from .errors import ActionNotFound, AsyncActionsError, UnknownProcessor
from .notifier import NOTIFY_CHANNEL, OUTCOME_CHANNEL
from .schema import (
    ACTIVE_STATUSES,
    NOW,
    UtcDateTime,
    action_columns,
    async_action,
    async_action_processor,
    async_action_worker,
    db_now,
    upsert,
)

t = async_action
_other = t.alias("other")  # the same table again, for conditions on other rows
_ID = re.compile(r"^(?:ASYNC-)?0*(\d+)$", re.IGNORECASE)
MAX_ID = 2**63 - 1  # a bigint: no action has a larger id


def parse_id(value: str | int) -> int:
    """42, '42' or 'ASYNC-00000042' -> 42."""
    number: int | None = value if isinstance(value, int) else None
    if isinstance(value, str):
        match = _ID.match(value.strip())
        if match is None:
            raise ActionNotFound(f"{_shown(value)} is not an action id; write it as 42 or "
                                 "ASYNC-00000042")
        number = int(match[1]) if len(match[1]) < 20 else None  # 20 digits: too many
    if number is None or not 0 <= number <= MAX_ID:
        raise ActionNotFound(f"{_shown(value)} is not an action id: ids run from 1 to {MAX_ID}")
    return number


def _shown(value: str | int) -> str:
    if isinstance(value, int):  # str() of a huge int is refused, and of no use here
        return str(value) if abs(value) < 10**30 else "that number"
    return repr(value if len(value) <= 40 else f"{value[:30]}...")


def get_action(db: Database, action_id: int | str) -> Action:
    action_id = parse_id(action_id)
    with connection(db) as conn:
        row = conn.execute(select(*action_columns()).where(t.c.id == action_id)).first()
    if row is None:
        raise ActionNotFound(f"no action {action_id} (ASYNC-{action_id:08d}); "
                             "`asyncactions list` shows the ones that exist")
    return read_action(row)


_CANCELED = {"status": Status.CANCELED.value, "finished_at": NOW, "claimed_by": None,
             "lease_expires_at": None}
CANCEL = (
    update(t)
    .where(t.c.id == bindparam("b_id"), t.c.status.in_(ACTIVE_STATUSES))
    .values(**_CANCELED)
    .returning(*action_columns())
)


def cancel(db: Database, action_id: int | str) -> Action:
    """Cancel a pending or running action. A running attempt goes on, but its outcome
    is fenced out: the action stays canceled."""
    return _transition(db, parse_id(action_id), CANCEL, {}, "cancel",
                       "only pending or running actions can be canceled")


_RETRIED = {"status": Status.PENDING.value, "next_eligible_at": NOW, "finished_at": None}
RETRY = (
    update(t)
    .where(t.c.id == bindparam("b_id"), t.c.status.in_(FINAL))
    .values(**_RETRIED, retries=bindparam("retries"))
    .returning(*action_columns())
)


def retry(db: Database, action_id: int | str, *, retries: int | None = None) -> Action:
    """Run a finished action again now; attempts and error history are kept."""
    action_id = parse_id(action_id)
    if retries is not None and retries < 0:
        raise AsyncActionsError(f"retries must be >= 0, got {retries}")
    params = {"retries": retries} if retries is not None else {}
    stmt = RETRY if retries is not None else RETRY.values(retries=t.c.retries)
    try:
        return _transition(db, action_id, stmt, params, "retry",
                           "only completed, failed or canceled actions can be run again")
    except sa_exc.IntegrityError:
        raise AsyncActionsError(f"cannot retry action {action_id}: another pending or running "
                                "action holds its unique_key; cancel that one first") from None


def _transition(db: Database, action_id: int, stmt: Any, params: dict[str, Any], verb: str,
                rule: str) -> Action:
    with connection(db) as conn:
        row = conn.execute(stmt, {"b_id": action_id, **params}).first()
    if row is not None:
        return read_action(row)
    current = get_action(db, action_id)  # raises ActionNotFound
    raise AsyncActionsError(f"cannot {verb} {current.display_id}: it is {current.status}; "
                            f"{rule}")


# --- many at once: by filter -------------------------------------------------------------

def cancel_matching(db: Database, where: Filter, *, dry_run: bool = False) -> int:
    """Cancel every pending or running action `where` matches; returns how many (with
    `dry_run`, how many would be, changing nothing)."""
    if where.statuses:
        parse_statuses(where.statuses, ACTIVE_STATUSES,
                       why=": only pending or running actions can be canceled")
    return _apply(db, and_(where.where(), t.c.status.in_(ACTIVE_STATUSES)), _CANCELED, dry_run)


def retry_matching(db: Database, where: Filter, *, retries: int | None = None,
                   dry_run: bool = False) -> int:
    """Run every finished action `where` matches again now; returns how many.

    An action whose unique_key another action would then share (a live one, or a newer
    match) is left out: a key admits one live action.
    """
    if where.statuses:
        parse_statuses(where.statuses, FINAL,
                       why=": only completed, failed or canceled actions can be run again")
    if retries is not None and retries < 0:
        raise AsyncActionsError(f"retries must be >= 0, got {retries}")
    same_key = _other.c.unique_key == t.c.unique_key
    held = exists().where(same_key, _other.c.status.in_(ACTIVE_STATUSES))
    newer = exists().where(same_key, _other.c.id > t.c.id, where.where(_other),
                           _other.c.status.in_(FINAL))
    retryable = and_(where.where(), t.c.status.in_(FINAL),
                     t.c.unique_key.is_(None) | ~(held | newer))
    values = {**_RETRIED, "retries": t.c.retries if retries is None else retries}
    try:
        return _apply(db, retryable, values, dry_run)
    except sa_exc.IntegrityError:
        raise AsyncActionsError("cannot retry: an action was enqueued meanwhile with the "
                                "unique_key of one of them; nothing changed, run it again") \
            from None


def _apply(db: Database, where: ColumnElement[bool], values: dict[str, Any],
           dry_run: bool) -> int:
    with connection(db) as conn:
        if dry_run:
            return conn.execute(select(func.count()).select_from(t).where(where)).scalar_one()
        return conn.execute(update(t).where(where).values(**values)).rowcount


# --- retention ----------------------------------------------------------------------------

def _purgeable(table: FromClause) -> ColumnElement[bool]:
    return and_(table.c.status.in_(bindparam("statuses", expanding=True)),
                table.c.finished_at < bindparam("cutoff", type_=UtcDateTime()))


PURGE_COUNT = select(func.count()).select_from(t).where(_purgeable(t))
# One batch. The MATERIALIZED CTE is an optimisation fence: without it PostgreSQL may
# run the LIMITed select more than once and delete more than a batch. It is nested in
# the IN (…): SQLite's driver reports no row count for a statement that starts with
# WITH. Rows are picked with SKIP LOCKED so a purge never waits on an action being
# retried, and the condition is checked again on each row deleted.
_batch = (select(_other.c.id).where(_purgeable(_other)).limit(bindparam("batch"))
          .with_for_update(skip_locked=True)
          .cte("batch", nesting=True).prefix_with("MATERIALIZED"))
PURGE_BATCH = delete(t).where(t.c.id.in_(select(_batch.c.id)), _purgeable(t))


def purge(engine: Engine, older_than: timedelta, statuses: Iterable[str] = FINAL, *,
          dry_run: bool = False, batch_size: int = 1000,
          progress: Callable[[int, int], None] | None = None) -> int:
    """Delete finished actions whose finished_at is older than `older_than`, one
    transaction per `batch_size` rows so the table stays available; returns how many
    (with `dry_run`, how many would be). `progress(done, total)` follows along."""
    statuses = parse_statuses(statuses, FINAL, why=": only finished actions can be purged")
    with engine.begin() as conn:
        # One cutoff for the whole run, so the count and the batches agree.
        cutoff = conn.scalar(select(db_now(literal(-older_than.total_seconds(), Float))))
        params = {"statuses": list(statuses), "cutoff": cutoff, "batch": batch_size}
        total = conn.execute(PURGE_COUNT, params).scalar_one()
    if dry_run:
        return total
    done = 0
    if progress:
        progress(done, total)
    while True:
        with engine.begin() as conn:
            deleted = conn.execute(PURGE_BATCH, params).rowcount
        if not deleted:
            return done
        done += deleted
        if progress:
            progress(done, max(total, done))


def wait_for(db: Database, action_id: int | str, timeout: float = 60) -> Action:
    """Block until the action is completed, failed or canceled; TimeoutError after
    `timeout` seconds. On PostgreSQL it wakes when workers write outcomes (LISTEN), with a
    slow poll behind; on SQLite it polls with a growing pause."""
    waiting = Waiting(parse_id(action_id), timeout)
    with _outcome_listener(engine_of(db)) as notified:
        while True:
            action = get_action(db, waiting.action_id)
            pause = waiting.pause(action, listening=notified is not None)
            if pause is None:
                return action
            if notified is None:
                time.sleep(pause)
            else:
                notified(pause)


class Waiting:
    """wait_for's rules, for its sync and asyncio loops: when to stop, how long to
    pause before looking again."""

    def __init__(self, action_id: int, timeout: float) -> None:
        self.action_id = action_id
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._poll = 0.005

    def pause(self, action: Action, *, listening: bool) -> float | None:
        """None once `action` is final, else the seconds to wait (for a notification
        when listening) before looking again; TimeoutError past the deadline."""
        if action.status.is_final:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{action.display_id} is still {action.status} after "
                               f"{self._timeout:g}s")
        if listening:  # a slow poll behind the notifications
            return min(left, 1.0)
        pause, self._poll = min(self._poll, left), min(self._poll * 2, 0.25)
        return pause


def engine_of(db: Database) -> Engine:
    with connection(db) as conn:
        return conn.engine


def listen_url(engine: Engine) -> str:
    """The URL for a connection of psycopg's own (to LISTEN on)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def _outcome_listener(engine: Engine) -> Iterator[Callable[[float], None] | None]:
    """On PostgreSQL, a function that waits up to N seconds for outcomes to be written."""
    if engine.dialect.name != "postgresql":
        yield None
        return
    with psycopg.connect(listen_url(engine), autocommit=True) as listener:
        listener.execute(f"LISTEN {OUTCOME_CHANNEL}")

        def wait(seconds: float) -> None:
            for _ in listener.notifies(timeout=seconds, stop_after=1):
                pass

        yield wait


# --- processors: pause and resume, cluster-wide ------------------------------------------

class ProcessorState(NamedTuple):
    """A processor's run-time state in async_action_processor."""

    name: str
    paused_at: datetime | None = None
    paused_by: str | None = None

    @property
    def paused(self) -> bool:
        return self.paused_at is not None


def check_processor_known(db: Database, name: str) -> None:
    """Producers need not import processors, so a name is known if it is registered
    here, run by a live worker, has a state, or is already in the table (asked last:
    on a large table that is the costly look-up)."""
    known = set(registry.registered())
    with connection(db) as conn:
        for (listed,) in conn.execute(select(async_action_worker.c.processors)):
            known.update(listed.split(","))
        known.update(conn.execute(select(async_action_processor.c.name)).scalars())
        if name not in known:
            known.update(conn.execute(select(t.c.processor).distinct()).scalars())
    if name not in known:
        raise UnknownProcessor(f"unknown processor {name!r}; known: "
                               f"{', '.join(sorted(known)) or 'none'} (pass --import MODULE "
                               "that registers it, or start a worker that runs it)")


def processor_states(db: Database) -> dict[str, ProcessorState]:
    p = async_action_processor
    with connection(db) as conn:
        return {r.name: ProcessorState(r.name, r.paused_at, r.paused_by)
                for r in conn.execute(select(p.c.name, p.c.paused_at, p.c.paused_by))}


def pause(db: Database, name: str, *, by: str | None = None) -> ProcessorState:
    """Stop claiming `name`'s actions on every worker, from their next claim (within a
    poll interval); running attempts finish, new actions are still enqueued."""
    check_processor_known(db, name)
    return _set_paused(db, name, NOW, by or operator())


def resume(db: Database, name: str) -> ProcessorState:
    """Claim `name`'s actions again; listening workers are woken at once."""
    check_processor_known(db, name)
    return _set_paused(db, name, None, None)


def _set_paused(db: Database, name: str, at: Any, by: str | None) -> ProcessorState:
    p = async_action_processor
    with connection(db) as conn:
        stmt = upsert(conn.dialect.name, p).values(name=name, paused_at=at, paused_by=by)
        # Pausing again keeps the first pause's time and author.
        paused_at = func.coalesce(p.c.paused_at, stmt.excluded.paused_at) if at is not None \
            else None
        row = conn.execute(stmt.on_conflict_do_update(
            index_elements=[p.c.name],
            set_={"paused_at": paused_at,
                  "paused_by": func.coalesce(p.c.paused_by, stmt.excluded.paused_by)
                  if at is not None else None})
            .returning(p.c.name, p.c.paused_at, p.c.paused_by)).one()
        if at is None and conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, name)))
    return ProcessorState(*row)


def operator() -> str:
    """Who is at the keyboard, for the record (paused_by, created_by)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
