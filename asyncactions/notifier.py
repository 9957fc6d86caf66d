"""Wake the worker when actions are enqueued (PostgreSQL LISTEN/NOTIFY).

Polling remains the fallback: a notification can be missed while reconnecting, so
the worker also claims every poll_interval whatever happens here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection

import psycopg
from sqlalchemy import Engine

from .enqueue import NOTIFY_CHANNEL

log = logging.getLogger("asyncactions.notifier")


class Notifier:
    def __init__(self, engine: Engine, processors: Collection[str],
                 wake: Callable[[], None]) -> None:
        url = engine.url.set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._processors = frozenset(processors)
        self._wake = wake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="asyncactions-notifier",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    delay = 0.1
                    self._wake()  # anything enqueued while we were not listening
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.payload in self._processors:
                                self._wake()
            except psycopg.Error as exc:
                if self._stop.is_set():
                    return
                log.warning("listening for notifications failed (%s); reconnecting in %.1fs",
                            str(exc).strip().splitlines()[0] if str(exc).strip() else exc,
                            delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
