"""The worker's SQL: claim, record outcomes, hand back, leases. One statement each.

Written in SQLAlchemy Core so one statement serves PostgreSQL and SQLite; only
time arithmetic and payload casts differ, and schema.py spells those.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import (
    Boolean,
    Connection,
    Float,
    Text,
    bindparam,
    case,
    delete,
    null,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from .action import Action, Status
from .enqueue import row_to_action
from .outcomes import Outcome
from .schema import NOW, action_columns, as_payload, async_action, async_action_worker, db_now

t = async_action

# Claim exactly the free capacity in one statement. The MATERIALIZED CTE is an
# optimisation fence: the planner cannot run the LIMITed, SKIP LOCKED select more than
# once or lock more rows than asked. (SQLite ignores FOR UPDATE; its single writer
# makes the statement atomic anyway.)
_picked = (
    select(t.c.id)
    .where(t.c.status == Status.PENDING.value,
           t.c.next_eligible_at <= NOW,
           t.c.processor.in_(bindparam("processors", expanding=True)))
    .order_by(t.c.priority, t.c.next_eligible_at, t.c.id)
    .limit(bindparam("free"))
    .with_for_update(skip_locked=True)
    .cte("picked")
    .prefix_with("MATERIALIZED")
)
CLAIM = (
    update(t)
    .where(t.c.id.in_(select(_picked.c.id)))
    .values(status=Status.RUNNING.value, attempts=t.c.attempts + 1, started_at=NOW,
            finished_at=None, claimed_by=bindparam("worker"),
            lease_expires_at=db_now(bindparam("lease", type_=Float)))
    .returning(*action_columns())
)


def claim(conn: Connection, worker: str, processors: Sequence[str], free: int,
          lease: timedelta) -> list[Action]:
    rows = conn.execute(CLAIM, {"processors": list(processors), "free": free, "worker": worker,
                                "lease": lease.total_seconds()}).all()
    # RETURNING has no order: put them back in claim order.
    actions = [row_to_action(r) for r in rows]
    actions.sort(key=lambda a: (a.priority, a.next_eligible_at, a.id))
    return actions


# Record outcomes, fenced on the attempt that was claimed: a worker that lost its
# lease (and so its claim) can never overwrite a newer attempt or a cancel.
RECORD = (
    update(t)
    .where(t.c.id == bindparam("b_id"),
           t.c.attempts == bindparam("b_attempts"),
           t.c.claimed_by == bindparam("b_worker"),
           t.c.status == Status.RUNNING.value)
    .values(status=bindparam("b_status"),
            retries=bindparam("b_retries"),
            result=as_payload(bindparam("b_result", type_=Text)),
            error=bindparam("b_error", type_=Text),
            errors=case((bindparam("b_errors_changed", type_=Boolean),
                         as_payload(bindparam("b_errors", type_=Text))), else_=t.c.errors),
            next_eligible_at=case((bindparam("b_final", type_=Boolean), t.c.next_eligible_at),
                                  else_=db_now(bindparam("b_delay", type_=Float))),
            finished_at=case((bindparam("b_final", type_=Boolean), NOW), else_=null()),
            claimed_by=None, lease_expires_at=None)
)


def record(conn: Connection, outcomes: Sequence[Outcome]) -> int:
    """Write outcomes in one batch; returns how many rows the fence let through."""
    params = [{
        "b_id": o.action.id, "b_attempts": o.action.attempts, "b_worker": o.action.claimed_by,
        "b_status": o.status.value, "b_retries": o.retries, "b_result": o.result,
        "b_error": o.error, "b_errors": o.errors, "b_errors_changed": o.errors is not None,
        "b_final": o.is_final, "b_delay": o.delay.total_seconds(),
    } for o in outcomes]
    result = conn.execute(RECORD, params)
    return result.rowcount


# Hand back actions that were claimed but never started (shutdown): as if never claimed.
RELEASE = (
    update(t)
    .where(t.c.id == bindparam("b_id"), t.c.attempts == bindparam("b_attempts"),
           t.c.claimed_by == bindparam("b_worker"), t.c.status == Status.RUNNING.value)
    .values(status=Status.PENDING.value, attempts=t.c.attempts - 1, claimed_by=None,
            lease_expires_at=None)
)


def release(conn: Connection, actions: Sequence[Action]) -> None:
    if actions:
        conn.execute(RELEASE, [{"b_id": a.id, "b_attempts": a.attempts,
                                "b_worker": a.claimed_by} for a in actions])


# --- workers and leases -------------------------------------------------------------

def register_worker(conn: Connection, worker: str, hostname: str, pid: int,
                    processors: Sequence[str]) -> None:
    values = {"id": worker, "hostname": hostname, "pid": pid,
              "processors": ",".join(processors), "started_at": NOW, "heartbeat_at": NOW}
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = dialect_insert(async_action_worker).values(values)
    conn.execute(stmt.on_conflict_do_update(index_elements=["id"],
                                            set_={"heartbeat_at": NOW}))


def unregister_worker(conn: Connection, worker: str) -> None:
    conn.execute(delete(async_action_worker).where(async_action_worker.c.id == worker))


# Only the actions the worker knows it holds: a claim whose reply was lost (connection
# cut after commit) is not extended, so its lease runs out and it comes back.
EXTEND_LEASES = (
    update(t)
    .where(t.c.claimed_by == bindparam("worker"), t.c.status == Status.RUNNING.value,
           t.c.id.in_(bindparam("held", expanding=True)))
    .values(lease_expires_at=db_now(bindparam("lease", type_=Float)))
)


def heartbeat(conn: Connection, worker: str, lease: timedelta, held: Sequence[int]) -> int:
    """Mark this worker alive and extend the leases of what it holds; returns whether its
    registration row still existed (0 means another worker declared it dead)."""
    alive = conn.execute(update(async_action_worker)
                         .where(async_action_worker.c.id == worker)
                         .values(heartbeat_at=NOW)).rowcount
    if held:
        conn.execute(EXTEND_LEASES, {"worker": worker, "lease": lease.total_seconds(),
                                     "held": list(held)})
    return alive


def workers_on(conn: Connection, hostname: str) -> list[tuple[str, str, int]]:
    w = async_action_worker
    return [(r.id, r.hostname, r.pid) for r in conn.execute(
        select(w.c.id, w.c.hostname, w.c.pid).where(w.c.hostname == hostname))]


def forget_workers(conn: Connection, worker_ids: Sequence[str]) -> None:
    conn.execute(delete(async_action_worker).where(async_action_worker.c.id.in_(worker_ids)))


# Workers whose heartbeat stopped for longer than a lease are gone.
FORGET_DEAD_WORKERS = delete(async_action_worker).where(
    async_action_worker.c.heartbeat_at < db_now(bindparam("neg_lease", type_=Float)))

# Running actions whose lease ran out, or whose worker is no longer registered.
LOST = (
    select(*action_columns())
    .where(t.c.status == Status.RUNNING.value,
           (t.c.lease_expires_at < NOW)
           | t.c.claimed_by.not_in(select(async_action_worker.c.id)))
    .order_by(t.c.lease_expires_at)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)


def lost_actions(conn: Connection, lease: timedelta, limit: int = 500) -> list[Action]:
    conn.execute(FORGET_DEAD_WORKERS, {"neg_lease": -lease.total_seconds()})
    return [row_to_action(r) for r in conn.execute(LOST, {"limit": limit})]

