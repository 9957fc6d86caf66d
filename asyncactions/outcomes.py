"""What to record for a finished attempt: one Outcome per action, with an explicit kind.

The retry decision lives here and nowhere else, as small functions of the action, the
processor's settings and what happened. Building an outcome never raises, whatever the
processor raised or returned: an exception whose message cannot be read, a result that
cannot be stored, a delay out of range each become a failed attempt that says so.
"""

from __future__ import annotations

import random
import traceback
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

from . import codec
from .action import Action, Status
from .durations import MAX_DURATION, format_duration
from .errors import UnserializableData
from .processors import DEFAULTS, Defer, PermanentFailure, ProcessorSettings

ERROR_MAX_CHARS = 1000
TRACEBACK_MAX_CHARS = 20_000
ERROR_HISTORY = 20


class Kind(StrEnum):
    """How an attempt ended, for the row, the logs and the metrics."""

    COMPLETED = "completed"
    RETRIED = "retried"  # failed, retries left: pending again after the retry interval
    DEFERRED = "deferred"  # Defer: pending again after its delay, retries kept
    FAILED = "failed"  # for good

    @property
    def status(self) -> Status:
        # Identity tests: read for every outcome, and an enum's hash is Python code.
        if self is Kind.COMPLETED:
            return Status.COMPLETED
        return Status.FAILED if self is Kind.FAILED else Status.PENDING


class Outcome(NamedTuple):
    """What to write for one finished attempt. (A named tuple: as immutable as a frozen
    dataclass, and built in a sixth of its time, once for every action run.)"""

    action: Action  # as claimed: its id, attempts and claimed_by fence the write
    kind: Kind
    retries: int
    delay: timedelta = timedelta(0)
    result: str | None = None  # codec JSON
    error: str | None = None
    errors: str | None = None  # codec JSON of the whole history, when it grew
    exc: BaseException | None = None  # reported (hooks) once the write went through

    @property
    def status(self) -> Status:
        return self.kind.status

    @property
    def is_final(self) -> bool:
        return self.status.is_final

    def final_action(self) -> Action:
        """The action as this outcome leaves it (what on_failure receives)."""
        return self.action._replace(
            status=self.status, retries=self.retries, result=codec.loads(self.result),
            error=self.error,
            errors=codec.loads(self.errors) if self.errors else self.action.errors,
            claimed_by=None, lease_expires_at=None)


def error_line(exc: BaseException) -> str:
    """'ExcType: message' on one line, truncated; never raises."""
    name = type(exc).__name__
    try:
        text = f"{name}: {exc}".replace("\n", " ").strip()
    except BaseException as broken:  # its __str__ raised: say so instead
        text = f"{name}: (its message cannot be read: {type(broken).__name__})"
    return text if len(text) <= ERROR_MAX_CHARS else text[: ERROR_MAX_CHARS - 1] + "…"


def _traceback(exc: BaseException) -> str | None:
    if exc.__traceback__ is None:
        return None
    try:
        text = "".join(traceback.format_exception(exc))
    except BaseException:
        return None
    if len(text) > TRACEBACK_MAX_CHARS:  # keep the end: where it was raised
        text = "…" + text[-(TRACEBACK_MAX_CHARS - 1):]
    return text


def completed(action: Action, value: Any, *, max_bytes: int = codec.MAX_DATA_BYTES,
              worker: str | None = None) -> Outcome:
    try:
        result = None if value is None else codec.dumps(value, what="result",
                                                        max_bytes=max_bytes)
    except UnserializableData as exc:
        return failed_attempt(action, exc, worker=worker, permanent=True)
    return Outcome(action, Kind.COMPLETED, _retries(action), result=result)


def deferred(action: Action, defer: Defer, *, worker: str | None = None,
             settings: ProcessorSettings = DEFAULTS) -> Outcome:
    if not timedelta(0) <= defer.delay <= MAX_DURATION:
        problem = ValueError(f"Defer({defer.delay}) is outside 0s..{format_duration(MAX_DURATION)}"
                             "; defer for less, or fail the action")
        return failed_attempt(action, problem, worker=worker, settings=settings)
    return Outcome(action, Kind.DEFERRED, _retries(action, settings), delay=defer.delay,
                   error=action.error)


def failed_attempt(action: Action, exc: BaseException, *, worker: str | None,
                   settings: ProcessorSettings = DEFAULTS, permanent: bool = False,
                   with_traceback: bool = True) -> Outcome:
    """A failed attempt: retry after the interval while retries remain, else fail."""
    line = error_line(exc)
    entry = {"attempt": action.attempts, "at": datetime.now(UTC).isoformat(), "error": line,
             "traceback": _traceback(exc) if with_traceback else None, "worker": worker}
    # A history read back as stored text (it did not decode) is started afresh.
    earlier = action.errors if isinstance(action.errors, list) else []
    history = codec.dumps([*earlier, entry][-ERROR_HISTORY:], what="errors")
    retries = _retries(action, settings)
    if permanent or isinstance(exc, PermanentFailure) or retries <= 0:
        return Outcome(action, Kind.FAILED, retries, error=line, errors=history, exc=exc)
    return Outcome(action, Kind.RETRIED, retries - 1, delay=retry_delay(action, settings),
                   error=line, errors=history, exc=exc)


def unstorable(outcome: Outcome, exc: BaseException) -> Outcome:
    """The outcome to write instead of one the database refused: failed for good, with
    nothing of the original but why."""
    action = outcome.action._replace(errors=[])
    problem = ValueError(f"the database refused this attempt's {outcome.kind} outcome "
                         f"({error_line(exc)}); it was failed instead")
    return failed_attempt(action, problem, worker=action.claimed_by, permanent=True,
                          with_traceback=False)


def _retries(action: Action, settings: ProcessorSettings = DEFAULTS) -> int:
    # Set at claim; a row claimed by an older worker may still say NULL.
    return settings.retries if action.retries is None else action.retries


def retry_delay(action: Action, settings: ProcessorSettings) -> timedelta:
    base = settings.retry_interval
    if settings.backoff == "fixed" or base <= timedelta(0):
        return base
    # Exponential: double per failed attempt so far, capped, with ±20% jitter so a
    # burst of failures does not come back as a burst.
    failures = max(len(action.errors), action.attempts - 1, 0)
    cap = max(settings.max_retry_interval, base).total_seconds()
    grown = min(base.total_seconds() * 2 ** min(failures, 30), cap)
    return timedelta(seconds=min(grown * random.uniform(0.8, 1.2),
                                 MAX_DURATION.total_seconds()))
