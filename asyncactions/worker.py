"""The worker: claim eligible actions, run them concurrently, hand outcomes to the
completer. The CLI `worker` command is a thin layer over `Worker`.

Threads, each with one job: the claim loop (the caller's thread), the runner's pool
(processors, with timeouts), the completer (batched outcome writes), the notifier
(wake-ups) and the maintenance scheduler (heartbeats, lease recovery).
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
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from . import migrate, outcomes, queries
from . import processors as registry
from .completer import Completer
from .config import Config, format_duration, load_config
from .database import first_line, make_engine, require_schema
from .errors import ConfigError
from .maintenance import Maintenance, pid_namespace
from .notifier import Notifier
from .runner import Attempt, Runner

log = logging.getLogger("asyncactions.worker")


class Interrupted(Exception):
    """Recorded for an attempt still running when shutdown_grace ran out."""


class Worker:
    """Runs registered processors on the actions in one database until stopped."""

    def __init__(self, database_url: str | None = None, *, imports: Iterable[str] = (),
                 processors: Iterable[str] | None = None, concurrency: int | None = None,
                 config: Config | str | os.PathLike[str] | None = None) -> None:
        if not isinstance(config, Config):
            config = load_config(config, database_url)
        elif database_url:
            config = config.with_overrides(database_url=database_url)
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        self.config = config
        self.concurrency = concurrency or config.worker.concurrency
        registry.import_modules([*config.imports, *imports])
        self.processors = registry.select(config, processors)
        if not self.processors:
            raise ConfigError("no enabled processors to run; name the modules that define them "
                              "with --import (or `imports` in the config file)")
        # The pid namespace tells a restarted worker on this host whether a registered
        # pid is one it can check for liveness.
        self.id = (f"{socket.gethostname()}:{os.getpid()}:"
                   f"{pid_namespace()}-{uuid.uuid4().hex[:6]}")
        self._names = sorted(self.processors)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        # Claimed and not yet written: running, waiting for a thread, or in the completer.
        # Bounding it bounds the outcomes a crash can lose and keeps claims from
        # outrunning the completer.
        self._held = 0
        self._max_held = 2 * self.concurrency
        self._signals = 0

    # --- lifecycle --------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming and shut down gracefully; safe from any thread."""
        self._stop.set()
        self._wake.set()

    def run(self, burst: bool = False) -> None:
        """Block until stopped (or, with burst, until nothing is eligible), then shut down
        gracefully: running attempts finish within shutdown_grace, every outcome is written."""
        engine = make_engine(self.config.effective_database_url, pool_size=4)
        try:
            self._prepare_schema(engine)
            completer = Completer(engine, self._written)
            runner = Runner(self.concurrency, self._execute, self._report, self._timed_out)
            maintenance = Maintenance(engine, self.id, self.config.worker.lease,
                                      self.processors, runner.held,
                                      lambda: self._register(engine))
            notifier = (Notifier(engine, self._names, self._wake.set)
                        if engine.dialect.name == "postgresql" else None)
            self._register(engine)
            maintenance.recover_lost()  # a restart after a crash on this host: recover now
            self._completer = completer
            restore_signals = self._install_signal_handlers()
            for part in (completer, runner, maintenance, *([notifier] if notifier else [])):
                part.start()
            log.info("worker %s started: processors %s, concurrency %d, database %s", self.id,
                     ", ".join(self._names), self.concurrency,
                     engine.url.render_as_string(hide_password=True))
            try:
                self._claim_loop(engine, runner, completer, burst)
            finally:
                self._shutdown(engine, runner, completer, maintenance, notifier)
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

    def _claim_loop(self, engine: Engine, runner: Runner, completer: Completer,
                    burst: bool) -> None:
        poll = self.config.worker.poll_interval.total_seconds()
        lease = self.config.worker.lease
        backoff = 0.1
        while not self._stop.is_set():
            self._wake.clear()
            free = min(self._max_held - self._held, self.concurrency - runner.busy())
            if free <= 0:
                self._wake.wait(poll)
                continue
            # Burst ends when a claim finds nothing while nothing was held before it:
            # outcomes written meanwhile (zero-interval retries) are then seen.
            idle_before = self._held == 0
            try:
                with engine.begin() as conn:
                    claimed = queries.claim(conn, self.id, self._names, free, lease)
                backoff = 0.1
            except sa_exc.DBAPIError as exc:
                log.warning("claiming failed (%s); retrying in %.1fs", first_line(exc), backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            with self._lock:
                self._held += len(claimed)
            for action in claimed:
                timeout = self.processors[action.processor].settings.timeout
                runner.submit(Attempt(action, timeout.total_seconds() if timeout else None))
            if len(claimed) < free:
                if burst and not claimed and idle_before:
                    return
                self._wake.wait(poll)

    # --- running (on the runner's threads) ---------------------------------------------

    def _execute(self, attempt: Attempt) -> outcomes.Outcome:
        proc = self.processors[attempt.action.processor]
        return outcomes.run(proc.fn, attempt.action, proc.settings, self.id)

    def _timed_out(self, attempt: Attempt) -> outcomes.Outcome:
        limit = format_duration(timedelta(seconds=attempt.timeout or 0))
        return self._failed(attempt, TimeoutError(
            f"attempt timed out after {limit} (the processor's timeout) and was abandoned"))

    def _failed(self, attempt: Attempt, exc: Exception) -> outcomes.Outcome:
        proc = self.processors[attempt.action.processor]
        return outcomes.failed_attempt(attempt.action, exc, worker=self.id,
                                       settings=proc.settings, tb=None)

    def _report(self, attempt: Attempt, outcome: outcomes.Outcome) -> None:
        if outcome.errors is not None:
            _log_failed_attempt(outcome)
        self._completer.add(outcome)
        self._wake.set()  # a thread is free: claim for it

    def _written(self, written: list[outcomes.Outcome]) -> None:
        with self._lock:
            self._held -= len(written)
        self._wake.set()

    # --- shutdown ---------------------------------------------------------------------

    def _shutdown(self, engine: Engine, runner: Runner, completer: Completer,
                  maintenance: Maintenance, notifier: Notifier | None) -> None:
        grace = self.config.worker.shutdown_grace.total_seconds()
        deadline = time.monotonic() + grace
        if notifier:
            notifier.stop()
        unstarted = [a.action for a in runner.close()]
        for attempt in runner.wait_running(grace):
            self._report(attempt, self._failed(attempt, Interrupted(
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
