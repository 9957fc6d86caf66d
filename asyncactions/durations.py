"""Durations as people write them ('500ms', '30s', '5m', '2h', '7d'), with one bound.

A leaf module: config, processors and schedules all read durations.
"""

from __future__ import annotations

import re
from datetime import timedelta

from .errors import ConfigError

# The longest delay, interval or retention asyncactions accepts. Far beyond any real
# use, and well inside what both databases can store and read back: a timestamp past
# the year 9999 commits on PostgreSQL but psycopg cannot read it again.
MAX_DURATION = timedelta(days=3650)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | timedelta, *, what: str = "duration") -> timedelta:
    """'500ms', '30s', '5m', '2h', '7d' -> timedelta, at most MAX_DURATION."""
    if isinstance(value, timedelta):
        return check_duration(value, what=what)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{what}: {value!r} is not a duration; write it like 500ms, 30s, 5m, "
                          "2h or 7d")
    seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
    if seconds > MAX_DURATION.total_seconds():
        raise ConfigError(f"{what}: {value!r} is longer than the maximum of "
                          f"{format_duration(MAX_DURATION)}")
    return timedelta(seconds=seconds)


def check_duration(value: timedelta, *, what: str = "duration") -> timedelta:
    """A timedelta given in Python: not negative, at most MAX_DURATION."""
    if value < timedelta(0) or value > MAX_DURATION:
        raise ConfigError(f"{what}: {value} is outside 0s..{format_duration(MAX_DURATION)}")
    return value


def format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"
