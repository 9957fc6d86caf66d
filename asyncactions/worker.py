"""The worker: claim eligible actions, run them concurrently, hand outcomes to the
completer. The CLI `worker` command is a thin layer over `Worker`.

Threads, each with one job: this loop (claims), a pool running processors, the
completer (writes outcomes), the notifier (wake-ups) and the maintenance scheduler.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from . import migrate, outcomes, queries
from . import processors as registry
from .action import Action
from .completer import Completer
from .config import Config, format_duration, load_config
from .database import first_line, make_engine, require_schema
from .errors import ConfigError
from .maintenance import Maintenance
from .notifier import Notifier

log = logging.getLogger("asyncactions.worker")


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
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._names = sorted(self.processors)
        self._engine: Engine | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        # Claimed and not yet handed to the completer: id -> (action, its attempt).
        self._in_flight: dict[int, tuple[Action, Future[None]]] = {}
        self._signals = 0

    # --- lifecycle ------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming and shut down gracefully; safe from any thread."""
        self._stop.set()
        self._wake.set()

    def run(self, burst: bool = False) -> None:
        """Block until stopped (or, with burst, until nothing is eligible), then shut down
        gracefully: running attempts finish within shutdown_grace, every outcome is written."""
        engine = self._engine = make_engine(self.config.effective_database_url,
                                            pool_size=4)
        try:
            self._prepare_schema(engine)
            self._register(engine)
            completer = Completer(engine, self._on_written)
            pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="asyncactions-run")
            maintenance = Maintenance(engine, self.id, self.config.worker.lease, self.processors,
                                      lambda: self._register(engine))
            notifier = Notifier(engine, self._names, self._wake.set) \
                if engine.dialect.name == "postgresql" else None
            restore = self._install_signal_handlers()
            completer.start()
            maintenance.start()
            if notifier:
                notifier.start()
            log.info("worker %s started: processors %s, concurrency %d, database %s", self.id,
                     ", ".join(self._names), self.concurrency,
                     engine.url.render_as_string(hide_password=True))
            try:
                self._claim_loop(engine, pool, completer, burst)
            finally:
                self._shutdown(engine, pool, completer, maintenance, notifier)
                restore()
        finally:
            engine.dispose()

    def _prepare_schema(self, engine: Engine) -> None:
        if engine.dialect.name == "sqlite":
            # The embedded default works with zero setup: create or upgrade the schema.
            migrate.upgrade(engine)
        else:
            require_schema(engine)

    def _register(self, engine: Engine) -> None:
        with engine.begin() as conn:
            queries.register_worker(conn, self.id, socket.gethostname(), os.getpid(),
                                    self._names)

    def _install_signal_handlers(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handle(signum: int, _frame: Any) -> None:
            self._signals += 1
            if self._signals == 1:
                log.info("%s: stopping gracefully (send again to stop at once)",
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

    # --- the loop -----------------------------------------------------------------

    def _claim_loop(self, engine: Engine, pool: ThreadPoolExecutor, completer: Completer,
                    burst: bool) -> None:
        poll = self.config.worker.poll_interval.total_seconds()
        lease = self.config.worker.lease
        delay = 0.1
        while not self._stop.is_set():
            self._wake.clear()
            free = self.concurrency - len(self._in_flight)
            if free <= 0:
                self._wake.wait(poll)
                continue
            # Burst ends when nothing is in flight or unwritten and a claim finds nothing;
            # check before claiming so outcomes written meanwhile (retries) are seen.
            idle_before = not self._in_flight and completer.unwritten == 0
            try:
                with engine.begin() as conn:
                    claimed = queries.claim(conn, self.id, self._names, free, lease)
                delay = 0.1
            except sa_exc.DBAPIError as exc:
                log.warning("claiming failed (%s); retrying in %.1fs", first_line(exc), delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            for action in claimed:
                self._start(pool, completer, action)
            if len(claimed) < free:
                if burst and not claimed and idle_before:
                    return
                if burst and not claimed:
                    # Wait for in-flight work to be written, then look again.
                    completer.wait_idle(poll) if not self._in_flight else self._wake.wait(poll)
                    continue
                self._wake.wait(poll)

    def _start(self, pool: ThreadPoolExecutor, completer: Completer, action: Action) -> None:
        proc = self.processors[action.processor]

        def attempt() -> None:
            outcome = outcomes.run(proc.fn, action, proc.settings, self.id)
            if outcome.errors is not None:
                _log_failed_attempt(outcome)
            completer.add(outcome)
            with self._lock:
                self._in_flight.pop(action.id, None)
            self._wake.set()

        with self._lock:
            self._in_flight[action.id] = (action, pool.submit(attempt))

    def _on_written(self, written: list[outcomes.Outcome]) -> None:
        self._wake.set()  # burst mode waits for writes before looking again

    def _shutdown(self, engine: Engine, pool: ThreadPoolExecutor, completer: Completer,
                  maintenance: Maintenance, notifier: Notifier | None) -> None:
        grace = self.config.worker.shutdown_grace.total_seconds()
        if notifier:
            notifier.stop()
        # Claimed but not started: hand back untouched (retries and attempts as before).
        with self._lock:
            unstarted = [action for action, fut in self._in_flight.values() if fut.cancel()]
            for action in unstarted:
                del self._in_flight[action.id]
            running = [fut for _, fut in self._in_flight.values()]
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace
        wait(running, timeout=grace)
        if self._in_flight:
            log.warning("%d attempts still running after shutdown_grace (%ss); their leases "
                        "will expire and they will run again", len(self._in_flight), grace)
        completer.stop(timeout=max(deadline - time.monotonic(), 5.0))
        maintenance.stop()
        try:
            with engine.begin() as conn:
                queries.release(conn, unstarted)
                if not self._in_flight:
                    queries.unregister_worker(conn, self.id)
        except sa_exc.DBAPIError as exc:
            log.warning("could not unregister at shutdown: %s", first_line(exc))
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
