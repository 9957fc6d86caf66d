"""What the CLI's listings and the HTTP API both answer: one function per report, so
`asyncactions show ID --format json` and `GET /api/v1/actions/ID` cannot drift apart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, select

from . import audit
from . import processors as registry
from .action import Action
from .config import Config
from .durations import format_duration
from .errors import UnknownProcessor
from .output import Ratio
from .schema import async_action, async_action_worker

FIELDS = Action._fields


def record(action: Action, *, human: bool = False) -> dict[str, Any]:
    """Every field of an action; `human` shows the id as ASYNC-00000042."""
    fields = {f: getattr(action, f) for f in FIELDS}
    return {**fields, "id": action.display_id} if human else fields


def show(action: Action, now: datetime, *, human: bool = False) -> dict[str, Any]:
    """What `show` prints: every field, then how long it queued and ran."""
    return {**record(action, human=human), **audit.timings(action, now)}


def stats(engine: Engine, since: timedelta) -> list[dict[str, Any]]:
    """Per processor over the window: counts, rates, run times, top errors."""
    return [{"processor": s.processor, "total": s.total, **s.counts,
             "success_rate": _ratio(s.success_rate), "retry_rate": _ratio(s.retry_rate),
             "mean_run_time": s.mean_run_time, "p95_run_time": s.p95_run_time,
             "top_errors": [{"error": e, "count": n} for e, n in s.top_errors]}
            for s in audit.stats(engine, since)]


def _ratio(value: float | None) -> Ratio | None:
    return None if value is None else Ratio(value)


PROCESSOR_COLUMNS = ("name", "retries", "retry_interval", "backoff", "max_retry_interval",
                     "timeout", "batch_size", "enabled", "transactional", "overridden")


def processors(config: Config, imports: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Registered processors with their effective settings (decorator, then config)."""
    registry.import_modules([*config.imports, *imports])
    registry.select(config.processors, config.source)  # validates [processors.*] names
    rows = []
    for name, proc in sorted(registry.registered().items()):
        s = proc.configured(config.processors.get(name)).settings
        rows.append({"name": name, "retries": s.retries,
                     "retry_interval": format_duration(s.retry_interval),
                     "backoff": s.backoff,
                     "max_retry_interval": format_duration(s.max_retry_interval),
                     "timeout": format_duration(s.timeout) if s.timeout else None,
                     "batch_size": s.batch_size, "enabled": s.enabled,
                     "transactional": s.transactional,
                     "overridden": ",".join(sorted(config.processors.get(name, {})))})
    return rows


SCHEDULE_COLUMNS = ("name", "processor", "when", "timezone", "next_fire", "data")


def schedules(config: Config) -> list[dict[str, Any]]:
    """Configured schedules and when each fires next."""
    now = datetime.now(UTC)
    rows = []
    for s in config.schedules:
        fire = s.next_fire_after(now)
        rows.append({"name": s.name, "processor": s.processor,
                     "when": f"cron {s.cron}" if s.cron else f"every {format_duration(s.every)}",
                     "timezone": s.timezone,
                     "next_fire": fire.astimezone(ZoneInfo(s.timezone)).isoformat(),
                     "data": s.data})
    return rows


WORKER_COLUMNS = ("id", "hostname", "pid", "processors", "started_at", "heartbeat_at",
                  "heartbeat_age", "running")


def workers(engine: Engine) -> list[dict[str, Any]]:
    return [vars(w) for w in audit.workers(engine)]


def check_processor_known(config: Config, engine: Engine, name: str,
                          imports: tuple[str, ...] = (), *, hint: str = "") -> None:
    """Producers need not import processors, so a name is known if it is registered here,
    run by a live worker, or already in the table."""
    registry.import_modules([*config.imports, *imports])
    known = set(registry.registered())
    with engine.connect() as conn:
        for (listed,) in conn.execute(select(async_action_worker.c.processors)):
            known.update(listed.split(","))
        if name not in known:
            known.update(conn.execute(select(async_action.c.processor).distinct()).scalars())
    if name not in known:
        raise UnknownProcessor(f"unknown processor {name!r}; known: "
                               f"{', '.join(sorted(known)) or 'none'}{hint}")
