"""Live attempts (SPEC §3): what a running processor can ask about its own attempt.

`current_attempt()` inside a processor returns the attempt: its action, whether an
operator canceled it meanwhile (`cancel_requested`, learnt by every worker's
CancelWatch within about a second), and `progress()` to report how far it got.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, bindparam, select, update

from . import codec
from .action import Action, Status
from .errors import AsyncActionsError
from .schema import as_payload, async_action

log = logging.getLogger("asyncactions.live")

MAX_MESSAGE = 1000  # characters of a progress message kept


class LiveAttempt:
    """The running attempt of one action (or of a batch of one processor's actions)."""

    # One lock for every attempt: a cancel is rare, and an attempt's own lock and Event
    # cost more than a no-op processor's whole call.
    _lock = threading.Lock()
    __slots__ = ("_canceled", "_engine", "_on_cancel", "actions")

    def __init__(self, actions: list[Action], engine: Engine) -> None:
        self.actions = actions
        self._engine = engine
        self._canceled = False
        self._on_cancel: list[Callable[[], None]] | None = None

    @property
    def engine(self) -> Engine:
        """The worker's engine (the built-in fan-out writes its batches with it)."""
        return self._engine

    @property
    def action(self) -> Action:
        """The action being run (a batch processor's first; all are in `actions`)."""
        return self.actions[0]

    @property
    def cancel_requested(self) -> bool:
        """True once this attempt's action was canceled (or its claim was lost): its
        outcome will not be recorded, so a cooperative processor stops early."""
        return self._canceled

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from another thread) once a cancel is seen: the hook an
        asyncio runner uses to cancel the attempt's task. At once if already canceled."""
        with self._lock:
            if not self._canceled:
                self._on_cancel = [*(self._on_cancel or ()), callback]
                return
        callback()

    def request_cancel(self) -> None:
        with self._lock:
            if self._canceled:
                return
            self._canceled = True
            callbacks, self._on_cancel = self._on_cancel or [], None
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a cancel callback of %s failed", self.action.display_id)

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Record how far the attempt got, for operators (`show`, JSON, dashboard):
        `progress` becomes {"fraction", "message", "at"}. One small write per call."""
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or \
                math.isnan(fraction) or not 0 <= fraction <= 1:
            raise AsyncActionsError(f"progress(): fraction must be a number from 0 to 1 "
                                    f"(0.4 for 40%), got {fraction!r}")
        if message is not None and not isinstance(message, str):
            raise AsyncActionsError(f"progress(): message must be a str or None, not "
                                    f"{type(message).__name__}")
        value = {"fraction": float(fraction),
                 "message": None if message is None else message[:MAX_MESSAGE],
                 "at": datetime.now(UTC).isoformat(timespec="milliseconds")}
        text = codec.dumps(value, what="progress message")
        with self._engine.begin() as conn:
            conn.execute(RECORD_PROGRESS, [{"p_id": a.id, "p_attempts": a.attempts,
                                            "p_worker": a.claimed_by, "progress": text}
                                           for a in self.actions])


t = async_action
# Fenced like an outcome: a late report never touches a newer attempt or a cancel.
RECORD_PROGRESS = (
    update(t)
    .where(t.c.id == bindparam("p_id"), t.c.attempts == bindparam("p_attempts"),
           t.c.claimed_by == bindparam("p_worker"), t.c.status == Status.RUNNING.value)
    .values(progress=as_payload(bindparam("progress")))
)

_current: ContextVar[LiveAttempt | None] = ContextVar("asyncactions_attempt", default=None)


def current_attempt() -> LiveAttempt:
    """The attempt running in this processor call (thread or task)."""
    attempt = _current.get()
    if attempt is None:
        raise AsyncActionsError("current_attempt() is only available inside a processor "
                                "while a worker runs it")
    return attempt


class LiveAttempts:
    """The attempts running in this worker, for the cancel watch. No lock: a set's add,
    discard and copy are each atomic in CPython, and two locks per attempt were a fifth
    of a no-op attempt's bookkeeping."""

    def __init__(self) -> None:
        self._running: set[LiveAttempt] = set()

    def begin(self, attempt: LiveAttempt) -> Token[LiveAttempt | None]:
        """From here on (until end), current_attempt() returns `attempt` in this thread or
        task, and the cancel watch sees it. Not a context manager: on a no-op processor's
        path its generator would cost more than the rest of the bookkeeping."""
        self._running.add(attempt)
        return _current.set(attempt)

    def end(self, attempt: LiveAttempt, token: Token[LiveAttempt | None]) -> None:
        self.retire(attempt)
        _current.reset(token)

    def retire(self, attempt: LiveAttempt) -> None:
        """The cancel watch no longer looks at `attempt`: its outcome is about to land
        (a transactional attempt's, committed with its writes, before end)."""
        self._running.discard(attempt)

    def snapshot(self) -> list[LiveAttempt]:
        return [a for a in self._running.copy() if not a.cancel_requested]


# The running attempts' rows, to tell which were canceled (or lost) meanwhile.
HOLDERS = select(t.c.id, t.c.status, t.c.claimed_by, t.c.attempts).where(
    t.c.id.in_(bindparam("ids", expanding=True)))


class CancelWatch:
    """Every worker, twice a second while it runs attempts: one look-up by primary key
    tells which of them were canceled (on any worker's or operator's side)."""

    interval = 0.5

    def __init__(self, engine: Engine, live: LiveAttempts) -> None:
        self._engine = engine
        self._live = live

    def run_once(self) -> int:
        attempts = self._live.snapshot()
        if not attempts:
            return 0
        with self._engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(
                HOLDERS, {"ids": sorted({a.id for at in attempts for a in at.actions})})}
        # An attempt that ended while the rows were read may have written its own
        # outcome: no row of it says running any more, and that is no cancel.
        still = set(self._live.snapshot())
        canceled = 0
        for attempt in attempts:
            if attempt in still and any(_gone(rows.get(a.id), a) for a in attempt.actions):
                log.info("%s was canceled while running; telling its processor",
                         attempt.action.display_id)
                attempt.request_cancel()
                canceled += 1
        return canceled


def _gone(row: Any, action: Action) -> bool:
    """Whether this attempt no longer holds its action (canceled, lost, deleted)."""
    return row is None or row.status != Status.RUNNING.value or \
        row.claimed_by != action.claimed_by or row.attempts != action.attempts



