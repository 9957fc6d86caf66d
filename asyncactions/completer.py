"""Write outcomes in batches: one fenced statement for everything that finished in
the last few milliseconds, instead of a transaction per action.

An outcome is never dropped: if the database is away, the batch is kept and written
again once it is back (or the lease runs out and the action runs again).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from . import queries
from .database import KeptConnection, first_line
from .outcomes import Outcome

log = logging.getLogger("asyncactions.completer")

MAX_BATCH = 1000


class Completer:
    def __init__(self, engine: Engine,
                 on_written: Callable[[list[Outcome], set[int]], None]) -> None:
        self._engine = engine
        self._on_written = on_written
        self._queue: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="asyncactions-completer",
                                        daemon=True)
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def add(self, outcome: Outcome) -> None:
        self._queue.put(outcome)

    def stop(self, timeout: float | None = None) -> None:
        """Flush what is queued, then stop (giving up after `timeout`)."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stopping.set()
            self._thread.join(1.0)

    def _loop(self) -> None:
        conn = KeptConnection(self._engine, single_statements=True)
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
                self._write(conn, batch)
        conn.close()

    def _write(self, conn: KeptConnection, batch: list[Outcome]) -> None:
        delay = 0.1
        applied: set[int] = set()
        while True:
            try:
                with conn.begin() as connection:
                    applied = queries.record(connection, batch)
                break
            except sa_exc.DBAPIError as exc:
                if self._stopping.is_set():
                    log.error("could not write %d outcomes before stopping: %s; their leases "
                              "will expire and they will run again", len(batch), first_line(exc))
                    break
                log.warning("writing %d outcomes failed (%s); retrying in %.1fs", len(batch),
                            first_line(exc), delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
        self._on_written(batch, applied)
