"""Executing: call the processor on a claimed attempt and turn however it ended into one
Outcome per action. This is the one place that decides what an attempt's end means.

Whatever the processor does (returns anything, raises anything, `SystemExit` and
`KeyboardInterrupt` included), `run` returns outcomes and never raises: a processor's
exception is its action's failure, never the worker's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from types import CoroutineType
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import await_only, greenlet_spawn

from . import payloads, queries, tracing
from .action import Action
from .database import first_line
from .durations import format_duration
from .errors import InvalidData
from .live import LiveAttempt, LiveAttempts
from .metrics import Metrics
from .outcomes import Kind, Outcome, completed, deferred, error_line, failed_attempt
from .processors import DEFAULTS, Defer, PermanentFailure, Processor

log = logging.getLogger("asyncactions.executor")
R = TypeVar("R")


@dataclass(eq=False)
class Attempt:
    """One call of a processor: one action, or a batch of one processor's actions."""

    actions: list[Action]
    processor: str
    timeout: float | None  # seconds
    finished: bool = field(default=False)  # its outcome was reported (or it timed out)
    live: LiveAttempt | None = field(default=None)  # while it runs: current_attempt()
    task: asyncio.Task[None] | None = field(default=None)  # an async attempt's, once started
    tracer: Any = field(default=None)  # its consumer span's (tracing.consumer_tracer); None: off


class Done(NamedTuple):
    """An attempt's outcomes, and the ids already written with them (a transactional
    attempt commits its outcomes with the processor's work), else None: to be written."""

    outcomes: list[Outcome]
    applied: set[int] | None = None


class Interrupted(Exception):
    """Recorded for an attempt still running when shutdown_grace ran out."""


# An attempt is quick when it ends within this on average (seconds): then a worker holds
# more attempts waiting (see claiming.PREFETCH_QUICK).
QUICK = 0.001


