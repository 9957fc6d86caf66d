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

from . import queries, tracing
from .action import Action
from .completer import MAX_BATCH
from .database import KeptConnection, first_line
from .errors import AsyncActionsError
from .executor import Attempt, Executor
from .metrics import Metrics
from .notifier import LISTEN, Wakeup, session_is_kept
from .outcomes import Outcome
from .processors import Processor, ProcessorSettings
from .runner import Runner

log = logging.getLogger("asyncactions.claiming")

# Attempts held per thread: one running, one waiting, so that threads never idle while a
# claim is on its way. Where attempts are quick (executor.QUICK), two waiting: each claim
# then takes up to half as many again, and claims and outcome writes cost less per action
# (drains of 20,000 no-op actions 1.05-1.09x, the machine's CPU per action 0.88-0.98x);
# slower attempts keep one, so that a backlog is not held by one worker while another
# has threads free. An action waiting here when the process is killed comes back as a
# lost attempt, like a running one; a graceful stop hands it back untouched.
PREFETCH = 2
PREFETCH_QUICK = 3
# Outcomes waiting for the completer: bounding them keeps claims from outrunning the
# completer and bounds what a crash can make run twice; the bound is what lets one
# outcome write carry many actions. One full write's worth: at 500, a one-process drain
# held its claims back in a tenth of its rounds while a write was on its way (drains
# 1.11x faster with one process, 1.08x with two, at 1000).
MAX_UNWRITTEN = MAX_BATCH
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
    # Plan each claim once per connection: the settings above make its plan the walk of
    # the claim index whatever the statistics say, but planning it anew each time cost
    # more than running it (a claim of six processors: 4.5 ms against 1.0), and the
    # server chooses between the two again at each ANALYZE, so claims slowed down
    # mid-run (from 0.2 to 0.6 ms for an empty claim of one processor).
    "SET plan_cache_mode = force_generic_plan",
)


def set_claim_session(conn: Connection) -> None:
    """Give a connection the claim session's settings, in one round trip (the worker's
    own claim connection, once proved a session of its own; and the benchmarks)."""
    conn.exec_driver_sql("; ".join(CLAIM_SESSION))


# Set on every claim connection, behind a pooler too (PgBouncer keeps a client's TimeZone
# as its own, on whichever server connection it gets): claimed rows' times in UTC, as on
# SQLite, whatever the session's zone; psycopg also reads them ~1 us faster each than in
# a named zone (the server's default is often 'Etc/UTC', read as a ZoneInfo).
CLAIM_SETUP = ("SET TimeZone = 'UTC'",)


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

    def remove(self, attempts: Iterable[Action]) -> None:
        """These attempts were written. By attempt, not by id: a retry due at once can be
        claimed again between its outcome's commit and this call, and that next attempt
        is still held (its lease renewed, its slot taken)."""
        with self._lock:
            for action in attempts:
                held = self._actions.get(action.id)
                if held is not None and held.attempts == action.attempts:
                    del self._actions[action.id]

    def ids(self) -> list[int]:
        with self._lock:
            return list(self._actions)

    def __len__(self) -> int:
        return len(self._actions)


