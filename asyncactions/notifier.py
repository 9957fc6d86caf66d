"""Wake the claim loop: when outcomes free capacity, on stop, and on PostgreSQL when
actions are enqueued (LISTEN/NOTIFY).

The claim loop's own connection listens, and the loop sleeps on its socket: a
notification wakes the very thread that claims, on a connection whose backend has
just run, with no thread or connection of its own in between (a notifier thread
cost ~0.15 ms at the median and up to 0.6 ms at the tail before each claim).

Polling remains the fallback: a notification sent while the connection is being
re-established is lost, so the loop also claims every poll_interval, and claims at
once after connecting (the claim then sees everything committed before LISTEN).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Collection
from typing import Any

import psycopg

log = logging.getLogger("asyncactions.notifier")

# Enqueues (and the leader, for actions that became eligible) notify this channel with
# the processor's name; the claim connection listens to it.
NOTIFY_CHANNEL = "asyncactions"
# Outcome writes notify this one (once per batch), for wait_for().
OUTCOME_CHANNEL = "asyncactions_outcome"
# Run once on each new claim connection.
LISTEN = f"LISTEN {NOTIFY_CHANNEL}"


def session_is_kept(listening: psycopg.Connection[Any], send: Callable[[str, str], None],
                    timeout: float = 5.0) -> bool:
    """Whether a connection that ran LISTEN is a session of its own: `send` notifies it
    from another connection, and the notification must arrive. Through a pooler in
    transaction mode (PgBouncer) the LISTEN stays on a server connection that is not ours
    the next time, and the notification never comes; session settings would not stay
    either. Other notifications read meanwhile are dropped: the claim loop claims at
    once after connecting. The timeout is generous: a loaded server's late notification
    read as a pooler would leave the worker polling for the rest of its life."""
    probe = f"probe:{os.getpid()}:{os.urandom(6).hex()}"
    send(NOTIFY_CHANNEL, probe)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for note in listening.notifies(timeout=left, stop_after=1):
            if note.payload == probe:
                return True
    return False


class Wakeup:
    """What the claim loop sleeps on between claims: set() from any thread, or a
    notification for one of the worker's processors on the listening connection."""

    def __init__(self, processors: Collection[str]) -> None:
        self._processors = frozenset(processors)
        self._event = threading.Event()
        # A byte in the pipe interrupts a select() already under way.
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        weakref.finalize(self, _close, self._read, self._write)

    def set(self) -> None:
        if not self._event.is_set():
            self._event.set()
            with contextlib.suppress(BlockingIOError):  # full of wake-ups already
                os.write(self._write, b"\0")

    def clear(self) -> None:
        self._event.clear()
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass

    def wait(self, timeout: float, listening: Any = None) -> None:
        """Sleep until set(), a notification for our processors on `listening` (a psycopg
        connection that ran LISTEN), or the timeout."""
        if listening is None:
            self._event.wait(timeout)
            return
        deadline = time.monotonic() + timeout
        try:
            # Notifications that arrived during the last claim are already read: look
            # there first, or they would wait for the next poll.
            if self._ours(listening) or self._event.is_set():
                return
            remaining = timeout
            while remaining > 0:
                ready, _, _ = select.select([self._read, listening.pgconn.socket], [], [],
                                            remaining)
                if self._read in ready or self._ours(listening) or self._event.is_set():
                    return
                remaining = deadline - time.monotonic()
        except (psycopg.Error, OSError) as exc:
            # The connection is gone: claim now, which reconnects (and listens again).
            log.debug("listening for notifications failed (%s)", exc)

    def _ours(self, listening: psycopg.Connection[Any]) -> bool:
        """Whether any notification read so far is for one of our processors (reading
        them all: what is left unread would pile up)."""
        payloads = {n.payload for n in listening.notifies(timeout=0)}
        return not payloads.isdisjoint(self._processors)


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)