class Executor:
    def __init__(self, processors: dict[str, Processor], worker_id: str, engine: Engine, *,
                 max_bytes: int, metrics: Metrics | None = None,
                 live: LiveAttempts | None = None,
                 async_engine: AsyncEngine | None = None,
                 lease: timedelta | None = None) -> None:
        self._processors = processors
        self._lease = lease  # how long a transactional attempt cut off at COMMIT holds on
        self._worker = worker_id
        self._engine = engine
        self._async_engine = async_engine  # for async transactional processors' sessions
        self._max_bytes = max_bytes
        self._metrics = metrics
        self.live = live or LiveAttempts()
        # Seconds an attempt took, smoothed over the last few dozen (None: none yet).
        # Updated by every runner thread without a lock: a lost update changes nothing.
        self._typical: float | None = None

    @property
    def quick(self) -> bool:
        """Whether this worker's attempts have lately ended within QUICK on average."""
        return self._typical is not None and self._typical < QUICK

    def is_async(self, attempt: Attempt) -> bool:
        return self._processors[attempt.processor].is_async

    def run(self, attempt: Attempt) -> Done:
        """A sync processor's attempt (on a runner thread): call it, decide the outcomes."""
        started = time.perf_counter()
        proc = self._processors[attempt.processor]
        # The hook an asyncio runner needs to cancel a task: attempt.live.on_cancel().
        attempt.live = LiveAttempt(attempt.actions, self._engine)
        with tracing.consuming(attempt.tracer, proc.name, attempt.actions) as span:
            token = self.live.begin(attempt.live)
            try:
                if proc.settings.transactional:
                    done = self._in_transaction(proc, attempt)
                else:
                    done = Done(self._call(proc, attempt.actions)[0])
            except BaseException as exc:
                done = self._broken(attempt, exc)
            finally:
                self.live.end(attempt.live, token)
            tracing.outcome(span, done.outcomes)
        return self._measured(proc, started, done)

    async def run_async(self, attempt: Attempt) -> Done:
        """An async processor's attempt (a task on the worker's event loop): the same
        steps, awaiting the processor. A transactional one takes the sync path above in
        a greenlet, as SQLAlchemy's asyncio does, where `_call` awaits the processor.
        A cancel of its action (seen by the cancel watch) cancels the task."""
        started = time.perf_counter()
        proc = self._processors[attempt.processor]
        attempt.live = LiveAttempt(attempt.actions, self._engine)
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        if task is not None:
            attempt.live.on_cancel(lambda: loop.call_soon_threadsafe(task.cancel))
        with tracing.consuming(attempt.tracer, proc.name, attempt.actions) as span:
            token = self.live.begin(attempt.live)
            try:
                if proc.settings.transactional:
                    done = await greenlet_spawn(self._in_transaction, proc, attempt)
                else:
                    done = Done(await self._call_async(proc, attempt.actions))
            except BaseException as exc:
                done = self._broken(attempt, exc)
            finally:
                self.live.end(attempt.live, token)
            tracing.outcome(span, done.outcomes)
        return self._measured(proc, started, done)

    async def _call_async(self, proc: Processor, actions: list[Action]) -> list[Outcome]:
        """Await a plain async processor (a task on the worker's event loop)."""
        # Loading references is blocking I/O: off the event loop.
        prepare = (asyncio.to_thread if any(payloads.has_references(a.data) for a in actions)
                   else _now)
        actions, refused = await prepare(self._prepared, proc, actions)
        if not actions:
            return refused
        try:
            value = await proc.fn(*self._args(proc, actions))
        except BaseException as exc:  # CancelledError too: its task was cancelled
            return refused + self._raised(actions, exc)
        return refused + self._returned(proc, actions, value)

    def _broken(self, attempt: Attempt, exc: BaseException) -> Done:
        """Our own bookkeeping failed: still an outcome for each action."""
        log.exception("recording the outcome of %s failed", _ids(attempt))
        return Done(self.failed(attempt, exc))

    def _measured(self, proc: Processor, started: float, done: Done) -> Done:
        seconds = time.perf_counter() - started
        typical = self._typical
        self._typical = seconds if typical is None else typical + 0.05 * (seconds - typical)
        if self._metrics is not None:
            self._metrics.attempt(proc.name, seconds)
        return done

    @staticmethod
    def _args(proc: Processor, actions: list[Action], session: Any = None) -> tuple[Any, ...]:
        args: tuple[Any, ...] = (actions if proc.settings.batch_size > 1 else actions[0],)
        return args if session is None else (*args, session)

    def _call(self, proc: Processor, actions: list[Action],
              session: Any = None) -> tuple[list[Outcome], bool]:
        """Call the processor; returns the outcomes and whether it raised (then a
        transactional processor's writes roll back). In a greenlet (see run_async) an
        async processor is awaited here."""
        actions, refused = self._prepared(proc, actions, session)
        if not actions:
            return refused, False
        outcomes, raised = self._called(proc, actions, session)
        return refused + outcomes, raised

    def _called(self, proc: Processor, actions: list[Action],
                session: Any = None) -> tuple[list[Outcome], bool]:
        try:
            value = proc.fn(*self._args(proc, actions, session))
            if proc.is_async:
                value = await_only(value)
            elif isinstance(value, CoroutineType):  # a sync wrapper around an async def
                value.close()
                raise TypeError(f"processor {proc.name!r} returned a coroutine: register the "
                                "async def itself (or a wrapper that is an async def too)")
        except BaseException as exc:  # SystemExit and the like end this attempt only
            return self._raised(actions, exc), True
        return self._returned(proc, actions, value), False

    # --- typed payloads (payloads.py) ---------------------------------------------------

    def _prepared(self, proc: Processor, actions: list[Action],
                  session: Any = None) -> tuple[list[Action], list[Outcome]]:
        """The actions as the processor sees them (references loaded, in the processor's
        session or a short one of their own; data as its schema's model), and the
        outcomes of those whose data does not fit: failed for good, the field named."""
        schema = proc.settings.schema
        refs = [payloads.has_references(a.data) for a in actions]
        if schema is None and not any(refs):
            return actions, []
        if any(refs) and session is None:
            with Session(self._engine) as short:
                return self._prepared(proc, actions, short)
        if isinstance(session, AsyncSession):
            session = session.sync_session
        ready: list[Action] = []
        refused: list[Outcome] = []
        for action, ref in zip(actions, refs, strict=True):
            try:
                data = payloads.load_references(action.data, session) if ref else action.data
                if schema is not None:
                    data = payloads.validate(schema, data)
                ready.append(action._replace(data=data))
            except InvalidData as exc:
                refused.append(failed_attempt(action, exc, worker=self._worker,
                                              settings=proc.settings, permanent=True,
                                              with_traceback=False))
        return ready, refused

    def _raised(self, actions: list[Action], exc: BaseException) -> list[Outcome]:
        return [self._outcome(a, exc) for a in actions]

    def _returned(self, proc: Processor, actions: list[Action], value: Any) -> list[Outcome]:
        if proc.settings.batch_size == 1:
            return [self._outcome(actions[0], value)]
        return self._batch_outcomes(proc, actions, value)

    def _batch_outcomes(self, proc: Processor, actions: list[Action],
                        value: Any) -> list[Outcome]:
        """None: all completed; else {action_id: result or exception}, missing ids completed."""
        if value is None:
            return [self._outcome(a, None) for a in actions]
        if not isinstance(value, dict):
            problem = TypeError(f"batch processor {proc.name!r} returned "
                                f"{type(value).__name__}; return None or a dict "
                                "{action_id: result or exception}")
            return [self._outcome(a, problem) for a in actions]
        return [self._outcome(a, value.get(a.id)) for a in actions]

    def _outcome(self, action: Action, end: Any) -> Outcome:
        """The one decision: a Defer, an exception (a failed attempt) or a result."""
        try:
            if isinstance(end, Defer):
                return deferred(action, end, worker=self._worker,
                                settings=self._processors[action.processor].settings)
            if isinstance(end, BaseException):
                return failed_attempt(action, end, worker=self._worker,
                                      settings=self._processors[action.processor].settings)
            return completed(action, end, max_bytes=self._max_bytes, worker=self._worker)
        except BaseException as exc:
            return self._last_resort(action, exc)

    def _in_transaction(self, proc: Processor, attempt: Attempt) -> Done:
        """The processor's writes and the outcomes commit together, or not at all."""
        # An async processor gets an AsyncSession; its sync facade records the outcomes.
        given: Session | AsyncSession = (AsyncSession(self._async_engine)
                                         if proc.is_async else Session(self._engine))
        session = given.sync_session if isinstance(given, AsyncSession) else given
        with session:
            session.begin()
            # Its locks outlive no host cut off for long. (Not on SQLite: a connection
            # taken before the processor asks for one would hold the database's lock.)
            if self._lease is not None and session.get_bind().dialect.name == "postgresql":
                queries.ends_if_cut_off(session.connection(), self._lease)
            outcomes, raised = self._call(proc, attempt.actions, given)
            if raised:
                session.rollback()
                return Done(outcomes)
            try:
                applied = queries.record(session.connection(), outcomes, lease=self._lease)
                if len(applied) < len(outcomes):
                    # We lost the claim (lease expired, canceled): our work must not land.
                    session.rollback()
                    log.warning("%s lost its claim while running; its writes were rolled "
                                "back", _ids(attempt))
                    applied = set()
                else:
                    if attempt.live:  # the outcome lands with the commit: no cancel
                        self.live.retire(attempt.live)
                    session.commit()
            except Exception as exc:
                session.rollback()
                log.warning("committing %s failed (%s); its writes were rolled back",
                            _ids(attempt), first_line(exc))
                return Done(self.failed(attempt, exc))
        return Done(outcomes, applied)

    # --- attempts that ended without the processor returning ----------------------------

    def timed_out(self, attempt: Attempt) -> list[Outcome]:
        limit = format_duration(timedelta(seconds=attempt.timeout or 0))
        return self.failed(attempt, TimeoutError(
            f"attempt timed out after {limit} (the processor's timeout) and was abandoned"))

    def interrupted(self, attempt: Attempt, grace: timedelta) -> list[Outcome]:
        return self.failed(attempt, Interrupted(
            f"the worker stopped while this attempt was running (shutdown_grace "
            f"{format_duration(grace)} ran out)"))

    def undecodable(self, action: Action, exc: BaseException) -> Outcome:
        problem = PermanentFailure(f"the stored data cannot be decoded ({error_line(exc)}); "
                                   "fix or cancel this action")
        return self._failed_one(action, problem)

    def failed(self, attempt: Attempt, exc: BaseException) -> list[Outcome]:
        return [self._failed_one(action, exc) for action in attempt.actions]

    def _failed_one(self, action: Action, exc: BaseException) -> Outcome:
        proc = self._processors.get(action.processor)
        try:
            return failed_attempt(action, exc, worker=self._worker,
                                  settings=proc.settings if proc else DEFAULTS)
        except BaseException as broken:
            return self._last_resort(action, broken)

    def _last_resort(self, action: Action, exc: BaseException) -> Outcome:
        """Building the outcome itself failed (a history that no longer encodes, say):
        fail the action for good with what we know, from values that cannot fail."""
        log.error("%s: could not record its outcome (%s); failing it", action.display_id,
                  type(exc).__name__)
        try:
            return failed_attempt(action._replace(errors=[]), exc, worker=self._worker,
                                  permanent=True, with_traceback=False)
        except BaseException:
            return Outcome(action, Kind.FAILED, 0,
                           error="RecordingFailed: this attempt's outcome could not be "
                                 "recorded")


async def _now(fn: Callable[..., R], *args: Any) -> R:
    return fn(*args)


def _ids(attempt: Attempt) -> str:
    return ", ".join(a.display_id for a in attempt.actions)
