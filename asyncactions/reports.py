"""What the CLI's listings and the HTTP API both answer: one function per report, so
`asyncactions show ID --format json` and `GET /api/v1/actions/ID` cannot drift apart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from . import admin, audit
from . import processors as registry
from .action import Action
from .config import Config
from .durations import format_duration
from .output import Ratio

FIELDS = Action._fields


# Human output of retries NULL: set from the processor's settings when a worker first
# claims it (machine formats keep the null).
UNSET_RETRIES = "(processor's)"


def record(action: Action, *, human: bool = False) -> dict[str, Any]:
    """Every field of an action; `human` shows the id as ASYNC-00000042 and retries not
    yet set as the processor's."""
    fields = {f: getattr(action, f) for f in FIELDS}
    if not human:
        return fields
    retries = UNSET_RETRIES if action.retries is None else action.retries
    return {**fields, "id": action.display_id, "retries": retries}


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


PROCESSOR_COLUMNS = ("name", "state", "retries", "retry_interval", "backoff",
                     "max_retry_interval", "timeout", "batch_size", "enabled", "transactional",
                     "concurrency", "rate_limit", "paused_at", "paused_by", "overridden",
                     "served")
QUEUE_COLUMNS = ("state", "paused_at", "paused_by", "served")  # known only with a database
NOT_SERVED = "no worker serves this"


def processors(config: Config, imports: tuple[str, ...] = (), *,
               engine: Engine | None = None) -> list[dict[str, Any]]:
    """Registered processors with their effective settings (decorator, then config).
    With `engine` (a database with the schema), also each one's pause state and whether
    a live worker serves it, and the processors this program does not register that are
    paused or have pending actions."""
    registry.import_modules([*config.imports, *imports])
    registry.select(config.processors, config.source)  # validates [processors.*] names
    paused = admin.processor_states(engine) if engine is not None else {}
    rows = []
    for name, proc in sorted(registry.registered().items()):
        s = proc.configured(config.processors.get(name)).settings
        pause = paused.get(name)
        rows.append({"name": name, "state": _state(pause), "retries": s.retries,
                     "retry_interval": format_duration(s.retry_interval),
                     "backoff": s.backoff,
                     "max_retry_interval": format_duration(s.max_retry_interval),
                     "timeout": format_duration(s.timeout) if s.timeout else None,
                     "batch_size": s.batch_size, "enabled": s.enabled,
                     "transactional": s.transactional, "concurrency": s.concurrency,
                     "rate_limit": str(s.rate_limit) if s.rate_limit else None,
                     "paused_at": pause.paused_at if pause else None,
                     "paused_by": pause.paused_by if pause else None,
                     "overridden": ",".join(sorted(config.processors.get(name, {})))})
    if engine is None:
        return rows
    rows += [{"name": name, "state": _state(p), "paused_at": p.paused_at,
              "paused_by": p.paused_by} for name, p in sorted(paused.items())
             if p.paused and name not in registry.registered()]
    serving = audit.serving(engine, config.worker.lease)
    listed = {row["name"] for row in rows}
    rows += [{"name": name} for name in serving.unserved if name not in listed]
    for row in rows:
        row["served"] = _served(serving, row["name"])
    return rows


def _state(pause: admin.ProcessorState | None) -> str:
    return "paused" if pause is not None and pause.paused else "running"


def _served(serving: audit.Serving, name: str) -> str:
    if name in serving.served:
        return "yes"
    pending = serving.unserved.get(name)
    if not pending:
        return NOT_SERVED
    return f"{NOT_SERVED} ({pending} pending action{'' if pending == 1 else 's'})"


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
                          imports: tuple[str, ...] = ()) -> None:
    """Producers need not import processors, so a name is known if it is registered here
    (after importing the config's and these modules), or known to the queue."""
    registry.import_modules([*config.imports, *imports])
    admin.check_processor_known(engine, name)
