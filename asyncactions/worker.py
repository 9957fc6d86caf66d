"""The worker: one way through, claim -> execute -> complete, with maintenance beside it.

- claiming.Claimer (the caller's thread, which also listens for wake-ups on its
  connection) claims eligible actions for the free threads;
- runner.Runner runs each attempt in one of `concurrency` slots (a thread for a sync
  processor, a task on the worker's event loop for an async one), through
  executor.Executor, which turns however it ended into one outcome per action;
- completer.Completer writes the outcomes in batches, fenced on the attempt;
- maintenance's services keep the worker registered and, on the elected leader,
  rescue, prune, fire schedules and wake listening workers.

Every outcome, however it was written, ends in `_written`: the one place that frees
capacity and runs what follows a write (on_failure, exception reports, metrics).
The CLI `worker` command is a thin layer over `Worker`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy import exc as sa_exc

from . import events, fanout, hooks, migrate, queries
from . import processors as registry
from .action import Action
from .claiming import Claimer, InFlight, WorkerFailed
from .completer import Completer
from .config import Config, check_concurrency, load_config
from .database import (
    busy_state,
    first_line,
    is_disconnect,
    make_async_engine,
    make_engine,
    require_schema,
)
from .durations import format_duration
from .errors import ConfigError, DatabaseError
from .eventloop import EventLoop
from .executor import Done, Executor
from .live import CancelWatch, LiveAttempts
from .maintenance import (
    BacklogSampler,
    Heartbeat,
    HorizonWatch,
    Leadership,
    Maintenance,
    Pruner,
    Rescuer,
    ScheduleFirer,
    Service,
    StartsTrimmer,
    Waker,
    pid_namespace,
)
from .metrics import Metrics
from .notifier import Wakeup
from .outcomes import Kind, Outcome
from .runner import Runner

log = logging.getLogger("asyncactions.worker")

FAILED_ATTEMPTS = frozenset({Kind.RETRIED, Kind.FAILED})


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
        self.config = config
        self.concurrency = check_concurrency(concurrency or config.worker.concurrency,
                                             "concurrency")
        registry.import_modules([*config.imports, *imports])
        self.processors = registry.select(config.processors, config.source, processors)
        if not self.processors:
            raise ConfigError("no enabled processors to run; name the modules that define them "
                              "with --import (or `imports` in the config file)")
        self.processors[fanout.FANOUT] = fanout.PROCESSOR  # every worker runs fan-outs
        # The pid namespace tells a restarted worker on this host whether a registered
        # pid is one it can check for liveness.
        self.id = (f"{socket.gethostname()}:{os.getpid()}:"
                   f"{pid_namespace()}-{uuid.uuid4().hex[:6]}")
        # Kept only when served: plain processors then pay nothing for them.
        self.metrics = Metrics() if metrics_port else None
        self._metrics_port = metrics_port
        self._stop = threading.Event()
        self._wake = Wakeup(self.processors)
        self._in_flight = InFlight()
        self._live = LiveAttempts()  # attempts running now, for current_attempt()
        self._signals = 0

    # --- lifecycle --------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming and shut down gracefully; safe from any thread."""
        self._stop.set()
        self._wake.set()

    def run(self, burst: bool = False) -> None:
        """Block until stopped (or, with burst, until nothing is eligible), then shut down
        gracefully: running attempts finish within shutdown_grace, every outcome is written.
        Raises WorkerFailed if a part the worker cannot do without stopped."""
        settings = self.config.worker
        # Connections are opened lazily: room for a session per transactional attempt.
        engine = make_engine(self.config.effective_database_url,
                             pool_size=4 + self.concurrency)
        answered = threading.Event()  # the database has answered once
        # As soon as a connection is made: before SQLAlchemy's own first queries on it,
        # which a backend terminated at that moment fails (the database did answer).
        event.listen(engine, "first_connect", lambda *_: answered.set(), insert=True)
        # Async processors run on an event loop of the worker's own; async transactional
        # ones get their AsyncSession from an asyncio engine on the same database.
        loop = EventLoop() if any(p.is_async for p in self.processors.values()) else None
        async_engine = (make_async_engine(self.config.effective_database_url,
                                          pool_size=4 + self.concurrency)
                        if any(p.is_async and p.settings.transactional
                               for p in self.processors.values()) else None)
        try:
            self._starting(answered, lambda: self._prepare_schema(engine))
            executor = Executor(self.processors, self.id, engine,
                                max_bytes=self.config.max_data_bytes, metrics=self.metrics,
                                live=self._live, async_engine=async_engine,
                                lease=settings.lease)
            self._hooks = ThreadPoolExecutor(1, thread_name_prefix="asyncactions-hooks")
            # Its session settings wait for the claim connection's proof (claims come
            # first, so outcomes do too).
            self._completer = completer = Completer(
                engine, self._written, own_session=lambda: self._claimer.own_session)
            runner = Runner(self.concurrency, executor, self._finished, loop=loop)
            listens = engine.dialect.name == "postgresql" and settings.listen
            self._claimer = claimer = Claimer(
                engine, self.id, self.processors, concurrency=self.concurrency,
                lease=settings.lease, poll_interval=settings.poll_interval.total_seconds(),
                listens=listens,
                runner=runner, executor=executor, in_flight=self._in_flight,
                report=completer.add, wake=self._wake, alive=self._check_alive,
                metrics=self.metrics, background=frozenset({fanout.FANOUT}))
            self._leadership = leadership = Leadership(self.id, settings.lease)
            heartbeat = Heartbeat(engine, self.id, settings.lease, self._in_flight.ids,
                                  lambda: self._register(engine), leadership, self.metrics)
            rescuer = Rescuer(engine, settings.lease, self.processors, self._written)
            maintenance = Maintenance(leadership, *self._services(engine, heartbeat, rescuer,
                                                                  listens))
            if self.metrics is not None and self._metrics_port:
                self.metrics.serve(self._metrics_port)
            self._starting(answered, lambda: self._register(engine))  # and learn who leads
            self._starting(answered, lambda: self._add_rules(engine))
            self._rescue_now(rescuer)
            restore_signals = self._install_signal_handlers()
            for part in (completer, runner, maintenance, *([loop] if loop else [])):
                part.start()
            log.info("worker %s started: processors %s, concurrency %d, database %s", self.id,
                     ", ".join(sorted(self.processors)), self.concurrency,
                     engine.url.render_as_string(hide_password=True))
            try:
                claimer.run(self._stop, burst)
            finally:
                self._shutdown(engine, runner, executor, completer, maintenance)
                self._hooks.shutdown(wait=True)
                restore_signals()
        finally:
            if loop is not None:
                loop.close(cleanup=async_engine.dispose if async_engine else None)
            engine.dispose()

    def _services(self, engine: Engine, heartbeat: Heartbeat, rescuer: Rescuer,
                  listens: bool) -> tuple[list[Service], list[Service]]:
        """(on every worker, on the leader only)."""
        everywhere: list[Service] = [heartbeat, CancelWatch(engine, self._live)]
        if self.metrics is not None:
            everywhere.append(BacklogSampler(engine, self.metrics, self.processors))
        leading: list[Service] = [rescuer, StartsTrimmer(engine, self.config.worker.lease)]
        if engine.dialect.name == "postgresql":
            leading.append(HorizonWatch(engine))
        retention = {k: v for k, v in self.config.retention.items() if v is not None}
        if retention:
            leading.append(Pruner(engine, retention))
        if self.config.schedules:
            leading.append(ScheduleFirer(engine, self.config.schedules,
                                         lease=self.config.worker.lease,
                                         max_data_bytes=self.config.max_data_bytes))
        if listens:
            leading.append(Waker(engine, self.config.worker.poll_interval))
        return everywhere, leading

    def _starting(self, answered: threading.Event, step: Callable[[], object]) -> None:
        """A start-up step, retried while a server says "not now" (too many connections,
        starting up), however long that lasts: it is there, and a full server frees
        connections as its clients finish. Retried for up to a lease while a database
        that has answered drops the connection (restarting, a terminated backend): a
        worker started during a blip starts. A database that never answered fails at
        once, in one line; stop() ends the retries."""
        deadline = time.monotonic() + self.config.worker.lease.total_seconds()
        pause = 0.1
        while True:
            try:
                step()
                return
            except (sa_exc.DBAPIError, DatabaseError) as exc:
                dbapi = isinstance(exc, sa_exc.DBAPIError)
                busy = busy_state(exc) if dbapi else exc.sqlstate
                dropped = answered.is_set() and (is_disconnect(exc) if dbapi else exc.connection)
                if not (busy or (dropped and time.monotonic() + pause <= deadline)):
                    raise
                log.warning("starting: %s; retrying", first_line(exc))
                if self._stop.wait(pause):  # backoff before reconnecting
                    raise
                pause = min(pause * 2, 2.0)

    def _prepare_schema(self, engine: Engine) -> None:
        if engine.dialect.name == "sqlite":
            migrate.upgrade(engine)  # the embedded default works with zero setup
        else:
            require_schema(engine)
            migrate.require_current(engine)

    def _add_rules(self, engine: Engine) -> None:
        """The rules of the processors this worker serves (@processor(on=[...])), so
        producers that publish those events reach them."""
        rules = [(event, p.name) for p in self.processors.values() for event in p.settings.on]
        if rules and events.add_rules(engine, rules, created_by=self.id):
            log.info("rules added: %s", ", ".join(f"{e} -> {p}" for e, p in rules))

    def _register(self, engine: Engine) -> None:
        with engine.begin() as conn:
            leader = queries.register_worker(conn, self.id, socket.gethostname(), os.getpid(),
                                             sorted(self.processors),
                                             lease=self.config.worker.lease)
        self._leadership.saw(leader)

    def _rescue_now(self, rescuer: Rescuer) -> None:
        """A restart after a crash on this host: recover its actions now, leader or not
        (the rest of a rescue is the leader's). Whatever the table holds, the worker
        starts."""
        try:
            rescuer.run_for_this_host()
        except Exception as exc:
            log.warning("recovering lost actions at start failed (%s); the leader will "
                        "retry", first_line(exc))

    def _check_alive(self) -> None:
        if not self._completer.alive:
            raise WorkerFailed("the completer thread stopped, so no outcome can be written; "
                               "stopping this worker (its leases bring its actions back)")

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

    # --- after an attempt --------------------------------------------------------------

    def _finished(self, done: Done) -> None:
        """An attempt ended (on a runner thread): its outcomes to the completer, unless
        they were already written with the processor's work."""
        if done.applied is None:
            self._completer.add(done.outcomes)
        else:
            self._written(done.outcomes, done.applied)
        if self._claimer.wants_more():
            self._wake.set()  # enough slots are free: worth a claim

    def _written(self, written: Sequence[Outcome], applied: set[int]) -> None:
        """Outcomes written (or fenced out, or given up on): their capacity is free."""
        self._in_flight.remove(o.action for o in written)
        for outcome in written:
            # Only a failed attempt has more to do (a set: the commonest outcomes skip at
            # once, where comparing with each kind cost a tenth of the completer's time).
            if outcome.kind not in FAILED_ATTEMPTS or outcome.action.id not in applied:
                continue
            _log_failed_attempt(outcome)
            if outcome.exc is not None:
                hooks.failed(outcome.exc, outcome.action, final=outcome.is_final)
            if outcome.kind is Kind.FAILED:
                proc = self.processors.get(outcome.action.processor)
                if proc is not None and proc.settings.on_failure is not None:
                    self._hooks.submit(_call_on_failure, proc, outcome.final_action())
        if self.metrics is not None:
            self.metrics.processed_outcomes(written)
        self._wake.set()

    # --- shutdown ---------------------------------------------------------------------

    def _shutdown(self, engine: Engine, runner: Runner, executor: Executor,
                  completer: Completer, maintenance: Maintenance) -> None:
        grace = self.config.worker.shutdown_grace
        deadline = time.monotonic() + grace.total_seconds()
        unstarted = [action for attempt in runner.close() for action in attempt.actions]
        for attempt in runner.wait_running(grace.total_seconds()):
            completer.add(executor.interrupted(attempt, grace))
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


def _log_failed_attempt(outcome: Outcome) -> None:
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

