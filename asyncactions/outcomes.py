"""Turn what a processor did (returned, raised) into the Outcome to record per action.

The retry decision lives here and nowhere else: a small pure function of the
action, the processor's settings and the exception.
"""

from __future__ import annotations

import random
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from . import codec, hooks
from .action import Action, Status
from .errors import UnserializableData
from .processors import Defer, PermanentFailure, Processor, ProcessorSettings

ERROR_MAX_CHARS = 1000
ERROR_HISTORY = 20


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to write for one finished attempt. `status` is the row's new status."""

    action: Action
    status: Status
    retries: int
    delay: timedelta = timedelta(0)
    result: str | None = None  # codec JSON
    error: str | None = None
    errors: str | None = None  # codec JSON of the whole history, when it grew

    @property
    def is_final(self) -> bool:
        return self.status.is_final

    @property
    def kind(self) -> str:
        """completed, failed, retried or deferred: for logs and metrics."""
        if self.status != Status.PENDING:
            return self.status.value
        return "retried" if self.errors is not None else "deferred"

    def final_action(self) -> Action:
        """The action as this outcome leaves it (what on_failure receives)."""
        return self.action._replace(status=self.status, retries=self.retries,
                       result=codec.loads(self.result), error=self.error,
                       errors=codec.loads(self.errors) if self.errors else self.action.errors,
                       claimed_by=None, lease_expires_at=None)


def error_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").strip()
    return text if len(text) <= ERROR_MAX_CHARS else text[: ERROR_MAX_CHARS - 1] + "…"


def completed(action: Action, value: Any) -> Outcome:
    try:
        result = None if value is None else codec.dumps(value, what="result")
    except UnserializableData as exc:
        return failed_attempt(action, exc, worker=action.claimed_by, permanent=True)
    return Outcome(action, Status.COMPLETED, action.retries, result=result)


def deferred(action: Action, defer: Defer) -> Outcome:
    return Outcome(action, Status.PENDING, action.retries, delay=defer.delay,
                   error=action.error)


def failed_attempt(action: Action, exc: BaseException, *, worker: str | None,
                   settings: ProcessorSettings | None = None, permanent: bool = False,
                   tb: str | None = None) -> Outcome:
    """A failed attempt: retry after the interval while retries remain, else fail."""
    line = error_line(exc)
    if tb is None:
        tb = "".join(traceback.format_exception(exc)) if exc.__traceback__ else None
    entry = {"attempt": action.attempts, "at": datetime.now(UTC).isoformat(), "error": line,
             "traceback": tb, "worker": worker}
    history = codec.dumps([*action.errors, entry][-ERROR_HISTORY:], what="errors")
    final = permanent or isinstance(exc, PermanentFailure) or action.retries <= 0
    hooks.failed(exc, action, final=final)
    if final:
        return Outcome(action, Status.FAILED, action.retries, error=line, errors=history)
    return Outcome(action, Status.PENDING, action.retries - 1,
                   delay=retry_delay(action, settings or ProcessorSettings()),
                   error=line, errors=history)


def retry_delay(action: Action, settings: ProcessorSettings) -> timedelta:
    base = settings.retry_interval
    if settings.backoff == "fixed" or base <= timedelta(0):
        return base
    # Exponential: double per failed attempt so far, capped, with ±20% jitter so a
    # burst of failures does not come back as a burst.
    failures = max(len(action.errors), action.attempts - 1, 0)
    grown = min(base * (2 ** min(failures, 30)), max(settings.max_retry_interval, base))
    return grown * random.uniform(0.8, 1.2)


def run(proc: Processor, actions: list[Action], worker: str,
        session: Any = None) -> tuple[list[Outcome], bool]:
    """Call the processor on one action (or a batch) and classify how each ended.

    Returns the outcomes and whether the processor raised (then a transactional
    processor's writes must roll back).
    """
    batch = proc.settings.batch_size > 1
    args: tuple[Any, ...] = (actions if batch else actions[0],)
    if session is not None:
        args += (session,)
    try:
        value = proc.fn(*args)
    except Defer as defer:
        return [deferred(a, defer) for a in actions], True
    except Exception as exc:
        return [failed_attempt(a, exc, worker=worker, settings=proc.settings)
                for a in actions], True
    if not batch:
        return [completed(actions[0], value)], False
    return _batch_outcomes(proc, actions, value, worker), False


def _batch_outcomes(proc: Processor, actions: list[Action], value: Any,
                    worker: str) -> list[Outcome]:
    """A batch processor returns None (all completed) or {action_id: result or exception}."""
    if value is None:
        return [completed(a, None) for a in actions]
    if not isinstance(value, dict):
        problem = TypeError(f"batch processor {proc.name!r} returned {type(value).__name__}; "
                            "return None or a dict {action_id: result or exception}")
        return [failed_attempt(a, problem, worker=worker, settings=proc.settings)
                for a in actions]
    results = []
    for action in actions:
        outcome = value.get(action.id)
        if isinstance(outcome, Defer):
            results.append(deferred(action, outcome))
        elif isinstance(outcome, BaseException):
            results.append(failed_attempt(action, outcome, worker=worker,
                                          settings=proc.settings))
        else:
            results.append(completed(action, outcome))
    return results
