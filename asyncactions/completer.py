"""Completing: write outcomes in batches, one fenced statement for everything that
finished in the last few milliseconds, instead of a transaction per action.

An outcome is never silently dropped. While the database is away, the batch is kept
and written again once it is back. When the database refuses a batch for what is in
it (a value out of range, say), the outcomes are written one by one, so only the bad
one is affected: it is failed with why instead. An outcome that cannot be written at
all is given up on, logged, and its lease brings the action back.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

from sqlalchemy import Connection, Engine
from sqlalchemy import exc as sa_exc

from . import queries
from .database import KeptConnection, first_line, is_disconnect
from .outcomes import Outcome, unstorable

log = logging.getLogger("asyncactions.completer")

MAX_BATCH = 1000

# The outcome write's session, where it is the worker's own (the claim connection proved
# no pooler in transaction mode shares it): its statement is planned once, like the
# claim. Left to choose, PostgreSQL planned it anew for every batch (~0.45 ms of a
# 190-outcome batch's 5.9 ms); the one generic plan is the same walk of the lease index.
OUTCOME_SESSION = ("SET plan_cache_mode = force_generic_plan",)

# (outcomes as written, ids the fence let through); also told of outcomes given up on.
Written = Callable[[list[Outcome], set[int]], None]


class Completer:
    def __init__(self, engine: Engine, on_written: Written, *,
                 own_session: Callable[[], bool] = lambda: False) -> None:
        self._engine = engine
        self._on_written = on_written
        self._own_session = own_session  # whether a new connection is a session of its own
        self._queue: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="asyncactions-completer",
                                        daemon=True)
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def add(self, outcomes: Sequence[Outcome]) -> None:
        for outcome in outcomes:
            self._queue.put(outcome)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Flush what is queued, then stop (giving up after `timeout`)."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stopping.set()
            self._thread.join(1.0)

    def connection(self) -> KeptConnection:
        """The connection outcomes are written on (kept for the completer's life)."""
        return KeptConnection(self._engine, single_statements=True, on_connect=self._session)

    def _session(self, conn: Connection) -> None:
        if self._own_session():
            for statement in OUTCOME_SESSION:
                conn.exec_driver_sql(statement)

    def _loop(self) -> None:
        conn = self.connection()
        stopping = False
        while not stopping:
            # Whatever finished while the last batch was being written goes in this one:
            # batches grow with the load, and an idle worker writes an outcome at once.
            item = self._queue.get()
            batch = [item] if item is not None else []
            stopping = item is None
            while not stopping and len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
            if batch:
                try:
                    self.write(conn, batch)
                except BaseException:  # never lose the thread: log, tell, go on
                    log.exception("writing %d outcomes failed unexpectedly", len(batch))
                    self._told(batch, set())
        conn.close()

    def write(self, conn: KeptConnection, batch: list[Outcome]) -> None:
        """Write one batch (retrying while the database is away), then tell."""
        try:
            applied = self._retrying(conn, batch)
        except sa_exc.DBAPIError as exc:
            if is_disconnect(exc):  # only while stopping: the leases will bring them back
                self._told(batch, set())
                return
            log.warning("the database refused a batch of %d outcomes (%s); writing them one "
                        "by one", len(batch), first_line(exc))
            self._one_by_one(conn, batch)
            return
        self._told(batch, applied)

    def _one_by_one(self, conn: KeptConnection, batch: list[Outcome]) -> None:
        for outcome in batch:
            try:
                self._told([outcome], self._retrying(conn, [outcome]))
                continue
            except sa_exc.DBAPIError as exc:
                if is_disconnect(exc):
                    self._told([outcome], set())
                    continue
                instead = unstorable(outcome, exc)
                log.error("%s: the database refused its outcome (%s); failing it instead",
                          outcome.action.display_id, first_line(exc))
            try:
                self._told([instead], self._retrying(conn, [instead]))
            except sa_exc.DBAPIError as exc:
                log.error("%s: could not record even its failure (%s); its lease will bring "
                          "it back", outcome.action.display_id, first_line(exc))
                self._told([outcome], set())

    def _retrying(self, conn: KeptConnection, batch: list[Outcome]) -> set[int]:
        """Write the batch; while the connection is lost, wait and try again (until
        stopping). Other database errors are raised."""
        delay = 0.1
        while True:
            try:
                with conn.begin() as connection:
                    return queries.record(connection, batch)
            except sa_exc.DBAPIError as exc:
                if not is_disconnect(exc) or self._stopping.is_set():
                    if self._stopping.is_set():
                        log.error("could not write %d outcomes before stopping: %s; their "
                                  "leases will expire and they will run again", len(batch),
                                  first_line(exc))
                    raise
                log.warning("writing %d outcomes failed (%s); retrying in %.1fs", len(batch),
                            first_line(exc), delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)

    def _told(self, written: list[Outcome], applied: set[int]) -> None:
        try:
            self._on_written(written, applied)
        except BaseException:
            log.exception("handling %d written outcomes failed", len(written))
