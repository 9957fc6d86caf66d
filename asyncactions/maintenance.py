"""Maintenance beside the worker's flow, as small services, each with a `run_once()`
that its tests call directly:

- Heartbeat (every worker): keeps the worker registered and its leases alive, and
  learns who leads the cluster.
- Rescuer, Pruner, ScheduleFirer, Waker (the leader only, so an idle cluster's load
  on the database does not grow with its size): bring back lost actions, delete
  finished ones past retention, enqueue schedules, wake listening workers for actions
  that became eligible.
- HorizonWatch (the leader, on PostgreSQL): names a long transaction that holds back
  vacuum, which slows claims down.
- BacklogSampler (every worker serving metrics): pending counts and ages.

APScheduler runs them; a service that fails is logged and runs again next time.
Leadership needs no lock: two leaders for a moment (while a lost one's heartbeat ages)
are harmless, since rescue is fenced, pruning idempotent and each schedule fire time
unique.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Connection, Engine, select

from . import admin, queries
from .completer import Written
from .database import first_line
from .enqueue import init_action
from .metrics import Metrics
from .outcomes import failed_attempt
from .processors import DEFAULTS, Processor
from .schedules import Schedule
from .schema import async_action_schedule, upsert

log = logging.getLogger("asyncactions.maintenance")


class Service(Protocol):
    interval: float  # seconds between runs

    def run_once(self) -> object: ...


class Leadership:
    """Whether this worker leads, as its latest heartbeat said; it lapses a lease after
    that heartbeat, so a worker cut off from the database stops leading on its own."""

    def __init__(self, worker_id: str, lease: timedelta) -> None:
        self._worker = worker_id
        self._lease = lease.total_seconds()
        self._until = 0.0

    def saw(self, leader: str | None) -> None:
        self._until = time.monotonic() + self._lease if leader == self._worker else 0.0

    @property
    def leading(self) -> bool:
        return time.monotonic() < self._until


@dataclass
class Heartbeat:
    """Keeps this worker registered and the leases of what it holds alive, and learns
    from the same statement whether it leads."""

    engine: Engine
    worker: str
    lease: timedelta
    held: Callable[[], Sequence[int]]
    register: Callable[[], None]
    leadership: Leadership
    metrics: Metrics | None = None

    @property
    def interval(self) -> float:
        # Several beats per lease, so a missed beat or two never costs a lease.
        return self.lease.total_seconds() / 6

    def run_once(self) -> bool:
        """Beat; returns whether this worker was still registered."""
        with self.engine.begin() as conn:
            alive, leader = queries.heartbeat(conn, self.worker, self.lease, self.held())
        if not alive:
            log.warning("this worker was declared dead (no heartbeat for a lease); "
                        "registering again")
            self.register()
            with self.engine.begin() as conn:
                _, leader = queries.heartbeat(conn, self.worker, self.lease, ())
        if self.leadership.leading != (leader == self.worker):
            log.info("this worker %s the cluster's maintenance",
                     "now runs" if leader == self.worker else "no longer runs")
        self.leadership.saw(leader)
        if self.metrics is not None:
            self.metrics.heartbeat()
        return alive


class WorkerLost(Exception):
    """Recorded as the error of an attempt whose worker stopped heartbeating."""


class Rescuer:
    """Return the actions of lost workers to pending (a failed attempt), or fail them."""

    def __init__(self, engine: Engine, lease: timedelta, processors: dict[str, Processor],
                 on_written: Written) -> None:
        self._engine = engine
        self._lease = lease
        self._processors = processors
        self._on_written = on_written
        # Often enough that a lost action returns within about 1.1 leases of its loss.
        self.interval = max(min(lease.total_seconds() / 10, 1.0), 0.1)

    def run_for_this_host(self) -> int:
        """A rescue only if a worker on this host has exited (a restart after a crash,
        leader or not); otherwise nothing: the leader's runs bring back the rest."""
        hostname = socket.gethostname()
        with self._engine.connect() as conn:
            gone = dead_local_workers(queries.workers_on(conn, hostname), hostname)
        return self.run_once() if gone else 0

    def run_once(self) -> int:
        hostname = socket.gethostname()
        with self._engine.begin() as conn:
            dead = dead_local_workers(queries.workers_on(conn, hostname), hostname)
            if dead:
                log.warning("workers %s on this host have exited; recovering their actions "
                            "now", ", ".join(dead))
                queries.forget_workers(conn, dead)
            outcomes = []
            for action in queries.lost_actions(conn, self._lease):
                holder = action.claimed_by or "unknown worker"
                error = WorkerLost(f"worker {holder} was lost while running attempt "
                                   f"{action.attempts} (its lease expired or its process "
                                   "exited)")
                processor = self._processors.get(action.processor)
                outcomes.append(failed_attempt(
                    action, error, worker=holder,
                    settings=processor.settings if processor else DEFAULTS,
                    with_traceback=False))
            applied = queries.record(conn, outcomes) if outcomes else set()
        for outcome in outcomes:
            log.warning("recovered %s (%s) from lost worker %s: now %s",
                        outcome.action.display_id, outcome.action.processor,
                        outcome.action.claimed_by, outcome.status)
        if outcomes:
            self._on_written(outcomes, applied)
        return len(applied)


