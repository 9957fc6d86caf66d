"""The worker's SQL: claim, record outcomes, hand back, heartbeat (and leadership),
rescue, wake. One statement each; tests/test_queries.py holds each to its contract on
both backends.

Written in SQLAlchemy Core so one statement serves PostgreSQL and SQLite; only
time arithmetic and payload casts differ, and schema.py spells those.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Float,
    Integer,
    SmallInteger,
    Text,
    any_,
    bindparam,
    case,
    column,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    null,
    select,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.sql.expression import ColumnElement, Select

from . import codec
from .action import Action, Status, read_action, row_to_action
from .database import HotStatement
from .notifier import NOTIFY_CHANNEL, OUTCOME_CHANNEL
from .outcomes import Kind, Outcome
from .processors import PERIODS
from .schema import (
    NOW,
    PAUSED,
    PENDING_ONLY,
    UtcDateTime,
    action_columns,
    as_payload,
    async_action,
    async_action_processor,
    async_action_start,
    async_action_worker,
    clock_now,
    db_now,
    elapsed_seconds,
    json_rows,
    largest,
    smallest,
    statement_now,
    upsert,
)

t = async_action
_starts = async_action_start  # rate-limited processors' starts

_earlier = t.alias("earlier")
# Statuses in conditions are literals: a generic plan (the claim's and the outcome
# write's sessions force one; others may choose one) can then use the partial indexes
# on status, where a bound value proves nothing of their predicates.
_PENDING, _RUNNING = literal_column("'pending'"), literal_column("'running'")


def _runnable(names: Sequence[str]) -> list[ColumnElement[bool]]:
    """What makes a pending action claimable now, besides caps: eligible, its processor
    not paused, and no other action of its ordering key running or, earlier, pending.

    The key check is one probe of the ordering index (statuses as literals, so the
    prepared plan can use it); a key-less action skips it. Two claimers that each see
    a different action of one key as first (a lower id committed late, or an earlier
    one retried by hand, between their snapshots) are stopped by the unique index on
    running keys: the second one's claim fails and is simply tried again."""
    o = _earlier
    held = exists().where(o.c.ordering_key == t.c.ordering_key,
                          o.c.status.in_([_PENDING, _RUNNING]), o.c.id != t.c.id,
                          (o.c.status == _RUNNING) | (o.c.id < t.c.id))
    p = async_action_processor
    # Read once per claim (a hashed subplan), by the partial index on paused processors
    # (the claim session allows no sequential scan). Not a join: an anti-join's row
    # estimate made the planner sort every pending row instead of walking the claim index.
    paused = select(p.c.name).where(PAUSED)
    return [PENDING_ONLY,  # the claim index's own predicate (see schema.py)
            t.c.next_eligible_at <= NOW,
            t.c.processor.in_([literal(name, Text) for name in names]),
            t.c.processor.not_in(paused),
            t.c.ordering_key.is_(None) | ~held]


class Flow(NamedTuple):
    """A processor's cluster-wide caps, as its claim enforces them."""

    concurrency: int | None
    rate_count: int | None
    rate_seconds: float | None


def _allowed(name: str, flow: Flow) -> ColumnElement[int]:
    """How many the cluster may start now: the free capacity asked for, less what the
    caps hold back (never below 0: to SQLite a negative LIMIT means none)."""
    room: list[ColumnElement[int]] = []
    mine = t.c.processor == literal(name, Text)
    if flow.concurrency is not None:
        running = select(func.count()).where(mine, t.c.status == _RUNNING)
        room.append(literal(flow.concurrency, Integer) - running.scalar_subquery())
    if flow.rate_count is not None:
        since = statement_now(literal(-(flow.rate_seconds or 0.0), Float))
        started = select(func.count()).where(_starts.c.processor == literal(name, Text),
                                             _starts.c.started_at > since)
        room.append(literal(flow.rate_count, Integer) - started.scalar_subquery())
    return largest(smallest(bindparam("free", type_=Integer), *room), literal(0, Integer))


# Claim exactly the free capacity in one statement. The MATERIALIZED CTE is an
# optimisation fence: the planner cannot run the LIMITed, SKIP LOCKED select more than
# once or lock more rows than asked. (SQLite ignores FOR UPDATE; its single writer
# makes the statement atomic anyway.)
# Where a claim's walk of the claim index starts, by (priority, next_eligible_at, id):
# the front unless the caller gives a floor (see claiming.ClaimFloor).
Key = tuple[int, datetime, int]
LONG_AGO = datetime(1, 1, 1, tzinfo=UTC)
FRONT: Key = (-32768, LONG_AGO, 0)  # below every action's key


