"""Configuration: a TOML file (SPEC §6) plus environment and command-line overrides.

Every value is checked when loaded; a wrong key or value raises ConfigError with
one line naming the key and what is allowed.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from .durations import parse_duration
from .errors import ConfigError
from .processors import PROCESSOR_SETTINGS, positive_int
from .schedules import Schedule
from .schedules import parse as parse_schedule

EMBEDDED_DATABASE_URL = "sqlite:///asyncactions.db"
DEFAULT_CONFIG_PATHS = (Path("asyncactions.toml"), Path("config/asyncactions.toml"))

# Threads per worker process: far more than a process can use well.
MAX_CONCURRENCY = 10_000

def check_concurrency(value: int, what: str) -> int:
    """Threads per worker process: at least 1, at most MAX_CONCURRENCY."""
    return positive_int(value, what, 1, MAX_CONCURRENCY)


RETENTION: dict[str, timedelta | None] = {
    "completed": timedelta(days=7), "canceled": timedelta(days=7), "failed": timedelta(days=30)}


@dataclass(frozen=True)
class WorkerSettings:
    concurrency: int = 10
    poll_interval: timedelta = timedelta(seconds=1)
    lease: timedelta = timedelta(seconds=60)
    shutdown_grace: timedelta = timedelta(seconds=30)
    listen: bool = True  # false: poll only (PgBouncer in transaction mode has no LISTEN)


@dataclass(frozen=True)
class Config:
    database_url: str | None = None
    imports: tuple[str, ...] = ()
    max_data_bytes: int = 131072
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    # Per-processor overrides, already checked: {name: {setting: value}}.
    processors: dict[str, dict[str, Any]] = field(default_factory=dict)
    schedules: tuple[Schedule, ...] = ()
    # How long finished actions are kept, by status; None keeps them for ever.
    retention: dict[str, timedelta | None] = field(default_factory=lambda: dict(RETENTION))
    source: str = "defaults"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or EMBEDDED_DATABASE_URL

    def with_overrides(self, **changes: Any) -> Config:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _check_keys(table: dict[str, Any], allowed: set[str] | dict[str, Any], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}; "
                              f"allowed: {', '.join(sorted(allowed))}")


def _parse(raw: dict[str, Any], source: str) -> Config:
    _check_keys(raw, {"database_url", "imports", "max_data_bytes", "worker", "processors",
                      "schedules", "retention"}, source)
    url = raw.get("database_url")
    if url is not None and (not isinstance(url, str) or not url):
        raise ConfigError(f"{source}: database_url must be a URL string, got {url!r}")
    imports = raw.get("imports", [])
    if not isinstance(imports, list) or not all(isinstance(m, str) for m in imports):
        raise ConfigError(f"{source}: imports must be a list of module names, got {imports!r}")
    max_bytes = positive_int(raw.get("max_data_bytes", 131072), f"{source}: max_data_bytes", 1)

    worker_raw = raw.get("worker", {})
    if not isinstance(worker_raw, dict):
        raise ConfigError(f"{source}: [worker] must be a table")
    where = f"{source}: [worker]"
    _check_keys(worker_raw, WorkerSettings.__dataclass_fields__, where)
    worker = WorkerSettings()
    if "concurrency" in worker_raw:
        worker = replace(worker, concurrency=positive_int(
            worker_raw["concurrency"], f"{where} concurrency", 1, MAX_CONCURRENCY))
    if "listen" in worker_raw:
        if not isinstance(worker_raw["listen"], bool):
            raise ConfigError(f"{where} listen: must be true or false, got "
                              f"{worker_raw['listen']!r}")
        worker = replace(worker, listen=worker_raw["listen"])
    for key in ("poll_interval", "lease", "shutdown_grace"):
        if key in worker_raw:
            worker = replace(worker, **{key: parse_duration(worker_raw[key],
                                                            what=f"{where} {key}")})

    processors: dict[str, dict[str, Any]] = {}
    for name, table in raw.get("processors", {}).items():
        where = f"{source}: [processors.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        _check_keys(table, PROCESSOR_SETTINGS, where)
        processors[name] = {k: PROCESSOR_SETTINGS[k](v, f"{where} {k}") for k, v in table.items()}

    schedules = []
    for name, table in raw.get("schedules", {}).items():
        where = f"{source}: [schedules.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        schedules.append(parse_schedule(name, table, where))

    retention = dict(RETENTION)
    retention_raw = raw.get("retention", {})
    where = f"{source}: [retention]"
    if not isinstance(retention_raw, dict):
        raise ConfigError(f"{where} must be a table")
    _check_keys(retention_raw, RETENTION, where)
    for status, value in retention_raw.items():
        retention[status] = None if value == "forever" else parse_duration(
            value, what=f"{where} {status} (or \"forever\")")

    return Config(database_url=url, imports=tuple(imports), max_data_bytes=max_bytes,
                  worker=worker, processors=processors, schedules=tuple(schedules),
                  retention=retention, source=source)


def load_config(path: str | os.PathLike[str] | None = None,
                database_url: str | None = None) -> Config:
    """Read the config file (explicit path, ASYNCACTIONS_CONFIG, or a default location)
    and apply ASYNCACTIONS_DATABASE_URL and an explicit database_url on top."""
    path = path or os.environ.get("ASYNCACTIONS_CONFIG") or None
    if path is not None:
        chosen: Path | None = Path(path)
        if not chosen.is_file():
            raise ConfigError(f"config file {str(chosen)!r} does not exist; fix --config or "
                              "ASYNCACTIONS_CONFIG")
    else:
        chosen = next((p for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)

    config = Config()
    if chosen is not None:
        try:
            raw = tomllib.loads(chosen.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{chosen}: malformed TOML: {exc}") from None
        config = _parse(raw, str(chosen))
    env_url = os.environ.get("ASYNCACTIONS_DATABASE_URL") or None
    return config.with_overrides(database_url=database_url or env_url or config.database_url)
