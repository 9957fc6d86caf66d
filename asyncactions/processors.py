"""The @processor decorator, the registry it fills, and the outcomes a processor raises."""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Literal, NamedTuple

from .durations import check_duration, parse_duration
from .errors import ConfigError, ImportFailed, UnknownProcessor
from .payloads import check_schema


class PermanentFailure(Exception):
    """Raise from a processor to fail the action now, without using a retry."""


class Defer(Exception):
    """Raise from a processor to run the action again after `delay`, keeping its retries."""

    def __init__(self, delay: timedelta | float = timedelta(0), reason: str = "") -> None:
        self.delay = delay if isinstance(delay, timedelta) else timedelta(seconds=delay)
        super().__init__(reason or f"deferred for {self.delay}")


class RateLimit(NamedTuple):
    """At most `count` attempts start in any window of `seconds` (SPEC §3)."""

    count: int
    seconds: float
    text: str  # as written: "5/s"

    def __str__(self) -> str:
        return self.text


PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d{1,9})\s*/\s*([smh])\s*$")


def parse_rate_limit(value: Any, what: str) -> RateLimit | None:
    """"5/s", "100/m", "1000/h" (or None) as a RateLimit; anything else one clear line."""
    if value is None or isinstance(value, RateLimit):
        return value
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None or int(match[1]) < 1:
        raise ConfigError(f"{what}: must be COUNT/PERIOD with a COUNT of 1 or more and a "
                          f"PERIOD of s, m or h (e.g. \"5/s\", \"100/m\"), got {value!r}")
    return RateLimit(int(match[1]), PERIODS[match[2]], f"{int(match[1])}/{match[2]}")


@dataclass(frozen=True)
class ProcessorSettings:
    retries: int = 3
    retry_interval: timedelta = timedelta(minutes=5)
    backoff: Literal["fixed", "exponential"] = "fixed"
    timeout: timedelta | None = None
    batch_size: int = 1
    enabled: bool = True
    transactional: bool = False
    on_failure: Callable[[Any], None] | None = None
    max_retry_interval: timedelta = timedelta(hours=1)  # the cap of exponential backoff
    concurrency: int | None = None  # attempts running at once, across the cluster
    rate_limit: RateLimit | None = None  # attempts started per window, across the cluster
    on: tuple[str, ...] = ()  # events whose rules a worker serving it adds when it starts
    schema: Any = None  # a Pydantic model or dataclass its data must fit (payloads.py)

    @property
    def flow_controlled(self) -> bool:
        """Whether its claims must count what the cluster runs (a lock and a count each)."""
        return self.concurrency is not None or self.rate_limit is not None


@dataclass(frozen=True)
class Processor:
    name: str
    fn: Callable[..., Any]
    settings: ProcessorSettings

    @functools.cached_property
    def is_async(self) -> bool:
        """An `async def` processor: the worker awaits it on its event loop."""
        return inspect.iscoroutinefunction(self.fn)

    def configured(self, overrides: dict[str, Any] | None) -> Processor:
        """These settings with a config file's [processors.NAME] (checked) on top."""
        return replace(self, settings=replace(self.settings, **overrides)) if overrides else self


DEFAULTS = ProcessorSettings()


_registry: dict[str, Processor] = {}


def processor(name: str, *, retries: int = DEFAULTS.retries,
              retry_interval: timedelta = DEFAULTS.retry_interval,
              backoff: Literal["fixed", "exponential"] = DEFAULTS.backoff,
              timeout: timedelta | None = DEFAULTS.timeout,
              batch_size: int = DEFAULTS.batch_size, enabled: bool = DEFAULTS.enabled,
              transactional: bool = DEFAULTS.transactional,
              on_failure: Callable[[Any], None] | None = DEFAULTS.on_failure,
              max_retry_interval: timedelta = DEFAULTS.max_retry_interval,
              concurrency: int | None = None, rate_limit: str | None = None,
              on: Iterable[str] = (), schema: Any = None,
              ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the processor called `name`.

    `concurrency=N` caps its attempts running at once across all workers;
    `rate_limit="5/s"` (or /m, /h) caps the attempts started in any such window;
    `on=["order.placed"]` binds it to events (rules a worker serving it adds);
    `schema=Model` (Pydantic or dataclass) checks its data and hands it `Model`."""
    settings = ProcessorSettings(retries=retries, retry_interval=retry_interval,
                                 backoff=backoff, timeout=timeout, batch_size=batch_size,
                                 enabled=enabled, transactional=transactional,
                                 on_failure=on_failure, max_retry_interval=max_retry_interval,
                                 concurrency=concurrency,
                                 rate_limit=parse_rate_limit(rate_limit,
                                                             f"@processor({name!r}) rate_limit"),
                                 on=_events(on, f"@processor({name!r}) on"),
                                 schema=check_schema(schema, f"@processor({name!r}) schema"))
    for key, check in PROCESSOR_SETTINGS.items():
        check(getattr(settings, key), f"@processor({name!r}) {key}")
    _on_failure(on_failure, f"@processor({name!r}) on_failure")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        existing = _registry.get(name)
        if existing is not None and existing.fn is not fn and _qualname(existing.fn) != \
                _qualname(fn):
            raise ConfigError(f"processor {name!r} is registered twice ({_qualname(existing.fn)}"
                              f" and {_qualname(fn)}); give each processor its own name")
        _registry[name] = Processor(name, fn, settings)
        return fn

    return register


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def registered() -> dict[str, Processor]:
    return dict(_registry)


def lookup(name: str) -> Processor | None:
    """The registered processor `name`, without copying the registry (every enqueue
    asks, for its default retries)."""
    return _registry.get(name)


def import_modules(modules: Iterable[str]) -> None:
    """Import the modules that define processors; the current directory is importable."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ImportFailed(f"cannot import {module!r}: {type(exc).__name__}: {exc}; check "
                               "--import / imports and that the module is on the path") from None


