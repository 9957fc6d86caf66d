"""Periodic actions: `[schedules.NAME]` with `cron` (5 fields, in a timezone) or `every`.

Every worker runs every schedule on its APScheduler, and each fire time is enqueued
once whatever the number of workers: a fire time is enqueued only by the worker whose
update moves the schedule's `last_fire_at` forward to it, in the same transaction.
Fire times are a pure function of the schedule (cron in its timezone; `every` on a
grid from a fixed epoch), so all workers agree on them. After downtime, only the most
recent missed fire time is enqueued: no flood.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from .durations import format_duration, parse_duration
from .errors import ConfigError

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
# The shortest `every`: each fire is a transaction on the schedule's row and an insert.
MIN_EVERY = timedelta(seconds=1)
CATCH_UP_WINDOW = timedelta(days=7)  # how far back a missed cron fire is looked for
MAX_CATCH_UP = 10  # missed fire times enqueued at most, the newest


@dataclass(frozen=True)
class Schedule:
    name: str
    processor: str
    data: Any = None
    cron: str | None = None
    every: timedelta | None = None
    timezone: str = "UTC"

    def trigger(self) -> BaseTrigger:
        if self.every is not None:
            return IntervalTrigger(seconds=self.every.total_seconds(), start_date=EPOCH,
                                   timezone=UTC)
        return CronTrigger.from_crontab(self.cron or "", timezone=ZoneInfo(self.timezone))

    def next_fire_after(self, moment: datetime) -> datetime:
        """The first fire time strictly after `moment`."""
        if self.every is not None:
            step = self.every.total_seconds()
            return EPOCH + timedelta(seconds=((moment - EPOCH).total_seconds() // step + 1)
                                     * step)
        fire = self.trigger().get_next_fire_time(None, moment + timedelta(microseconds=1))
        assert fire is not None, "a cron expression always fires again"
        return fire.astimezone(UTC)

    def due_fires(self, after: datetime, now: datetime,
                  limit: int = MAX_CATCH_UP) -> list[datetime]:
        """The fire times in (after, now], oldest first; only the newest `limit` of them:
        a schedule missed for a short while (a leader failing over) misses no fire, and
        one missed for long does not flood the queue."""
        if self.every is not None:
            step = self.every.total_seconds()
            latest = EPOCH + timedelta(seconds=((now - EPOCH).total_seconds() // step) * step)
            fires = [latest - timedelta(seconds=step * k) for k in range(limit)]
            return [f for f in reversed(fires) if f > after]
        found: deque[datetime] = deque(maxlen=limit)
        fire = self.next_fire_after(max(after, now - CATCH_UP_WINDOW))
        while fire <= now:
            found.append(fire)
            fire = self.next_fire_after(fire)
        return list(found)


def parse(name: str, table: dict[str, Any], where: str) -> Schedule:
    """One [schedules.NAME] table, checked; errors name the key."""
    allowed = {"processor", "cron", "every", "data", "timezone"}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: "
                          f"{', '.join(sorted(allowed))}")
    processor = table.get("processor")
    if not isinstance(processor, str) or not processor:
        raise ConfigError(f"{where}: processor is required: the name of the processor to "
                          "enqueue for")
    if ("cron" in table) == ("every" in table):
        raise ConfigError(f"{where}: give exactly one of cron = \"0 2 * * *\" or "
                          "every = \"30s\"")
    timezone = table.get("timezone", "UTC")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        raise ConfigError(f"{where} timezone: {timezone!r} is not a known timezone; use a "
                          "name like \"UTC\" or \"Europe/Paris\"") from None
    every = None
    if "every" in table:
        every = parse_duration(table["every"], what=f"{where} every")
        if every < MIN_EVERY:
            raise ConfigError(f"{where} every: must be at least {format_duration(MIN_EVERY)}, "
                              f"got {table['every']!r}")
    cron = table.get("cron")
    how = "write 5 fields: minute hour day month weekday, e.g. \"0 2 * * *\""
    if cron is not None and not isinstance(cron, str):
        raise ConfigError(f"{where} cron: must be a string, got {cron!r}; {how}")
    schedule = Schedule(name, processor, table.get("data"), cron, every, timezone)
    if cron is not None:
        try:
            trigger = schedule.trigger()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where} cron: {cron!r} is not a cron expression ({exc}); "
                              f"{how}") from None
        if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
            raise ConfigError(f"{where} cron: {cron!r} never fires (no such date); {how}")
    return schedule
