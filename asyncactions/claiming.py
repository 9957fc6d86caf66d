"""Claiming: how much the worker may take on, and the loop that claims it.

Capacity is read from what is held, never counted by hand: the actions claimed and
not yet written (`InFlight`), and the runner's waiting and running attempts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta

import psycopg
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy import exc as sa_exc

from . import queries
from .action import Action
from .database import KeptConnection, first_line
from .errors import AsyncActionsError
from .executor import Attempt, Executor
from .metrics import Metrics
from .notifier import LISTEN, Wakeup, session_is_kept
from .outcomes import Outcome
from .processors import Processor, ProcessorSettings
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
# How often a busy worker still claims for its capped processors (seconds).
CAPPED_RECLAIM = 0.05
# How often a worker whose claims come back full still claims for its background
# processors (the built-in fan-out), which it otherwise claims when there is room left.
BACKGROUND_RECLAIM = 1.0

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
    # Nor sort the pending rows found by another index: a processor rare in the table
    # (or keyed actions, whose check the planner cannot estimate) looks like a handful
    # of rows to sort, and the claim then reads and checks every pending row.
    "SET enable_sort = off",
    # Claims are small: compiling one would cost far more than running it.
    "SET jit = off",
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
                 concurrency: int, lease: timedelta, poll_interval: float, listens: bool,
                 runner: Runner, executor: Executor, in_flight: InFlight,
                 report: Callable[[Sequence[Outcome]], None], wake: Wakeup,
                 alive: Callable[[], None], metrics: Metrics | None = None,
                 background: frozenset[str] = frozenset()) -> None:
        self._engine = engine
        self._worker = worker_id
        self._processors = processors
        self._timeouts = {name: p.settings.timeout.total_seconds() if p.settings.timeout
                          else None for name, p in processors.items()}  # per attempt
        self._concurrency = concurrency
        self._lease = lease
        self._poll_interval = poll_interval
        self._listens = listens
        self._runner = runner
        self._executor = executor
        self._in_flight = in_flight
        self._report = report
        self._wake = wake
        self._alive = alive
        self._metrics = metrics
        names = sorted(processors)
        # Plain processors share one claim; each batch processor claims a batch of its
        # own, and so does each with cluster-wide caps (its claim counts, under a lock).
        # Capped ones claim first: a slot of the cluster's cap is not to wait behind
        # this worker's plain backlog.
        # Background processors (the built-in fan-out) claim apart, after the others:
        # in the plain group, every claim of a worker serving one processor would be a
        # claim for two (the fair claim's union and turn numbers each time).
        capped = [n for n in names if processors[n].settings.flow_controlled]
        plain = [n for n in names if n not in capped and n not in background
                 and processors[n].settings.batch_size == 1]
        batched = [n for n in names if n not in capped and n not in plain
                   and n not in background]
        self._groups: list[tuple[list[tuple[str, int]], int | None, queries.Flow | None]] = [
            ([self._retries(n)], _batch_size(processors[n].settings),
             _flow(processors[n].settings)) for n in capped]
        if plain:
            self._groups.append(([self._retries(n) for n in plain], None, None))
        self._groups += [([self._retries(n)], processors[n].settings.batch_size, None)
                         for n in batched]
        self._background = [([self._retries(n)], None, None)
                            for n in names if n in background]
        self._background_at = 0.0  # when this worker last claimed for them
        self._was_full = False  # the last round's claims came back full
        self._capped = any(flow for _, _, flow in self._groups)
        self._capped_at = 0.0  # when this worker last claimed for capped processors
        # Capped claims take a lock and count: a transaction of two statements.
        self._flow_conn: KeptConnection | None = None
        self._session_checked = False  # the claim connection proved a session its own
        self._opens_in: float | None = None  # when a rate window lets another start
        running = PREFETCH * concurrency * max(p.settings.batch_size
                                               for p in processors.values())
        self._max_held = running + max(running, MAX_UNWRITTEN)

    @property
    def _poll(self) -> float:
        """How long the loop sleeps when nothing wakes it. A listening worker is woken by
        enqueues and by the leader when actions become eligible, so it polls only as a
        safety net; others poll every poll_interval."""
        if not self._listens:
            return self._poll_interval
        return max(self._poll_interval, min(self._lease.total_seconds() / 2, 30.0))

    def _listen(self, conn: Connection) -> None:
        """LISTEN on a new claim connection, and trust it with session settings only once
        a notification reached it: through a transaction-mode pooler they would land on
        other clients' server connections (their commits made asynchronous)."""
        if not self._listens:  # found behind a pooler already: the next connection is too
            return
        conn.exec_driver_sql(LISTEN)
        try:
            kept = session_is_kept(conn.connection.driver_connection, self._notify)
        except psycopg.Error as exc:
            # Read on the driver's connection, outside SQLAlchemy: a backend terminated
            # meanwhile must reach the claim loop as any other database error does.
            raise sa_exc.DBAPIError.instance("(probe notification)", None, exc,
                                             psycopg.Error) from exc
        if kept:
            self._session_checked = True
            self._session_settings(conn)
            return
        log.warning("listen = true, but a notification sent to this worker did not come "
                    "back: is the database behind a pooler in transaction mode (PgBouncer)? "
                    "Polling every %gs instead; set [worker] listen = false to say so",
                    self._poll_interval)
        self._listens = False

    def _session_settings(self, conn: Connection) -> None:
        if self._listens and self._session_checked:  # not behind a pooler
            for statement in CLAIM_SESSION:
                conn.exec_driver_sql(statement)

    def _notify(self, channel: str, payload: str) -> None:
        with self._engine.begin() as other:
            other.execute(select(func.pg_notify(channel, payload)))

    def _retries(self, name: str) -> tuple[str, int]:
        return name, self._processors[name].settings.retries

    def run(self, stop: threading.Event, burst: bool) -> None:
        backoff = 0.1
        conn = KeptConnection(self._engine, single_statements=True,
                              on_connect=self._listen if self._listens else None)
        if self._capped:
            # Session settings only where the claim connection proved a session its own.
            self._flow_conn = KeptConnection(self._engine, on_connect=self._session_settings)
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
                except sa_exc.IntegrityError:
                    # Two claimers took different actions of one ordering key at once
                    # (see queries._runnable): the unique index refused the second.
                    log.info("another worker claimed an action of the same ordering key "
                             "at the same moment; claiming again")
                    continue
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
                # A rate limit that held actions back is asked again when its window
                # lets the next one start, not a poll interval later.
                wait = 0 if more else min(self._poll, self._opens_in or self._poll)
                self._wake.wait(wait, conn.driver if self._listens else None)
        finally:
            conn.close()
            if self._flow_conn is not None:
                self._flow_conn.close()

    def _eligible(self, conn: KeptConnection) -> bool:
        with conn.begin() as connection:
            return queries.any_eligible(connection, sorted(self._processors))

    def wants_more(self) -> bool:
        """Whether a freed slot is worth waking the claim loop for: a plain claim waits
        until half the slots it fills are free (see claim_round), so waking it for every
        attempt that ends would only spin it; capped processors claim on regardless."""
        return self._capped or self._runner.busy() <= self._concurrency

    def claim_round(self, conn: KeptConnection) -> tuple[int, bool]:
        """Claim for the free threads, and as many again to wait for one (so threads
        never idle while a claim is in flight); returns how many actions, and whether
        more may be waiting (a claim came back full)."""
        busy = self._runner.busy()
        free = PREFETCH * self._concurrency - busy
        self._opens_in = None
        # A claim for a slot or two costs as much as one for many: plain claims wait
        # for more room. Capped processors claim on (at most every CAPPED_RECLAIM
        # seconds): a slot of the cluster's cap freed here must not wait for that.
        few = bool(busy) and free < self._concurrency
        now = time.monotonic()
        if few and (not self._capped or now - self._capped_at < CAPPED_RECLAIM):
            return 0, False
        room = self._max_held - len(self._in_flight)
        claimed, more = 0, False
        groups = self._groups
        if self._background and now - self._background_at >= BACKGROUND_RECLAIM:
            self._background_at = now  # due, even under a full load: first
            groups = [*self._background, *groups]
        elif self._background and not self._was_full:
            groups = [*groups, *self._background]  # with the room the others leave
        for processors, batch_size, flow in groups:
            want = min(free if batch_size is None else batch_size, room)
            if flow is not None and batch_size is None:
                # Even with every thread taken: the attempt goes first in the queue,
                # and the cap's freed slot is not left to other workers' timing.
                want = min(max(want, 1), room)
            if want <= 0 or (flow is None and (free <= 0 or few)):
                continue
            if flow is None:
                started = time.perf_counter()
                with conn.begin() as connection:
                    actions, malformed = queries.claim(connection, self._worker, processors,
                                                       want, self._lease)
                self._timed(started)
            else:
                self._capped_at = now
                actions, malformed = self._claim_capped(processors, want, flow)
            self._in_flight.add([*actions, *(a for a, _ in malformed)])
            if malformed:
                self._report([self._executor.undecodable(a, exc) for a, exc in malformed])
            if not actions:
                continue
            if flow is not None and flow.rate_count is not None and len(actions) < want:
                self._note_window(processors[0][0], flow)
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
                attempts.append(Attempt(unit, name, self._timeouts[name]))
            # A capped attempt goes first in the queue: it holds a slot of its cap (or a
            # start of its rate) from its claim on.
            self._runner.submit(*attempts, first=flow is not None)
        self._was_full = more
        return claimed, more

    def _claim_capped(self, processors: list[tuple[str, int]], want: int, flow: queries.Flow,
                      ) -> tuple[list[Action], list[tuple[Action, Exception]]]:
        assert self._flow_conn is not None
        started = time.perf_counter()
        with self._flow_conn.begin() as connection:
            queries.lock_processor(connection, processors[0][0], self._lease)
            actions, malformed = queries.claim(connection, self._worker, processors, want,
                                               self._lease, flow)
        self._timed(started)
        if not actions and not malformed and flow.rate_count is not None:
            self._note_window(processors[0][0], flow)
        return actions, malformed

    def _timed(self, started: float) -> None:
        """A claim's transaction, timed when metrics are served."""
        if self._metrics is not None:
            self._metrics.claim(time.perf_counter() - started)

    def _note_window(self, name: str, flow: queries.Flow) -> None:
        """The rate limit held some back: wake when its window next lets one start."""
        assert self._flow_conn is not None and flow.rate_count and flow.rate_seconds
        with self._flow_conn.begin() as connection:
            opens = queries.rate_window_opens(connection, name, flow.rate_count,
                                              flow.rate_seconds)
        if opens is None:
            return  # not the rate: nothing was waiting
        # A little after, so the start that ages out is surely outside the window.
        opens = max(opens + 0.005, 0.005)
        self._opens_in = opens if self._opens_in is None else min(self._opens_in, opens)


def _batch_size(settings: ProcessorSettings) -> int | None:
    return settings.batch_size if settings.batch_size > 1 else None


def _flow(settings: ProcessorSettings) -> queries.Flow | None:
    if not settings.flow_controlled:
        return None
    rate = settings.rate_limit
    return queries.Flow(settings.concurrency, rate.count if rate else None,
                        rate.seconds if rate else None)