def select(overrides: dict[str, dict[str, Any]], source: str,
           names: Iterable[str] | None = None) -> dict[str, Processor]:
    """The processors this worker runs: named ones (or all), with the config file's
    overrides applied, enabled ones only."""
    available = {name: p.configured(overrides.get(name)) for name, p in _registry.items()}
    for name in overrides:
        if name not in available:
            raise UnknownProcessor(f"{source}: [processors.{name}] names no registered "
                                   f"processor; registered: {_names(available)}")
    if names is not None:
        names = list(names)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise UnknownProcessor(f"unknown processor {', '.join(map(repr, unknown))}; "
                                   f"registered: {_names(available)} (is --import missing?)")
        available = {n: available[n] for n in names}
    return {n: p for n, p in available.items() if p.settings.enabled}


def _names(processors: dict[str, Processor]) -> str:
    return ", ".join(sorted(processors)) or "none"


# Settings a config file may override, with their checkers (also run on the decorator's).
MAX_RETRIES = 1_000_000
MAX_BATCH_SIZE = 10_000


def positive_int(value: Any, what: str, minimum: int = 0, maximum: int = 2**31 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(f"{what}: must be a whole number from {minimum} to {maximum}, "
                          f"got {value!r}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what}: must be true or false, got {value!r}")
    return value


def _backoff(value: Any, what: str) -> str:
    if value not in ("fixed", "exponential"):
        raise ConfigError(f"{what}: must be \"fixed\" or \"exponential\", got {value!r}")
    return value


def _duration(value: Any, what: str) -> timedelta:
    if isinstance(value, timedelta):
        return check_duration(value, what=what)
    return parse_duration(value, what=what)


def _optional_duration(value: Any, what: str) -> timedelta | None:
    return None if value in (None, "none", "") else _duration(value, what)


def _on_failure(value: Any, what: str) -> None:
    """on_failure runs on the worker's hooks thread, outside any event loop."""
    _callable_or_none(value, what)
    if inspect.iscoroutinefunction(value):
        raise ConfigError(f"{what}: must be a plain function, not an async def; make it a "
                          "def (it runs on a thread of its own), or enqueue an action for an "
                          "async processor from it")


def _callable_or_none(value: Any, what: str) -> Any:
    if value is not None and not callable(value):
        raise ConfigError(f"{what}: must be a function or None, got {value!r}")
    return value


def _optional_cap(value: Any, what: str) -> int | None:
    return None if value is None else positive_int(value, what, 1, 1_000_000)


def _events(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable) or \
            not all(isinstance(e, str) and e.strip() for e in value):
        raise ConfigError(f"{what}: must be a list of event names, e.g. on=[\"order.placed\"], "
                          f"got {value!r}")
    return tuple(value)


PROCESSOR_SETTINGS: dict[str, Callable[[Any, str], Any]] = {
    "retries": lambda v, w: positive_int(v, w, 0, MAX_RETRIES),
    "retry_interval": _duration,
    "max_retry_interval": _duration,
    "backoff": _backoff,
    "timeout": _optional_duration,
    "batch_size": lambda v, w: positive_int(v, w, 1, MAX_BATCH_SIZE),
    "enabled": _bool,
    "concurrency": _optional_cap,
    "rate_limit": parse_rate_limit,
}