def _address(dialect: str) -> ColumnElement[Any]:
    """What a claim's update finds its picked rows by: on PostgreSQL the row's physical
    address (a claim of 190 updated them in 3.8 ms so, 4.4 ms through the primary key);
    on SQLite the id, which is the row's address there. A row updated by another
    transaction between the pick and the update has moved: it is not claimed this time."""
    return literal_column("ctid" if dialect == "postgresql" else "id").label("address")


def _walk(dialect: str, name: str, limit: Any, floor: int = 0) -> Select[Any]:
    """One processor's claimable actions in claim order, locked as they are taken: a walk
    of the claim index (processor first) from the floor's key on, stopping at the limit.
    The key comparison is a row comparison so the index scan starts there, not filters."""
    key = tuple_(t.c.priority, t.c.next_eligible_at, t.c.id)
    start = tuple_(bindparam(f"floor{floor}_priority", type_=SmallInteger),
                   bindparam(f"floor{floor}_at", type_=UtcDateTime),
                   bindparam(f"floor{floor}_id", type_=BigInteger))
    return (
        select(_address(dialect), t.c.id, t.c.priority, t.c.next_eligible_at)
        .where(*_runnable([name]), key >= start)
        .order_by(t.c.priority, t.c.next_eligible_at, t.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def _fair(dialect: str, names: Sequence[str]) -> Select[Any]:
    """The claim for several processors, round robin within each priority: each walks
    its own part of the claim index for up to `free` actions, and the first `free` of
    them by (priority, turn, eligibility) are taken. One processor's backlog (a retry
    storm) so leaves the others their share, and takes every slot they do not use.

    The walks lock what they read (SKIP LOCKED must be where the rows are read, or two
    claimers would skip nothing and collide): up to `free` rows per processor, held
    until the claim commits, a moment later; the ones not taken stay pending."""
    free = bindparam("free", type_=Integer)
    turns = []
    for i, name in enumerate(names):
        walk = _walk(dialect, name, free, i).subquery()
        # The walk is in (priority, eligibility, id) order already: no sort to rank.
        turn = func.row_number().over(partition_by=walk.c.priority,
                                      order_by=(walk.c.next_eligible_at, walk.c.id))
        turns.append(select(walk.c.address, walk.c.id, walk.c.priority, walk.c.next_eligible_at,
                            turn.label("turn")))
    each = union_all(*turns).subquery("each")
    return (select(each.c.address)
            .order_by(each.c.priority, each.c.turn, each.c.next_eligible_at, each.c.id)
            .limit(free))


_ELIGIBILITY = operator.attrgetter("priority", "next_eligible_at", "id")


def claim_order(actions: Sequence[Action]) -> list[Action]:
    """Claimed actions in the order the claim chose them (RETURNING has none): by
    priority, then round robin across processors, then eligibility."""
    by_eligibility = sorted(actions, key=_ELIGIBILITY)
    if len({a.processor for a in actions}) <= 1:
        return by_eligibility  # one processor: its turns follow its eligibility
    turns: dict[tuple[str, int], int] = {}
    ranked = []
    for a in by_eligibility:
        turn = turns[a.processor, a.priority] = turns.get((a.processor, a.priority), 0) + 1
        ranked.append(((a.priority, turn, a.next_eligible_at, a.id), a))
    return [a for _, a in sorted(ranked, key=lambda r: r[0])]


@functools.cache
def claim_statement(dialect: str, processors: tuple[tuple[str, int], ...],
                    flow: Flow | None = None, *, log_starts: bool = False) -> HotStatement:
    """The claim for these (processor, retries) pairs, on `dialect`. The worker's processors are
    fixed: one statement for them, with a bound value each (an expanding IN would be
    re-rendered on every claim). An action enqueued without retries gets its
    processor's here, from the settings of the worker that first claims it. Several
    processors share the free slots fairly (see _fair); one walks its index alone.

    With `flow` (one processor with a concurrency cap or a rate limit) the statement
    counts what the cluster runs and started, and claims no more than the caps allow;
    its caller serialises such claims per processor (lock_processor). `log_starts`
    (PostgreSQL, with a rate limit): the same statement logs the starts it makes."""
    names = [name for name, _ in processors]
    if len(names) == 1:
        limit = bindparam("free") if flow is None else _allowed(names[0], flow)
        chosen = _walk(dialect, names[0], limit)
    else:
        assert flow is None, "caps apply to a claim of one processor"
        chosen = _fair(dialect, names)
    picked = chosen.cte("picked").prefix_with("MATERIALIZED")
    rows = select(picked.c.address).scalar_subquery()
    claim = (
        update(t)
        .where(literal_column("async_action.ctid") == any_(func.array(rows))
               if dialect == "postgresql" else t.c.id.in_(rows))
        .values(status=Status.RUNNING.value, attempts=t.c.attempts + 1, started_at=clock_now(),
                progress=null(),
                retries=func.coalesce(t.c.retries, case(
                    {name: literal(retries, Integer) for name, retries in processors},
                    value=t.c.processor)),
                finished_at=None, claimed_by=bindparam("worker"),
                lease_expires_at=db_now(bindparam("lease", type_=Float)))
        .returning(*action_columns())
    )
    # In binary: a claimed row holds five timestamps, which psycopg reads faster so.
    return HotStatement(_with_starts_logged(claim) if log_starts else claim, binary=True)


def _with_starts_logged(claim: Any) -> Any:
    """The claim, logging the starts it makes in async_action_start in the same
    statement (a data-modifying CTE: PostgreSQL). The leader trims the log (trim_starts)."""
    claimed = claim.cte("claimed")
    logged = insert(_starts).from_select(
        ["processor", "started_at"], select(claimed.c.processor, claimed.c.started_at),
    ).cte("logged")
    return select(*claimed.c).add_cte(logged)


def lock_processor(conn: Connection, name: str, lease: timedelta) -> None:
    """Serialise the claims of one capped processor across the cluster until the
    transaction ends (PostgreSQL; SQLite has one writer). Processors without caps
    never take it, so they never wait on each other.

    Every worker's claim loop waits for this lock: a claimer cut off before its COMMIT
    would stop them all, so the transaction ends itself after a lease of waiting for its
    client (see ends_if_abandoned), in the same statement."""
    if conn.dialect.name == "postgresql":
        LOCK_PROCESSOR.rows(conn, {"key": f"asyncactions.processor:{name}",
                                   "ms": _milliseconds(lease)})


def _ends_if_abandoned() -> ColumnElement[str]:
    """The setting ends_if_abandoned makes (`ms`: the lease), for a statement of its own
    or riding another one."""
    return func.set_config("idle_in_transaction_session_timeout",
                           bindparam("ms", type_=Text), True)


# Taken before every capped claim: hot, like the claim (SQLAlchemy's own execution of
# it cost more than the round trip).
LOCK_PROCESSOR = HotStatement(select(
    _ends_if_abandoned(),
    func.pg_advisory_xact_lock(func.hashtextextended(bindparam("key", type_=Text), 0))))


def claim(conn: Connection, worker: str, processors: Sequence[tuple[str, int]], free: int,
          lease: timedelta, flow: Flow | None = None, floors: Mapping[str, Key] | None = None,
          ) -> tuple[list[Action], list[tuple[Action, Exception]]]:
    """Claim up to `free` eligible actions of these (processor, default retries). Returns
    them in claim order, and apart the ones whose stored data does not decode (with
    why), to be failed on their own. With `flow`, call lock_processor first, in the
    same transaction. A processor's walk starts at its key in `floors`, else at the
    front: actions with a lower key are not seen."""
    rated = flow is not None and flow.rate_count is not None and bool(flow.rate_seconds)
    in_one = rated and conn.dialect.name == "postgresql"
    rows = claim_statement(conn.dialect.name, tuple(processors), flow,
                           log_starts=in_one).rows(
        conn, claim_params(processors, free, worker, lease, floors))
    actions, malformed = [], []
    for row in rows:
        try:
            actions.append(row_to_action(row))
        except codec.MALFORMED as exc:
            malformed.append((row_to_action(row, payloads=False), exc))
    if rated and not in_one:
        _note_starts(conn, [a.id for a in (*actions, *(a for a, _ in malformed))])
    return claim_order(actions), malformed


def claim_params(processors: Sequence[tuple[str, int]], free: int, worker: str,
                 lease: timedelta, floors: Mapping[str, Key] | None = None,
                 ) -> dict[str, Any]:
    """The values claim_statement binds."""
    params: dict[str, Any] = {"free": free, "worker": worker, "lease": lease.total_seconds()}
    for i, (name, _) in enumerate(processors):
        (params[f"floor{i}_priority"], params[f"floor{i}_at"],
         params[f"floor{i}_id"]) = (floors or {}).get(name, FRONT)
    return params


def any_eligible(conn: Connection, processors: Sequence[str]) -> bool:
    """Whether any action of these processors is eligible now, locked or not: a claim
    that skipped locked rows (a heartbeat was extending a lease) may have missed it."""
    return conn.execute(select(
        select(t.c.id).where(*_runnable(processors)).exists())).scalar_one()


def _note_starts(conn: Connection, ids: Sequence[int]) -> None:
    """Log the starts a rate-limited processor's claim just made, in its transaction
    (where the claim itself cannot: SQLite)."""
    if ids:  # the stamps as the claim wrote them, in the database's own format
        conn.execute(insert(_starts).from_select(
            ["processor", "started_at"],
            select(t.c.processor, t.c.started_at).where(t.c.id.in_(ids))))


# No rate window is longer than this: older starts count for none.
LONGEST_WINDOW = max(PERIODS.values())


def trim_starts(conn: Connection) -> int:
    """Drop the logged starts no rate window counts any more."""
    result = conn.execute(delete(_starts).where(
        _starts.c.started_at <= db_now(literal(-LONGEST_WINDOW, Float))))
    return result.rowcount


def rate_window_opens(conn: Connection, name: str, count: int,
                      seconds: float) -> float | None:
    """Seconds until a start of `name` ages out of its full rate window, letting another
    start (the count-th latest start, plus the window); None if the window is not full."""
    at = conn.execute(
        select(elapsed_seconds(NOW, _starts.c.started_at))
        .where(_starts.c.processor == name,
               _starts.c.started_at > db_now(literal(-seconds, Float)))
        .order_by(_starts.c.started_at.desc()).offset(count - 1).limit(1)).scalar()
    return None if at is None else max(at + seconds, 0.0)


# Record a batch of outcomes in one set-based statement, fenced on the attempt that was
# claimed: a worker that lost its lease (and so its claim) can never overwrite a newer
# attempt or a cancel. RETURNING tells which outcomes the fence let through.
_OUTCOME_COLUMNS = [column("id", BigInteger), column("attempts", Integer),
                    column("worker", Text), column("status", Text), column("retries", Integer),
                    column("result", Text), column("error", Text), column("errors", Text),
                    column("final", Boolean), column("delay", Float)]


def _record_statement(dialect: str) -> Any:
    v = json_rows(dialect, "batch", _OUTCOME_COLUMNS).alias("v")
    final = v.c.final
    returning: list[Any] = [t.c.id]
    if dialect == "postgresql":
        # One wake-up per batch (an uncorrelated subquery runs once) for wait_for().
        returning.append(select(func.pg_notify(OUTCOME_CHANNEL, "")).scalar_subquery())
    fence = [t.c.id == v.c.id, t.c.attempts == v.c.attempts, t.c.claimed_by == v.c.worker,
             t.c.status == _RUNNING]
    if dialect == "postgresql":
        # The planner finds running rows by the lease index (by lease expiry), and every
        # action passes through running: until vacuum, or while a long transaction holds
        # the horizon, it keeps an entry for each action run, and a write that read them
        # all cost more with every action before it (~20,000 entries read by a batch
        # late in a drain of 20,000). A lease only grows while its attempt runs: the
        # batch's earliest claimed lease bounds the read to the actions claimed since.
        # (SQLite updates its index in place, and compares times as text.)
        fence.append(t.c.lease_expires_at >= bindparam("since", type_=DateTime(timezone=True)))
    return (
        update(t)
        .where(*fence)
        .values(status=v.c.status, retries=v.c.retries, result=as_payload(v.c.result),
                error=v.c.error,
                errors=case((v.c.errors.is_not(None), as_payload(v.c.errors)),
                            else_=t.c.errors),
                next_eligible_at=case((final, t.c.next_eligible_at), else_=db_now(v.c.delay)),
                finished_at=case((final, NOW), else_=null()),
                claimed_by=None, lease_expires_at=None)
        .returning(*returning)
    )


RECORD = {dialect: HotStatement(_record_statement(dialect))
          for dialect in ("postgresql", "sqlite")}


def record_params(dialect: str, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """RECORD's parameters: the batch as one JSON text, and on PostgreSQL the lease it
    reads running rows from (see _record_statement)."""
    rows = []
    workers: dict[str | None, str] = {}  # each claimer's id, as JSON, once per batch
    for o in outcomes:
        a = o.action
        if o.kind is Kind.COMPLETED and o.result is None:
            # The commonest outcome, written out directly: the JSON json.dumps would make,
            # less the null keys (an absent key reads as NULL), in a third of its time.
            worker = workers.get(a.claimed_by) or workers.setdefault(
                a.claimed_by, json.dumps(a.claimed_by))
            rows.append(f'{{"id":{a.id:d},"attempts":{a.attempts:d},"worker":{worker},'
                        f'"status":"completed","retries":{o.retries:d},"final":true}}')
            continue
        rows.append(json.dumps({
            "id": a.id, "attempts": a.attempts, "worker": a.claimed_by, "status": o.status,
            "retries": o.retries, "result": o.result, "error": o.error, "errors": o.errors,
            "final": o.is_final, "delay": o.delay.total_seconds()}))
    params: dict[str, Any] = {"batch": f"[{','.join(rows)}]"}
    if dialect == "postgresql":
        leases = [o.action.lease_expires_at for o in outcomes]
        params["since"] = LONG_AGO if None in leases else min(leases)  # type: ignore[type-var]
    return params


def record(conn: Connection, outcomes: Sequence[Outcome],
           lease: timedelta | None = None) -> set[int]:
    """Write outcomes in one statement; returns the ids the fence let through. With a
    `lease`, the write is not the transaction's last word (a transactional processor's
    COMMIT follows): should the client vanish before it, the server ends the transaction
    after a lease instead of keeping the actions locked from the rescue."""
    if lease is not None:
        ends_if_abandoned(conn, lease)
    dialect = conn.dialect.name
    rows = RECORD[dialect].rows(conn, record_params(dialect, outcomes))
    return {row[0] for row in rows}


# Hand back actions that were claimed but never started (shutdown): as if never claimed.
RELEASE = (
    update(t)
    .where(t.c.id == bindparam("b_id"), t.c.attempts == bindparam("b_attempts"),
           t.c.claimed_by == bindparam("b_worker"), t.c.status == _RUNNING)
    .values(status=Status.PENDING.value, attempts=t.c.attempts - 1, claimed_by=None,
            lease_expires_at=None)
)


def release(conn: Connection, actions: Sequence[Action]) -> None:
    if actions:
        conn.execute(RELEASE, [{"b_id": a.id, "b_attempts": a.attempts,
                                "b_worker": a.claimed_by} for a in actions])


# --- workers and leases -------------------------------------------------------------

def register_worker(conn: Connection, worker: str, hostname: str, pid: int,
                    processors: Sequence[str], *, lease: timedelta) -> str:
    """Register this worker (again, if it was declared dead); returns the leader's id, as
    a heartbeat does, so a starting worker need not beat to learn it. (The statement
    does not see the row it inserts: no earlier live worker means this one.)"""
    values = {"id": worker, "hostname": hostname, "pid": pid,
              "processors": ",".join(processors), "started_at": NOW, "heartbeat_at": NOW}
    stmt = upsert(conn.dialect.name, async_action_worker).values(values)
    leader = func.coalesce(_leader(), bindparam("me", type_=Text))
    return conn.execute(stmt.on_conflict_do_update(index_elements=["id"],
                                                   set_={"heartbeat_at": NOW})
                        .returning(leader),
                        {"me": worker, **_lately(lease)}).scalar_one()


def unregister_worker(conn: Connection, worker: str) -> None:
    conn.execute(delete(async_action_worker).where(async_action_worker.c.id == worker))


# Only the actions the worker knows it holds: a claim whose reply was lost (connection
# cut after commit) is not extended, so its lease runs out and it comes back. Rows
# another transaction has locked are skipped, not waited for: mostly the completer
# writing their outcomes (no lease needed any more), and the two lock the same rows in
# no common order. Waiting made them deadlock under a retry storm, stalling the whole
# worker for PostgreSQL's deadlock_timeout (1 s); a row skipped now is extended by the
# next heartbeat, a third of a lease later.
_mine = t.alias("mine")
_RENEWED = db_now(bindparam("lease", type_=Float))
EXTEND_LEASES = (
    update(t)
    .where(t.c.id.in_(
        select(_mine.c.id)
        .where(_mine.c.claimed_by == bindparam("worker"),
               _mine.c.status == _RUNNING,
               _mine.c.id.in_(bindparam("held", expanding=True)))
        .with_for_update(skip_locked=True)))
    # Never shortened (should the database's clock step back): an outcome write reads
    # running rows from the lease its batch claimed with (see _record_statement).
    .values(lease_expires_at=case((t.c.lease_expires_at > _RENEWED, t.c.lease_expires_at),
                                  else_=_RENEWED))
)


# The leader is the longest-running worker that beat lately (within two heartbeat
# intervals, a third of a lease): it runs the cluster's maintenance (rescue, prune,
# schedules, wake-ups). Every heartbeat learns who it is in the same statement, so
# electing one costs no statement of its own, holds no lock a connection pooler could
# strand, and passes on about half a lease after the leader's loss, before its
# actions' leases run out.
_live = async_action_worker.alias("live")


def _leader() -> ColumnElement[Any]:
    """The leader's id; bind its parameter with _lately(lease)."""
    return (select(_live.c.id)
            .where(_live.c.heartbeat_at > db_now(bindparam("neg_recent", type_=Float)))
            .order_by(_live.c.started_at, _live.c.id)
            .limit(1)
            .scalar_subquery())


def _lately(lease: timedelta) -> dict[str, float]:
    """_leader()'s parameter: a worker that beat within a third of a lease is live."""
    return {"neg_recent": -lease.total_seconds() / 3}


HEARTBEAT = (
    update(async_action_worker)
    .where(async_action_worker.c.id == bindparam("worker"))
    .values(heartbeat_at=NOW)
    .returning(_leader())
)


def heartbeat(conn: Connection, worker: str, lease: timedelta,
              held: Sequence[int]) -> tuple[bool, str | None]:
    """Mark this worker alive and extend the leases of what it holds. Returns whether its
    registration row still existed (false: another worker declared it dead) and the
    leader's id."""
    ends_if_abandoned(conn, lease)  # it locks this worker's row and its running actions
    row = conn.execute(HEARTBEAT, {"worker": worker, **_lately(lease)}).first()
    if held:
        conn.execute(EXTEND_LEASES, {"worker": worker, "lease": lease.total_seconds(),
                                     "held": list(held)})
    return row is not None, row[0] if row else None


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
    .where(t.c.status == _RUNNING,
           (t.c.lease_expires_at < NOW)
           | t.c.claimed_by.not_in(select(async_action_worker.c.id)))
    .order_by(t.c.lease_expires_at)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)


def lost_actions(conn: Connection, lease: timedelta, limit: int = 500) -> list[Action]:
    """Forget dead workers and lock their actions (and any whose lease ran out), for the
    rescue in the same transaction."""
    forgot = conn.execute(FORGET_DEAD_WORKERS, {"neg_lease": -lease.total_seconds()}).rowcount
    if forgot:  # rows locked: an idle leader's rescue takes no lock, nor this statement
        ends_if_abandoned(conn, lease)
    rows = conn.execute(LOST, {"limit": limit}).all()
    if rows and not forgot:
        ends_if_abandoned(conn, lease)
    return [read_action(r) for r in rows]


def ends_if_abandoned(conn: Connection, lease: timedelta) -> None:
    """(PostgreSQL) Should this transaction's client vanish mid-way (a network partition,
    a frozen host), the server ends it after a lease of waiting for the next statement,
    instead of holding its row locks until TCP gives up on the connection (hours): the
    rows a worker's heartbeat or rescue locks are the ones the other workers' rescue
    needs. Local to the transaction, so safe behind a pooler."""
    if conn.dialect.name == "postgresql":
        ENDS_IF_ABANDONED.rows(conn, {"ms": _milliseconds(lease)})


def _milliseconds(lease: timedelta) -> str:
    return str(round(lease.total_seconds() * 1000))


def ends_if_cut_off(conn: Connection, lease: timedelta) -> None:
    """(PostgreSQL) Should this transaction's client host drop off the network (a
    partition, a crash), the server ends the transaction within about a lease: it
    probes the client over TCP and gives up when nothing answers. Unlike
    ends_if_abandoned, a client that is there but quiet (a transactional processor at
    its own work) is left alone. Local to the transaction; behind a pooler it sets the
    pooler's connection, which the pooler's own keepalives then stand in for."""
    if conn.dialect.name == "postgresql":
        seconds = lease.total_seconds()
        ENDS_IF_CUT_OFF.rows(conn, {"idle": str(max(1, round(seconds / 3))),
                                    "interval": str(max(1, round(seconds / 9))),
                                    "ms": _milliseconds(lease)})


# Hot, like the statements they precede: SQLAlchemy's own execution cost more than the
# round trip (a transactional attempt ran 0.3 ms slower with the two through it).
ENDS_IF_CUT_OFF = HotStatement(select(*(
    func.set_config(name, bindparam(key, type_=Text) if key else literal("3", Text), True)
    for name, key in [("tcp_keepalives_idle", "idle"), ("tcp_keepalives_interval", "interval"),
                      ("tcp_keepalives_count", None), ("tcp_user_timeout", "ms")])))


ENDS_IF_ABANDONED = HotStatement(select(_ends_if_abandoned()))


# Wake the workers for actions that became eligible lately (a delay or a retry interval
# ran out): enqueues notify when they commit, but nothing happens when a time passes.
# Run by the leader each poll interval, so that listening workers need not poll. It
# reads the claim index, which every enqueue writes anyway (an index of its own on the
# eligibility time cost a bulk enqueue 11 %): a skip scan finds each (processor,
# priority) with pending actions, then one probe of each one's recent window (a LATERAL
# with LIMIT 1: an EXISTS there, the planner turned into a scan of the whole table). Its
# cost grows with those pairs, not with the backlog.
WAKE = text(f"""
    WITH RECURSIVE parts(processor, priority) AS (
        (SELECT processor, priority FROM async_action
         WHERE status = 'pending'
         ORDER BY processor, priority LIMIT 1)
      UNION ALL
        SELECT later.processor, later.priority FROM parts, LATERAL (
            SELECT processor, priority FROM async_action
            WHERE status = 'pending'
              AND (processor, priority) > (parts.processor, parts.priority)
            ORDER BY processor, priority LIMIT 1) AS later
    )
    SELECT pg_notify('{NOTIFY_CHANNEL}', processor) FROM (
        SELECT DISTINCT parts.processor FROM parts, LATERAL (
            SELECT FROM async_action
            WHERE status = 'pending'
              AND processor = parts.processor AND priority = parts.priority
              AND next_eligible_at > now() - make_interval(secs => :window)
              AND next_eligible_at <= now()
            LIMIT 1) AS due
    ) AS woken
""")


def wake_eligible(conn: Connection, window: timedelta) -> int:
    """Notify each processor with actions that became eligible within `window`; returns
    how many processors were woken."""
    return len(conn.execute(WAKE, {"window": window.total_seconds()}).all())


class HorizonHolder(NamedTuple):
    pid: int
    state: str | None
    xact_start: datetime
    age_s: float
    user: str | None
    application: str | None


# Sessions of this database whose open transaction began over :secs ago and holds a
# snapshot (backend_xmin) or a transaction id (backend_xid): each keeps vacuum from
# reclaiming any row that died since (PostgreSQL; without pg_read_all_stats, only the
# sessions of the worker's own role show).
HORIZON_HOLDERS = text("""
    SELECT pid, state, xact_start,
           extract(epoch FROM clock_timestamp() - xact_start) AS age_s,
           usename, application_name
    FROM pg_stat_activity
    WHERE datname = current_database()
      AND backend_type = 'client backend'
      AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
      AND pid <> pg_backend_pid()
      AND xact_start < clock_timestamp() - make_interval(secs => :secs)
    ORDER BY xact_start
""")


def horizon_holders(conn: Connection, older_than: timedelta) -> list[HorizonHolder]:
    return [HorizonHolder(pid, state, start, float(age), user, app)
            for pid, state, start, age, user, app
            in conn.execute(HORIZON_HOLDERS, {"secs": older_than.total_seconds()})]


# Eligible pending actions by processor, for the metrics (sampled, not per action).
BACKLOG = (
    select(t.c.processor, func.count(), func.min(t.c.next_eligible_at))
    .where(t.c.status == _PENDING, t.c.next_eligible_at <= NOW)
    .group_by(t.c.processor)
)


def backlog(conn: Connection) -> list[tuple[str, int, float]]:
    now = datetime.now(UTC)
    return [(name, count, max((now - oldest).total_seconds(), 0.0))
            for name, count, oldest in conn.execute(BACKLOG)]
