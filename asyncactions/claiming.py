"""Claiming: how much the worker may take on, and the loop that claims it.

Capacity is read from what is held, never counted by hand: the actions claimed and
not yet written (`InFlight`), and the runner's waiting and running attempts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from . import queries
from .action import Action
from .database import KeptConnection, first_line
from .errors import AsyncActionsError
from .executor import Attempt, Executor
from .metrics import Metrics
from .notifier import LISTEN, Wakeup
from .outcomes import Outcome
from .processors import Processor
from .runner import Runner

log = logging.getLogger("asyncactions.claiming")

# Attempts held per thread: one running, one waiting. An action waiting here when the
# process is killed comes back as a lost attempt, like a running one; a graceful stop
# hands it back untouched.
PREFETCH = 2
# Outcomes waiting for the completer: bounding them keeps claims from outrunning the
# completer and bounds what a crash can make run twice; the bound is what lets one
# outcome write carry many actions.
MAX_UNWRITTEN = 500

# Settings of the claim loop's own PostgreSQL session (it runs nothing but claims).
CLAIM_SESSION = (
    # A claim is bookkeeping: if the server crashed before flushing it, the action is
    # simply pending again (the fenced outcome write then matches nothing), so claims
    # need not wait for their own WAL flush. Outcomes stay fully durable.
    "SET synchronous_commit = off",
    # Walk the claim index in order and stop at the limit, whatever the statistics say:
    # right after a bulk enqueue they are stale, and a bitmap scan that sorts every
    # pending row makes each claim cost milliseconds instead of a fraction of one.
    "SET enable_bitmapscan = off",
    "SET enable_seqscan = off",
)


class WorkerFailed(AsyncActionsError):
    """A part the worker cannot do without stopped; the worker exits non-zero."""


class InFlight:
    """The actions claimed and not yet written: what the worker holds leases on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._actions: dict[int, Action] = {}

    def add(self, actions: Iterable[Action]) -> None:
        with self._lock:
            self._actions.update((a.id, a) for a in actions)

    def remove(self, ids: Iterable[int]) -> None:
        with self._lock:
            for action_id in ids:
                self._actions.pop(action_id, None)

    def ids(self) -> list[int]:
        with self._lock:
            return list(self._actions)

    def __len__(self) -> int:
        return len(self._actions)


class Claimer:
    """The claim loop: claim for the free threads, hand each attempt to the runner."""

    def __init__(self, engine: Engine, worker_id: str, processors: dict[str, Processor], *,
                 concurrency: int, lease: timedelta, poll: float, listens: bool,
                 runner: Runner, executor: Executor, in_flight: InFlight,
                 report: Callable[[Sequence[Outcome]], None], wake: Wakeup,
                 alive: Callable[[], None], metrics: Metrics | None = None) -> None:
        self._engine = engine
        self._worker = worker_id
        self._processors = processors
        self._concurrency = concurrency
        self._lease = lease
        self._poll = poll
        self._listens = listens
        self._runner = runner
        self._executor = executor
        self._in_flight = in_flight
        self._report = report
        self._wake = wake
        self._alive = alive
        self._metrics = metrics
        names = sorted(processors)
        # Plain processors share one claim; each batch processor claims a batch of its own.
        plain = [n for n in names if processors[n].settings.batch_size == 1]
        self._groups: list[tuple[list[tuple[str, int]], int | None]] = []
        if plain:
            self._groups.append(([self._retries(n) for n in plain], None))
        self._groups += [([self._retries(n)], processors[n].settings.batch_size)
                         for n in names if n not in plain]
        running = PREFETCH * concurrency * max(p.settings.batch_size
                                               for p in processors.values())
        self._max_held = running + max(running, MAX_UNWRITTEN)

    def _retries(self, name: str) -> tuple[str, int]:
        return name, self._processors[name].settings.retries

    def run(self, stop: threading.Event, burst: bool) -> None:
        backoff = 0.1
        setup = (*CLAIM_SESSION, LISTEN) if self._listens else ()
        conn = KeptConnection(self._engine, *setup, single_statements=True)
        try:
            while not stop.is_set():
                self._alive()  # raises WorkerFailed when a part it needs has stopped
                self._wake.clear()
                # Burst ends when a round claims nothing while nothing was held before
                # it: outcomes written meanwhile (zero-interval retries) are then seen.
                idle_before = len(self._in_flight) == 0
                try:
                    claimed, more = self.claim_round(conn)
                    drained = burst and not claimed and idle_before and \
                        not self._eligible(conn)
                    backoff = 0.1
                except sa_exc.DBAPIError as exc:
                    log.warning("claiming failed (%s); retrying in %.1fs", first_line(exc),
                                backoff)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if drained:
                    break
                # With more waiting, claim again at once; but read the notifications
                # even then, or they pile up in the driver for as long as the backlog.
                self._wake.wait(0 if more else self._poll,
                                conn.driver if self._listens else None)
        finally:
            conn.close()

    def _eligible(self, conn: KeptConnection) -> bool:
        with conn.begin() as connection:
            return queries.any_eligible(connection, sorted(self._processors))

    def claim_round(self, conn: KeptConnection) -> tuple[int, bool]:
        """Claim for the free threads, and as many again to wait for one (so threads
        never idle while a claim is in flight); returns how many actions, and whether
        more may be waiting (a claim came back full)."""
        busy = self._runner.busy()
        free = PREFETCH * self._concurrency - busy
        if busy and free < self._concurrency:
            return 0, False  # a claim for a slot or two costs as much as one for many
        room = self._max_held - len(self._in_flight)
        claimed, more = 0, False
        for processors, batch_size in self._groups:
            want = min(free if batch_size is None else batch_size, room)
            if free <= 0 or want <= 0:
                break
            with conn.begin() as connection:
                actions, malformed = queries.claim(connection, self._worker, processors,
                                                   want, self._lease)
            self._in_flight.add([*actions, *(a for a, _ in malformed)])
            if malformed:
                self._report([self._executor.undecodable(a, exc) for a, exc in malformed])
            if not actions:
                continue
            claimed += len(actions)
            room -= len(actions)
            more = more or len(actions) == want
            units = [[a] for a in actions] if batch_size is None else [actions]
            free -= len(units)
            attempts = []
            for unit in units:
                name = unit[0].processor
                if self._metrics is not None:
                    self._metrics.claimed_actions(name, len(unit))
                timeout = self._processors[name].settings.timeout
                attempts.append(Attempt(unit, name, timeout.total_seconds() if timeout else None))
            self._runner.submit(*attempts)
        return claimed, more
