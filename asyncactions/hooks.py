"""Process-wide exception reporting (Sentry and the like).

    asyncactions.report_exceptions(sentry_sdk.capture_exception)

The callback gets the exception of a failed attempt and the action. `when` chooses
which attempts: "every", "first_and_final" (the default: the first failure shows
something broke, the final one that it stayed broken) or "final".
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Literal

from .action import Action

log = logging.getLogger("asyncactions.hooks")

Policy = Literal["every", "first_and_final", "final"]
_reporter: tuple[Callable[[BaseException, Action], object], Policy] | None = None


def report_exceptions(callback: Callable[[BaseException, Action], object] | None, *,
                      when: Policy = "first_and_final") -> None:
    """Install (or, with None, remove) the exception reporter for this process."""
    global _reporter
    if inspect.iscoroutinefunction(callback):
        raise TypeError("report_exceptions needs a plain function, not an async def: it is "
                        "called on the worker's threads, outside any event loop")
    if when not in ("every", "first_and_final", "final"):
        raise ValueError(f"when must be 'every', 'first_and_final' or 'final', not {when!r}")
    _reporter = None if callback is None else (callback, when)


def failed(exc: BaseException, action: Action, *, final: bool) -> None:
    """Called for every failed attempt; reports it if the policy says so."""
    if _reporter is None:
        return
    callback, when = _reporter
    if when == "every" or final or (when == "first_and_final" and action.attempts == 1):
        try:
            callback(exc, action)
        except Exception:
            log.exception("the exception reporter itself failed")