class Pruner:
    """Delete finished actions past their retention, in small batches."""

    def __init__(self, engine: Engine, retention: dict[str, timedelta]) -> None:
        self._engine = engine
        self._retention = retention
        # Often enough that the shortest retention is kept to within a tenth.
        shortest = min(retention.values(), default=timedelta(hours=1)).total_seconds()
        self.interval = min(max(shortest / 10, 1.0), 300.0)

    def run_once(self) -> int:
        deleted = sum(admin.purge(self._engine, age, [status], batch_size=500)
                      for status, age in self._retention.items())
        if deleted:
            log.info("pruned %d finished actions past their retention", deleted)
        return deleted


class StartsTrimmer:
    """Drop the logged starts of rate-limited processors that no window counts any more
    (claims only add to the log, so that a capped claim stays one statement)."""

    interval = 60.0

    def __init__(self, engine: Engine, lease: timedelta | None = None) -> None:
        self._engine = engine
        self._lease = lease

    def run_once(self) -> int:
        with self._engine.begin() as conn:
            if self._lease is not None:  # a trimmer cut off holds up the next one no longer
                queries.ends_if_abandoned(conn, self._lease)
            return queries.trim_starts(conn)


# How old an open transaction must be before the leader says it holds back vacuum.
LONG_TRANSACTION = timedelta(minutes=1)


class HorizonWatch:
    """Name a transaction that has been open for long (PostgreSQL). While it is, vacuum
    reclaims no row that died since, and every claim walks the index entries of all the
    actions claimed since, which cannot be cleaned up: claims slow down as actions
    flow (the chaos suite's long_transaction: 0.9 to 12.6 ms in 2 minutes). Nothing in
    the queue can prevent that; saying which session does it, once per transaction, is
    what an operator needs to end it."""

    interval = 30.0

    def __init__(self, engine: Engine, older_than: timedelta = LONG_TRANSACTION) -> None:
        self._engine = engine
        self._older_than = older_than
        self._told: set[tuple[int, datetime]] = set()  # transactions already named

    def run_once(self) -> list[queries.HorizonHolder]:
        with self._engine.begin() as conn:
            holders = queries.horizon_holders(conn, self._older_than)
        for h in holders:
            if (h.pid, h.xact_start) not in self._told:
                log.warning("the transaction of backend pid %d (%s for %.0fs, user %s, "
                            "application %r) holds back vacuum: async_action's dead rows "
                            "stay and claims slow down as actions flow; end it, or set "
                            "idle_in_transaction_session_timeout", h.pid, h.state or "active",
                            h.age_s, h.user, h.application or "")
        self._told = {(h.pid, h.xact_start) for h in holders}  # forget ended ones
        return holders


class ScheduleFirer:
    """Enqueue each schedule's fire times. Each schedule's next fire time is known here,
    so between fire times this touches no table."""

    interval = 1.0

    def __init__(self, engine: Engine, schedules: Iterable[Schedule], *,
                 max_data_bytes: int, lease: timedelta | None = None) -> None:
        self._engine = engine
        self._max_data_bytes = max_data_bytes
        self._lease = lease
        # Due at once on start: catch up on a fire time missed while down.
        self._schedules = list(schedules)
        self._due = {s.name: datetime.min.replace(tzinfo=UTC) for s in self._schedules}

    def run_once(self, now: datetime | None = None) -> int:
        now = now or datetime.now(UTC)
        fired = 0
        for schedule in self._schedules:
            if self._due[schedule.name] <= now:
                fired += fire_due(self._engine, schedule, now,
                                  max_data_bytes=self._max_data_bytes, lease=self._lease)
                self._due[schedule.name] = schedule.next_fire_after(now)
        return fired


class Waker:
    """Wake listening workers for actions whose delay or retry interval ran out."""

    def __init__(self, engine: Engine, poll_interval: timedelta) -> None:
        self._engine = engine
        self.interval = max(poll_interval.total_seconds(), 0.05)

    def run_once(self) -> int:
        # Looking twice as far back as the interval: a late run misses nothing, and a
        # second wake-up for the same action costs an empty claim at most.
        with self._engine.begin() as conn:
            return queries.wake_eligible(conn, timedelta(seconds=2 * self.interval))


class BacklogSampler:
    """Pending counts and ages for the metrics: one grouped query every few seconds."""

    interval = 10.0

    def __init__(self, engine: Engine, metrics: Metrics,
                 processors: dict[str, Processor]) -> None:
        self._engine = engine
        self._metrics = metrics
        self._processors = processors

    def run_once(self) -> None:
        with self._engine.connect() as conn:
            rows = queries.backlog(conn)
        self._metrics.backlog(rows, self._processors)


