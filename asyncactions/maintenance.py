"""Background upkeep inside every worker, on APScheduler: heartbeats and lease recovery.

Safe with any number of workers: recovery locks rows with SKIP LOCKED and writes
through the same fenced statement as normal outcomes, so two workers never recover
one action twice and a late original result never overwrites the recovery.
"""

from __future__ import annotations

import logging
import os
import socket
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from . import admin, queries
from .database import first_line
from .enqueue import init_action
from .metrics import Metrics
from .outcomes import Outcome, failed_attempt
from .processors import Processor, ProcessorSettings
from .schedules import Schedule
from .schema import async_action_schedule

log = logging.getLogger("asyncactions.maintenance")


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


class WorkerLost(Exception):
    """Recorded as the error of an attempt whose worker stopped heartbeating."""


class Maintenance:
    def __init__(self, engine: Engine, worker_id: str, lease: timedelta,
                 processors: dict[str, Processor], held: Callable[[], list[int]],
                 on_reregister: Callable[[], None],
                 on_recorded: Callable[[list[Outcome], set[int]], None],
                 metrics: Metrics | None = None, schedules: Iterable[Schedule] = (),
                 retention: dict[str, timedelta | None] | None = None) -> None:
        self._engine = engine
        self._worker = worker_id
        self._lease = lease
        self._processors = processors
        self._held = held
        self._on_reregister = on_reregister
        self._on_recorded = on_recorded
        self._metrics = metrics
        self._scheduler = BackgroundScheduler(daemon=True)
        # Beat several times per lease so a missed beat or two never costs a lease; look
        # for lost actions often enough that one returns within 1.1 leases of its loss.
        lease_s = lease.total_seconds()
        # (at least every second: the lost action's lease may be shorter than ours).
        for job, every in ((self.heartbeat, lease_s / 6),
                           (self.recover_lost, min(lease_s / 10, 1.0))):
            self._scheduler.add_job(job, "interval", seconds=max(every, 0.1),
                                    id=job.__name__, max_instances=1, coalesce=True)
        self._retention = {k: v for k, v in (retention or {}).items() if v is not None}
        if self._retention:
            # Often enough that the shortest retention is kept to within a tenth.
            shortest = min(self._retention.values()).total_seconds()
            self._scheduler.add_job(self.prune, "interval",
                                    seconds=min(max(shortest / 10, 1.0), 300.0), id="prune",
                                    max_instances=1, coalesce=True,
                                    next_run_time=datetime.now(UTC))
        for schedule in schedules:
            # Each fire time, and once now to catch up on a fire missed while down.
            self._scheduler.add_job(self.fire, schedule.trigger(), args=[schedule],
                                    id=f"schedule:{schedule.name}", max_instances=1,
                                    coalesce=True, misfire_grace_time=None)
            self._scheduler.add_job(self.fire, args=[schedule], max_instances=1,
                                    next_run_time=datetime.now(UTC))
        if metrics is not None:
            self._scheduler.add_job(self.sample_backlog, "interval", seconds=10,
                                    id="sample_backlog", max_instances=1, coalesce=True,
                                    next_run_time=datetime.now(UTC))

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.shutdown(wait=True)

    def heartbeat(self) -> None:
        try:
            with self._engine.begin() as conn:
                alive = queries.heartbeat(conn, self._worker, self._lease, self._held())
        except sa_exc.DBAPIError as exc:
            log.warning("heartbeat failed: %s", first_line(exc))
            return
        if self._metrics is not None:
            self._metrics.heartbeat()
        if not alive:
            log.warning("this worker was declared dead (no heartbeat for a lease); "
                        "registering again")
            self._on_reregister()

    def recover_lost(self) -> int:
        """Return actions of lost workers to pending (a failed attempt), or fail them."""
        try:
            with self._engine.begin() as conn:
                dead = dead_local_workers(queries.workers_on(conn, socket.gethostname()),
                                          socket.gethostname())
                if dead:
                    log.warning("workers %s on this host have exited; recovering their "
                                "actions now", ", ".join(dead))
                    queries.forget_workers(conn, dead)
                lost = queries.lost_actions(conn, self._lease)
                outcomes = []
                for action in lost:
                    holder = action.claimed_by or "unknown worker"
                    error = WorkerLost(f"worker {holder} was lost while running attempt "
                                       f"{action.attempts} (its lease expired or its process "
                                       "exited)")
                    processor = self._processors.get(action.processor)
                    settings = processor.settings if processor else ProcessorSettings()
                    outcomes.append(failed_attempt(action, error, worker=holder,
                                                   settings=settings, tb=None))
                applied = queries.record(conn, outcomes) if outcomes else set()
        except sa_exc.DBAPIError as exc:
            log.warning("lease recovery failed: %s", first_line(exc))
            return 0
        self._on_recorded(outcomes, applied)
        for outcome in outcomes:
            log.warning("recovered %s (%s) from lost worker %s: now %s",
                        outcome.action.display_id, outcome.action.processor,
                        outcome.action.claimed_by, outcome.status)
        return len(outcomes)

    def sample_backlog(self) -> None:
        """Pending counts and ages for the metrics: one grouped query every few seconds."""
        try:
            with self._engine.connect() as conn:
                rows = queries.backlog(conn)
        except sa_exc.DBAPIError as exc:
            log.warning("sampling the backlog failed: %s", first_line(exc))
            return
        if self._metrics is not None:
            self._metrics.backlog(rows, self._processors)

    def fire(self, schedule: Schedule) -> None:
        try:
            fire_due(self._engine, schedule)
        except sa_exc.DBAPIError as exc:
            log.warning("schedule %s could not fire: %s", schedule.name, first_line(exc))

    def prune(self) -> int:
        """Delete finished actions past their retention, in small batches, by one worker
        of the cluster at a time."""
        deleted = 0
        try:
            with self._engine.connect() as conn, leader(conn, "prune") as leading:
                if not leading:
                    return 0
                for status, age in self._retention.items():
                    deleted += admin.purge(self._engine, age, [status], batch_size=500)
        except sa_exc.DBAPIError as exc:
            log.warning("pruning finished actions failed: %s", first_line(exc))
        if deleted:
            log.info("pruned %d finished actions past their retention", deleted)
        return deleted


