"""The worker: claim eligible actions, run them concurrently, hand outcomes to the
completer. The CLI `worker` command is a thin layer over `Worker`.

Threads, each with one job: the claim loop (the caller's thread, which also listens
for wake-ups on its connection), the runner's pool (processors, with timeouts), the
completer (batched outcome writes) and the maintenance scheduler (heartbeats, lease
recovery).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from . import enqueue, migrate, outcomes, queries
from . import processors as registry
from .action import Action, Status
from .completer import Completer
from .config import Config, load_config
from .database import KeptConnection, first_line, make_engine, require_schema
from .durations import format_duration
from .errors import ConfigError
from .maintenance import Maintenance, pid_namespace
from .metrics import Metrics
from .notifier import LISTEN, Wakeup
from .processors import PermanentFailure
from .runner import Attempt, Runner

log = logging.getLogger("asyncactions.worker")

MAX_UNWRITTEN = 500
# Attempts held per thread: one running, one waiting. An action waiting here when the
# process is killed comes back as a lost attempt, like a running one; a graceful stop
# hands it back untouched.
PREFETCH = 2

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


class Interrupted(Exception):
    """Recorded for an attempt still running when shutdown_grace ran out."""


class Worker:
    """Runs registered processors on the actions in one database until stopped."""

    def __init__(self, database_url: str | None = None, *, imports: Iterable[str] = (),
                 processors: Iterable[str] | None = None, concurrency: int | None = None,
                 config: Config | str | os.PathLike[str] | None = None,
                 metrics_port: int | None = None) -> None:
        if not isinstance(config, Config):
            config = load_config(config, database_url)
        elif database_url:
            config = config.with_overrides(database_url=database_url)
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        self.config = config
        enqueue.MAX_DATA_BYTES = config.max_data_bytes  # for what this process enqueues
        self.concurrency = concurrency or config.worker.concurrency
        registry.import_modules([*config.imports, *imports])
        self.processors = registry.select(config.processors, config.source, processors)
        if not self.processors:
            raise ConfigError("no enabled processors to run; name the modules that define them "
                              "with --import (or `imports` in the config file)")
        # The pid namespace tells a restarted worker on this host whether a registered
        # pid is one it can check for liveness.
        self.id = (f"{socket.gethostname()}:{os.getpid()}:"
                   f"{pid_namespace()}-{uuid.uuid4().hex[:6]}")
        self._names = sorted(self.processors)
        # Plain processors share one claim; each batch processor claims a batch of its own.
        self._plain = [n for n in self._names if self.processors[n].settings.batch_size == 1]
        self._batched = [n for n in self._names if n not in self._plain]
        # Kept only when served: plain processors then pay nothing for them.
        self.metrics = Metrics() if metrics_port else None
        self._metrics_port = metrics_port
        self._stop = threading.Event()
        self._wake = Wakeup(self._names)
        self._lock = threading.Lock()
        # Claimed and not yet written: running, waiting for a thread, or in the completer.
        # Bounding it keeps claims from outrunning the completer and bounds what a crash
        # can make run twice; the bound on unwritten outcomes (MAX_UNWRITTEN) is what lets
        # one outcome write carry many actions.
        self._held = 0
        running = PREFETCH * self.concurrency * max(p.settings.batch_size
                                                    for p in self.processors.values())
        self._max_held = running + max(running, MAX_UNWRITTEN)
        self._signals = 0

    # --- lifecycle --------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming and shut down gracefully; safe from any thread."""
        self._stop.set()
        self._wake.set()

    def run(self, burst: bool = False) -> None:
        """Block until stopped (or, with burst, until nothing is eligible), then shut down
        gracefully: running attempts finish within shutdown_grace, every outcome is written."""
        # Connections are opened lazily: room for a session per transactional attempt.
        engine = self._engine = make_engine(self.config.effective_database_url,
                                            pool_size=4 + self.concurrency)
        try:
            self._prepare_schema(engine)
            completer = Completer(engine, self._recorded)
            runner = Runner(self.concurrency, self._execute, self._report, self._timed_out)
            maintenance = Maintenance(engine, self.id, self.config.worker.lease,
                                      self.processors, runner.held,
                                      lambda: self._register(engine), self._after_recorded,
                                      self.metrics,
                                      self.config.schedules, self.config.retention)
            self._hooks = ThreadPoolExecutor(1, thread_name_prefix="asyncactions-hooks")
            if self.metrics is not None and self._metrics_port:
                self.metrics.serve(self._metrics_port)
            self._register(engine)
            maintenance.recover_lost()  # a restart after a crash on this host: recover now
            self._completer, self._runner = completer, runner
            restore_signals = self._install_signal_handlers()
            for part in (completer, runner, maintenance):
                part.start()
            log.info("worker %s started: processors %s, concurrency %d, database %s", self.id,
                     ", ".join(self._names), self.concurrency,
                     engine.url.render_as_string(hide_password=True))
            try:
                self._claim_loop(engine, runner, burst)
            finally:
                self._shutdown(engine, runner, completer, maintenance)
                self._hooks.shutdown(wait=True)
                restore_signals()
        finally:
            engine.dispose()

    def _prepare_schema(self, engine: Engine) -> None:
        if engine.dialect.name == "sqlite":
            migrate.upgrade(engine)  # the embedded default works with zero setup
        else:
            require_schema(engine)

    def _register(self, engine: Engine) -> None:
        with engine.begin() as conn:
            queries.register_worker(conn, self.id, socket.gethostname(), os.getpid(),
                                    self._names)

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handle(signum: int, _frame: Any) -> None:
            self._signals += 1
            if self._signals == 1:
                log.info("%s: stopping gracefully (send it again to stop at once)",
                         signal.Signals(signum).name)
                self.stop()
            else:
                log.warning("second signal: stopping at once; leases will recover the rest")
                os._exit(1)

        for sig in previous:
            signal.signal(sig, handle)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return restore

    # --- claiming ---------------------------------------------------------------------

    def _claim_loop(self, engine: Engine, runner: Runner, burst: bool) -> None:
        poll = self.config.worker.poll_interval.total_seconds()
        backoff = 0.1
        listens = engine.dialect.name == "postgresql"
        conn = KeptConnection(engine, *((*CLAIM_SESSION, LISTEN) if listens else ()),
                              single_statements=True)
        while not self._stop.is_set():
            self._wake.clear()
            # Burst ends when a round claims nothing while nothing was held before it:
            # outcomes written meanwhile (zero-interval retries) are then seen.
            idle_before = self._held == 0
            try:
                claimed, more = self._claim_round(conn, runner)
                backoff = 0.1
            except sa_exc.DBAPIError as exc:
                log.warning("claiming failed (%s); retrying in %.1fs", first_line(exc), backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if burst and not claimed and idle_before:
                break
            # With more waiting, claim again at once; but read the notifications even
            # then, or they pile up in the driver for as long as the backlog lasts.
            self._wake.wait(0 if more else poll, conn.driver if listens else None)
        conn.close()

    def _claim_round(self, conn: KeptConnection, runner: Runner) -> tuple[int, bool]:
        """Claim for the free threads, and as many again to wait for one (so threads
        never idle while a claim is in flight); returns how many actions, and whether
        more may be waiting (a claim came back full)."""
        busy = runner.busy()
        free = PREFETCH * self.concurrency - busy
        if busy and free < self.concurrency:
            return 0, False  # a claim for a slot or two costs as much as one for many
        room = self._max_held - self._held
        claimed, more = 0, False
        groups = [(self._plain, 0)] if self._plain else []
        groups += [([name], self.processors[name].settings.batch_size)
                   for name in self._batched]
        for names, batch_size in groups:
            want = min(free if batch_size == 0 else batch_size, room)
            if free <= 0 or want <= 0:
                break
            with conn.begin() as connection:
                actions, malformed = queries.claim(connection, self.id, names, want,
                                                   self.config.worker.lease)
            with self._lock:
                self._held += len(actions) + len(malformed)
            for action, exc in malformed:
                self._report_malformed(action, exc)
            if not actions:
                continue
            claimed += len(actions)
            room -= len(actions)
            more = more or len(actions) == want
            units = [[a] for a in actions] if batch_size == 0 else [actions]
            free -= len(units)
            for unit in units:
                name = unit[0].processor
                if self.metrics is not None:
                    self.metrics.claimed_actions(name, len(unit))
                timeout = self.processors[name].settings.timeout
                runner.submit(Attempt(unit, name, timeout.total_seconds() if timeout else None))
        return claimed, more

    # --- running (on the runner's threads) -------------------------------------------

    def _execute(self, attempt: Attempt) -> list[outcomes.Outcome]:
        proc = self.processors[attempt.processor]
        started = time.perf_counter()
        if proc.settings.transactional:
            result = self._execute_in_transaction(proc, attempt)
        else:
            result, _raised = outcomes.run(proc, attempt.actions, self.id)
        if self.metrics is not None:
            self.metrics.attempt(proc.name, time.perf_counter() - started)
        return result

    def _execute_in_transaction(self, proc: registry.Processor,
                                attempt: Attempt) -> list[outcomes.Outcome]:
        """The processor's writes and the outcomes commit together, or not at all.

        Returns the outcomes still to write: none when they committed with the
        processor's work; the failures when it raised (its writes rolled back)."""
        with Session(self._engine) as session:
            session.begin()
            result, raised = outcomes.run(proc, attempt.actions, self.id, session=session)
            if raised:
                session.rollback()
                return result
            try:
                applied = queries.record(session.connection(), result)
                if len(applied) < len(result):
                    # We lost the claim (lease expired, canceled): our work must not land.
                    session.rollback()
                    log.warning("%s lost its claim while running; its writes were rolled "
                                "back", ", ".join(o.action.display_id for o in result))
                    applied = set()
                else:
                    session.commit()
            except Exception as exc:
                session.rollback()
                if not isinstance(exc, sa_exc.DBAPIError):
                    raise
                log.warning("committing %s failed (%s); its writes were rolled back and it "
                            "will run again", attempt.actions[0].display_id, first_line(exc))
                return [self._failed_one(o.action, proc, exc) for o in result]
        self._recorded(result, applied)
        return []

    def _timed_out(self, attempt: Attempt) -> list[outcomes.Outcome]:
        limit = format_duration(timedelta(seconds=attempt.timeout or 0))
        return self._failed(attempt, TimeoutError(
            f"attempt timed out after {limit} (the processor's timeout) and was abandoned"))

    def _failed(self, attempt: Attempt, exc: Exception) -> list[outcomes.Outcome]:
        proc = self.processors[attempt.processor]
        return [self._failed_one(action, proc, exc) for action in attempt.actions]

    def _failed_one(self, action: Action, proc: registry.Processor,
                    exc: Exception) -> outcomes.Outcome:
        return outcomes.failed_attempt(action, exc, worker=self.id, settings=proc.settings,
                                       tb=None)

    def _report_malformed(self, action: Action, exc: Exception) -> None:
        problem = PermanentFailure(f"the stored data cannot be decoded ({type(exc).__name__}: "
                                   f"{exc}); fix or cancel this action")
        self._report([self._failed_one(action, self.processors[action.processor], problem)])

    def _report(self, result: list[outcomes.Outcome]) -> None:
        for outcome in result:
            if outcome.errors is not None:
                _log_failed_attempt(outcome)
            self._completer.add(outcome)
        if self._runner.busy() <= self.concurrency:
            self._wake.set()  # half the window is free: worth a claim

    def _recorded(self, written: list[outcomes.Outcome], applied: set[int]) -> None:
        self._after_recorded(written, applied)
        if self.metrics is not None:
            self.metrics.processed_outcomes(written)
        self._written(written)

    def _written(self, written: list[outcomes.Outcome]) -> None:
        with self._lock:
            self._held -= len(written)
        self._wake.set()

    def _after_recorded(self, recorded: list[outcomes.Outcome], applied: set[int]) -> None:
        """Call on_failure once for each action that has just failed for good."""
        for outcome in recorded:
            if outcome.status != Status.FAILED or outcome.action.id not in applied:
                continue
            proc = self.processors.get(outcome.action.processor)
            if proc is not None and proc.settings.on_failure is not None:
                self._hooks.submit(_call_on_failure, proc, outcome.final_action())

    # --- shutdown ---------------------------------------------------------------------

    def _shutdown(self, engine: Engine, runner: Runner, completer: Completer,
                  maintenance: Maintenance) -> None:
        grace = self.config.worker.shutdown_grace.total_seconds()
        deadline = time.monotonic() + grace
        unstarted = [action for attempt in runner.close() for action in attempt.actions]
        for attempt in runner.wait_running(grace):
            self._report(self._failed(attempt, Interrupted(
                f"the worker stopped while this attempt was running (shutdown_grace "
                f"{format_duration(self.config.worker.shutdown_grace)} ran out)")))
        completer.stop(timeout=max(deadline - time.monotonic(), 10.0))
        maintenance.stop()
        try:
            with engine.begin() as conn:
                # Claimed but never started: hand back as if never claimed.
                queries.release(conn, unstarted)
                queries.unregister_worker(conn, self.id)
        except sa_exc.DBAPIError as exc:
            log.warning("could not hand back %d actions or unregister at shutdown (%s); "
                        "their leases will bring them back", len(unstarted), first_line(exc))
        log.info("worker %s stopped", self.id)


def _log_failed_attempt(outcome: outcomes.Outcome) -> None:
    action = outcome.action
    if outcome.is_final:
        log.error("%s %s failed for good on attempt %d: %s", action.display_id,
                  action.processor, action.attempts, outcome.error)
    else:
        log.warning("%s %s attempt %d failed (%s); retrying in %s, %d retries left",
                    action.display_id, action.processor, action.attempts, outcome.error,
                    format_duration(outcome.delay), outcome.retries)


def _call_on_failure(proc: registry.Processor, action: Action) -> None:
    try:
        proc.settings.on_failure(action)  # type: ignore[misc]
    except Exception:
        log.exception("on_failure of %s raised for %s", proc.name, action.display_id)