# A service's first run comes no later than this after the worker starts.
FIRST_RUN_WITHIN = 1.0


class Maintenance:
    """Runs the services: `everywhere` on this worker, `leading` only while it leads."""

    def __init__(self, leadership: Leadership, everywhere: Sequence[Service],
                 leading: Sequence[Service]) -> None:
        self._leadership = leadership
        self._scheduler = BackgroundScheduler(daemon=True)
        for service, leader_only in [*((s, False) for s in everywhere),
                                     *((s, True) for s in leading)]:
            # The worker registered (learning who leads, as a beat does) and rescued for
            # its host as it started, so those first run an interval away; the others
            # within a second, after the claim loop's first claims (run at once, they
            # held a starting worker's first claim back by a third, 100 -> 67 ms).
            # (None would add the job paused.)
            first = {} if isinstance(service, Heartbeat | Rescuer) else {
                "next_run_time": datetime.now(UTC) + timedelta(seconds=min(service.interval,
                                                                           FIRST_RUN_WITHIN))}
            self._scheduler.add_job(self._tick, "interval", args=[service, leader_only],
                                    seconds=service.interval, id=type(service).__name__,
                                    max_instances=1, coalesce=True, **first)

    def _tick(self, service: Service, leader_only: bool) -> None:
        if leader_only and not self._leadership.leading:
            return
        try:
            service.run_once()
        except Exception as exc:
            log.warning("%s failed: %s", type(service).__name__, first_line(exc))

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.shutdown(wait=True)


# --- lost workers on this host ---------------------------------------------------------

def pid_namespace() -> str:
    """Identifies this process's pid namespace (a host, or a container on it)."""
    try:
        return format(os.stat("/proc/self/ns/pid").st_ino, "x")
    except OSError:
        return "0"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed child its parent has not reaped yet is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def dead_local_workers(workers: list[tuple[str, str, int]], hostname: str) -> list[str]:
    """Registered workers that ran on this host, in this pid namespace, whose process no
    longer exists: no need to wait for their leases."""
    mine = pid_namespace()
    dead = []
    for worker_id, host, pid in workers:
        parts = worker_id.split(":")
        namespace = parts[-1].split("-")[0] if len(parts) >= 3 else None
        if host == hostname and namespace == mine and pid != os.getpid() and \
                _process_gone(pid):
            dead.append(worker_id)
    return dead


# --- schedules -------------------------------------------------------------------------

def _claim_fire(conn: Connection, name: str, fire: datetime) -> bool:
    """Move the schedule's last_fire_at forward to `fire`; true for the one worker that did."""
    s = async_action_schedule
    stmt = upsert(conn.dialect.name, s).values(name=name, last_fire_at=fire)
    stmt = stmt.on_conflict_do_update(
        index_elements=[s.c.name], set_={"last_fire_at": fire},
        where=s.c.last_fire_at < stmt.excluded.last_fire_at).returning(s.c.name)
    return conn.execute(stmt).first() is not None


def last_fire(conn: Connection, name: str) -> datetime | None:
    s = async_action_schedule
    return conn.execute(select(s.c.last_fire_at).where(s.c.name == name)).scalar()


def fire_due(engine: Engine, schedule: Schedule, now: datetime | None = None, *,
             max_data_bytes: int | None = None, lease: timedelta | None = None) -> int:
    """Enqueue the schedule's due fire times unless another worker already did; how many.

    Fire times are enqueued only by the worker whose update moves the schedule's
    last_fire_at forward to the newest of them, in the same transaction, and each one's
    unique key is its fire time: never twice, whatever the number of workers or leaders.
    Fire times missed while no leader ran (a failover) are caught up, the newest
    MAX_CATCH_UP at most. A schedule seen for the first time starts from now: it does
    not fire for the past.

    With a `lease` (a worker's leader), a firer cut off before its COMMIT holds the
    schedule's row from the next leader for a lease at most (see ends_if_abandoned)."""
    now = now or datetime.now(UTC)
    with engine.begin() as conn:
        if lease is not None:
            queries.ends_if_abandoned(conn, lease)
        last = last_fire(conn, schedule.name)
        if last is None:
            _claim_fire(conn, schedule.name, now)
            return 0
        fires = schedule.due_fires(last, now)
        if not fires or not _claim_fire(conn, schedule.name, fires[-1]):
            return 0
        options = {} if max_data_bytes is None else {"max_data_bytes": max_data_bytes}
        actions = [init_action(conn, schedule.processor, schedule.data,
                               unique_key=f"schedule:{schedule.name}:{fire.isoformat()}",
                               **options) for fire in fires]
    log.info("schedule %s: enqueued %s for %s", schedule.name,
             ", ".join(a.display_id for a in actions), ", ".join(f.isoformat() for f in fires))
    return len(actions)