@contextmanager
def leader(conn: Connection, job: str) -> Iterator[bool]:
    """Hold a cluster-wide lock for `job` while inside; yields whether we got it.

    A PostgreSQL session advisory lock; SQLite serializes writers anyway (one host)."""
    if conn.dialect.name != "postgresql":
        yield True
        return
    key = zlib.crc32(f"asyncactions:{job}".encode())
    got = conn.execute(select(func.pg_try_advisory_lock(key))).scalar()
    conn.commit()
    try:
        yield bool(got)
    finally:
        if got:
            conn.execute(select(func.pg_advisory_unlock(key)))
            conn.commit()


def _claim_fire(conn: Connection, name: str, fire: datetime) -> bool:
    """Move the schedule's last_fire_at forward to `fire`; true for the one worker that did."""
    s = async_action_schedule
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = insert(s).values(name=name, last_fire_at=fire)
    stmt = stmt.on_conflict_do_update(
        index_elements=[s.c.name], set_={"last_fire_at": fire},
        where=s.c.last_fire_at < stmt.excluded.last_fire_at).returning(s.c.name)
    return conn.execute(stmt).first() is not None


def last_fire(conn: Connection, name: str) -> datetime | None:
    s = async_action_schedule
    return conn.execute(select(s.c.last_fire_at).where(s.c.name == name)).scalar()


def fire_due(engine: Engine, schedule: Schedule, now: datetime | None = None) -> bool:
    """Enqueue the schedule's latest due fire time unless another worker already did.

    A schedule seen for the first time starts from now: it does not fire for the past."""
    now = now or datetime.now(UTC)
    with engine.begin() as conn:
        last = last_fire(conn, schedule.name)
        if last is None:
            _claim_fire(conn, schedule.name, now)
            return False
        fire = schedule.latest_fire(last, now)
        if fire is None or not _claim_fire(conn, schedule.name, fire):
            return False
        action = init_action(conn, schedule.processor, schedule.data,
                             unique_key=f"schedule:{schedule.name}:{fire.isoformat()}")
    log.info("schedule %s: enqueued %s for %s", schedule.name, action.display_id,
             fire.isoformat())
    return True
