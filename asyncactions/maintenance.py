"""Background upkeep inside every worker, on APScheduler: heartbeats and lease recovery.

Safe with any number of workers: recovery locks rows with SKIP LOCKED and writes
through the same fenced statement as normal outcomes, so two workers never recover
one action twice and a late original result never overwrites the recovery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from . import queries
from .database import first_line
from .outcomes import failed_attempt
from .processors import Processor, ProcessorSettings

log = logging.getLogger("asyncactions.maintenance")


class WorkerLost(Exception):
    """Recorded as the error of an attempt whose worker stopped heartbeating."""


class Maintenance:
    def __init__(self, engine: Engine, worker_id: str, lease: timedelta,
                 processors: dict[str, Processor], on_reregister: Callable[[], None]) -> None:
        self._engine = engine
        self._worker = worker_id
        self._lease = lease
        self._processors = processors
        self._on_reregister = on_reregister
        self._scheduler = BackgroundScheduler(daemon=True)
        # Beat several times per lease so a missed beat or two never costs a lease.
        every = max(lease.total_seconds() / 6, 0.2)
        for job in (self.heartbeat, self.recover_lost):
            self._scheduler.add_job(job, "interval", seconds=every, id=job.__name__,
                                    max_instances=1, coalesce=True)

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.shutdown(wait=True)

    def heartbeat(self) -> None:
        try:
            with self._engine.begin() as conn:
                alive = queries.heartbeat(conn, self._worker, self._lease)
        except sa_exc.DBAPIError as exc:
            log.warning("heartbeat failed: %s", first_line(exc))
            return
        if not alive:
            log.warning("this worker was declared dead (no heartbeat for a lease); "
                        "registering again")
            self._on_reregister()

    def recover_lost(self) -> int:
        """Return actions of lost workers to pending (a failed attempt), or fail them."""
        try:
            with self._engine.begin() as conn:
                lost = queries.lost_actions(conn, self._lease)
                outcomes = []
                for action in lost:
                    holder = action.claimed_by or "unknown worker"
                    error = WorkerLost(f"worker {holder} was lost while running attempt "
                                       f"{action.attempts} (lease expired)")
                    processor = self._processors.get(action.processor)
                    settings = processor.settings if processor else ProcessorSettings()
                    outcomes.append(failed_attempt(action, error, worker=holder,
                                                   settings=settings, tb=None))
                if outcomes:
                    queries.record(conn, outcomes)
        except sa_exc.DBAPIError as exc:
            log.warning("lease recovery failed: %s", first_line(exc))
            return 0
        for outcome in outcomes:
            log.warning("recovered %s (%s) from lost worker %s: now %s",
                        outcome.action.display_id, outcome.action.processor,
                        outcome.action.claimed_by, outcome.status)
        return len(outcomes)