class ClaimFloor:
    """Where a claim of one group of processors starts its walk of the claim index.

    While a long transaction pins the xmin horizon, the entries of every action claimed
    since stay at the index's front, and a walk from there steps over all of them. A
    claim can start at its floor instead (the first action of each processor the last
    claim took), missing what lies below it; so floors are used only while a walk from
    the front costs over CHEAPER times one from a floor, VOTES times in a row (a floored
    probe at most every PROBE seconds, a walk from the front after each). Meanwhile a
    walk from the front comes due every EVERY times its own cost, followed by a second
    one (the first cleans what can be cleaned) that decides whether floors stay (while a
    walk from the front costs over STILL_CHEAPER times one from a floor). SQLite
    updates its index in place: it never uses them."""

    EVERY = 50
    CHEAPER = 2.0
    STILL_CHEAPER = 1.25  # floors in use stay while a floor costs less: no flapping near 2x
    PROBE = 0.25
    VOTES = 2

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._keys: dict[str, queries.Key] = {}
        self.in_use = False
        self._votes = 0  # probes in a row that found a floor CHEAPER
        # Costs are compared like with like: of claims that took no action, and of
        # claims that took some (those from a floor at least as many).
        self._front_cost: dict[bool, float] = {}  # seconds the last walk from the front took
        self._front_took = 0  # and how many actions the last one that took some took
        self._floor_cost: dict[bool, float] = {}  # seconds the last walk from a floor took
        self._front_due = 0.0  # perf_counter time of the next walk from the front
        self._probe_due = 0.0  # and of the next probe, floors not in use
        self._probed = False  # floors not in use: the claim after a probe walks from the front
        self._recheck = False  # floors in use: the next claim walks from the front, to decide

    def floors(self, now: float) -> dict[str, queries.Key] | None:
        """The floors for a claim starting now; None: it walks from the front."""
        if not self._keys:
            return None
        if self.in_use:
            return None if self._recheck or now >= self._front_due else self._keys
        return None if self._probed or now < self._probe_due else self._keys

    def claimed(self, actions: Sequence[Action], started: float, ended: float,
                floored: bool, short: bool) -> float | None:
        """Note a claim; returns in how many seconds to claim again, from the front,
        though nothing wakes the loop (a short floored claim may have missed actions
        below its floor), or None."""
        cost, took = ended - started, bool(actions)
        if floored:
            comparable = not took or len(actions) >= self._front_took
            if comparable:  # in use, smoothed: one slow claim must not end floors
                last = self._floor_cost.get(took, cost)
                self._floor_cost[took] = last + 0.2 * (cost - last) if self.in_use else cost
            if not self.in_use:  # a probe
                self._probed, self._probe_due = True, ended + self.PROBE
                worth = self._worth(took) if comparable else None
                if worth is not None:
                    self._votes = self._votes + 1 if worth else 0
                self._use(self._votes >= self.VOTES, took)
                self._front_due = ended + self.EVERY * max(self._front_cost.values(), default=0.0)
        elif self.in_use and not self._recheck:
            self._recheck = True  # this walk cleaned what it could: measure the next
        else:
            self._front_cost[took] = cost
            self._front_took = len(actions) if took else self._front_took
            self._front_due = ended + self.EVERY * cost
            self._probed = False
            if self._recheck:
                self._recheck = False
                worth = self._worth(took, self.STILL_CHEAPER)
                if worth is not None:
                    self._use(worth, took)
                    self._votes = 0
        self._note_firsts(actions, short)
        if not (floored and short):
            return None
        return max(self._front_due - ended, 0.0) if self.in_use else 0.0

    def _use(self, floors: bool, took: bool) -> None:
        if floors != self.in_use:  # rare by design: worth a line in the log
            log.info("claims %s (a walk of the claim index from its front took %.1f ms, "
                     "from a floor %.1f ms)",
                     "start at their floor" if floors else "walk from the front again",
                     self._front_cost[took] * 1000, self._floor_cost[took] * 1000)
        self.in_use = floors

    def _worth(self, took: bool, cheaper: float | None = None) -> bool | None:
        """Whether a floor is CHEAPER, by the last claims like this one; None: unknown."""
        if took not in self._front_cost or took not in self._floor_cost:
            return None
        return self._front_cost[took] > (cheaper or self.CHEAPER) * self._floor_cost[took]

    def _note_firsts(self, actions: Sequence[Action], short: bool) -> None:
        if not self._enabled:
            return
        # Each processor's first action of the last priority this claim reached: an
        # urgent one taken along must not send the next walk back over the others.
        firsts: dict[str, queries.Key] = {}
        for a in actions:
            key = (a.priority, a.next_eligible_at, a.id)
            first = firsts.get(a.processor, key)
            if key[0] > first[0] or key <= first:
                firsts[a.processor] = key
        # A processor it took none of keeps its floor. So does one it took only more
        # urgent actions of, fewer than asked: their priority is empty now, and a floor
        # moved back to them would step over the dead entries of all the others again
        # (a full claim may have left more there: the floor moves).
        for processor, key in firsts.items():
            floor = self._keys.get(processor)
            if floor is None or key[0] >= floor[0] or not short:
                self._keys[processor] = key


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
        # When this worker last claimed for them: a starting worker claims for its own
        # processors first (a background claim first took ~5 ms of a start's ~55).
        self._background_at = time.monotonic()
        floored = engine.dialect.name == "postgresql"
        self._floors = {group[0][0][0]: ClaimFloor(floored)
                        for group in [*self._groups, *self._background]}
        self._was_full = False  # the last round's claims came back full
        self._capped = any(flow for _, _, flow in self._groups)
        self._capped_at = 0.0  # when this worker last claimed for capped processors
        # Capped claims take a lock and count: a transaction of two statements.
        self._flow_conn: KeptConnection | None = None
        self._session_checked = False  # the claim connection proved a session its own
        # When to claim again though nothing wakes the loop: a rate window lets another
        # start, or a walk from the front is due after a short floored claim.
        self._again_in: float | None = None
        running = PREFETCH_QUICK * concurrency * max(p.settings.batch_size
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

    @property
    def own_session(self) -> bool:
        """Whether this worker's connections are sessions of their own (not behind a
        pooler in transaction mode): proved by a notification reaching the claim
        connection. Until then, and once found behind one, False."""
        return self._listens and self._session_checked

    def _session_settings(self, conn: Connection) -> None:
        if self.own_session:
            set_claim_session(conn)

    def _notify(self, channel: str, payload: str) -> None:
        with self._engine.begin() as other:
            other.execute(select(func.pg_notify(channel, payload)))

    def _retries(self, name: str) -> tuple[str, int]:
        return name, self._processors[name].settings.retries

    def run(self, stop: threading.Event, burst: bool) -> None:
        backoff = 0.1
        setup = CLAIM_SETUP if self._engine.dialect.name == "postgresql" else ()
        conn = KeptConnection(self._engine, *setup, single_statements=True,
                              on_connect=self._listen if self._listens else None)
        if self._capped:
            # Session settings only where the claim connection proved a session its own.
            self._flow_conn = KeptConnection(self._engine, *setup,
                                             on_connect=self._session_settings)
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
                # lets the next one start, not a poll interval later; a floored claim
                # that came back short, when a walk from the front is due.
                again = self._poll if self._again_in is None else self._again_in
                wait = 0 if more else min(self._poll, again)
                self._wake.wait(wait, conn.driver if self._listens else None)
        finally:
            conn.close()
            if self._flow_conn is not None:
                self._flow_conn.close()

    def _eligible(self, conn: KeptConnection) -> bool:
        with conn.begin() as connection:
            return queries.any_eligible(connection, sorted(self._processors))

    def wants_more(self) -> bool:
        """Whether a freed slot is worth waking the claim loop for: once no more than one
        attempt per thread is held (running or waiting), a claim fills at least a slot
        per thread (see claim_round); waking it for every attempt that ends would only
        spin it. Capped processors claim on regardless."""
        return self._capped or self._runner.busy() <= self._concurrency

    def claim_round(self, conn: KeptConnection) -> tuple[int, bool]:
        """Claim for the free threads, and as many again to wait for one (so threads
        never idle while a claim is in flight); returns how many actions, and whether
        more may be waiting (a claim came back full)."""
        busy = self._runner.busy()
        prefetch = PREFETCH_QUICK if self._executor.quick else PREFETCH
        free = prefetch * self._concurrency - busy
        self._again_in = None
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
            floor = self._floors[processors[0][0]]
            started = time.perf_counter()
            floors = floor.floors(started)
            if flow is None:
                with conn.begin() as connection:
                    actions, malformed = queries.claim(connection, self._worker, processors,
                                                       want, self._lease, floors=floors)
            else:
                self._capped_at = now
                actions, malformed = self._claim_capped(processors, want, flow, floors)
            ended = time.perf_counter()
            self._timed(ended - started)
            taken = [*actions, *(a for a, _ in malformed)]
            self._again(floor.claimed(taken, started, ended, floored=floors is not None,
                                      short=len(taken) < want))
            self._in_flight.add(taken)
            if malformed:
                self._report([self._executor.undecodable(a, exc) for a, exc in malformed])
            if flow is not None and flow.rate_count is not None and len(taken) < want:
                self._note_window(processors[0][0], flow)  # the rate may hold some back
            if not actions:
                continue
            claimed += len(actions)
            room -= len(actions)
            more = more or len(actions) == want
            units = [[a] for a in actions] if batch_size is None else [actions]
            free -= len(units)
            attempts = []
            tracer = tracing.consumer_tracer()
            for unit in units:
                name = unit[0].processor
                if self._metrics is not None:
                    self._metrics.claimed_actions(name, len(unit))
                attempts.append(Attempt(unit, name, self._timeouts[name], tracer=tracer))
            # A capped attempt goes first in the queue: it holds a slot of its cap (or a
            # start of its rate) from its claim on.
            self._runner.submit(*attempts, first=flow is not None)
        self._was_full = more
        return claimed, more

    def _claim_capped(self, processors: list[tuple[str, int]], want: int, flow: queries.Flow,
                      floors: dict[str, queries.Key] | None,
                      ) -> tuple[list[Action], list[tuple[Action, Exception]]]:
        assert self._flow_conn is not None
        with self._flow_conn.begin() as connection:
            queries.lock_processor(connection, processors[0][0], self._lease)
            actions, malformed = queries.claim(connection, self._worker, processors, want,
                                               self._lease, flow, floors)
        return actions, malformed

    def _timed(self, seconds: float) -> None:
        """A claim's transaction, timed when metrics are served."""
        if self._metrics is not None:
            self._metrics.claim(seconds)

    def _note_window(self, name: str, flow: queries.Flow) -> None:
        """The rate limit held some back: wake when its window next lets one start."""
        assert self._flow_conn is not None and flow.rate_count and flow.rate_seconds
        with self._flow_conn.begin() as connection:
            opens = queries.rate_window_opens(connection, name, flow.rate_count,
                                              flow.rate_seconds)
        if opens is None:
            return  # not the rate: nothing was waiting
        # A little after, so the start that ages out is surely outside the window.
        self._again(max(opens + 0.005, 0.005))

    def _again(self, seconds: float | None) -> None:
        if seconds is not None:
            self._again_in = seconds if self._again_in is None else min(self._again_in, seconds)


def _batch_size(settings: ProcessorSettings) -> int | None:
    return settings.batch_size if settings.batch_size > 1 else None


def _flow(settings: ProcessorSettings) -> queries.Flow | None:
    if not settings.flow_controlled:
        return None
    rate = settings.rate_limit
    return queries.Flow(settings.concurrency, rate.count if rate else None,
                        rate.seconds if rate else None)
