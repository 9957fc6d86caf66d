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

from . import codec
from .durations import format_duration, parse_duration
from .errors import ConfigError, UnserializableData
from .processors import PROCESSOR_SETTINGS, positive_int
from .schedules import Schedule
from .schedules import parse as parse_schedule

EMBEDDED_DATABASE_URL = "sqlite:///asyncactions.db"
DEFAULT_CONFIG_PATHS = (Path("asyncactions.toml"), Path("config/asyncactions.toml"))

# Threads per worker process: far more than a process can use well.
MAX_CONCURRENCY = 10_000
# An action's encoded data: below MIN a small dict does not fit; above MAX a row gets
# too large to move around in one piece (PostgreSQL's own limit for a value is 255 MB).
DATA_BYTES_RANGE = (16, 64 * 1024 * 1024)

# The allowed range of each [worker] duration. A poll under 10ms is a busy loop; a lease
# under 1s is renewed (every lease/6) faster than a database hiccup lasts, so a healthy
# worker would lose its own actions; over 1h, a lost worker's actions wait that long.
WORKER_DURATIONS: dict[str, tuple[timedelta, timedelta]] = {
    "poll_interval": (timedelta(milliseconds=10), timedelta(hours=1)),
    "lease": (timedelta(seconds=1), timedelta(hours=1)),
    "shutdown_grace": (timedelta(0), timedelta(hours=1)),
}

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
    max_data_bytes: int = codec.MAX_DATA_BYTES
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


def check_concurrency(value: Any, what: str = "concurrency") -> int:
    """A worker's concurrency: a whole number from 1 to MAX_CONCURRENCY."""
    return positive_int(value, what, 1, MAX_CONCURRENCY)


def check_text(value: str, what: str) -> str:
    """Text the database can store (a command-line argument, say)."""
    try:
        codec.check_text(value, what)
    except UnserializableData as exc:
        raise ConfigError(str(exc)) from None
    return value


def check_payload(value: Any, what: str, max_bytes: int) -> str:
    """Data given as a value (schedule data, --data): what init_action would store;
    returns its encoding."""
    try:
        return codec.dumps(value, what=what, max_bytes=max_bytes)
    except UnserializableData as exc:
        raise ConfigError(str(exc)) from None


def _table(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table ([{key}] or [{key}.NAME]), got {value!r}")
    return value


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
    max_bytes = positive_int(raw.get("max_data_bytes", codec.MAX_DATA_BYTES),
                             f"{source}: max_data_bytes", *DATA_BYTES_RANGE)

    where = f"{source}: [worker]"
    worker_raw = _table(raw, "worker", where)
    _check_keys(worker_raw, WorkerSettings.__dataclass_fields__, where)
    worker = WorkerSettings()
    if "concurrency" in worker_raw:
        worker = replace(worker, concurrency=check_concurrency(worker_raw["concurrency"],
                                                               f"{where} concurrency"))
    if "listen" in worker_raw:
        if not isinstance(worker_raw["listen"], bool):
            raise ConfigError(f"{where} listen: must be true or false, got "
                              f"{worker_raw['listen']!r}")
        worker = replace(worker, listen=worker_raw["listen"])
    for key, (low, high) in WORKER_DURATIONS.items():
        if key in worker_raw:
            what = f"{where} {key}"
            value = parse_duration(worker_raw[key], what=what)
            if not low <= value <= high:
                raise ConfigError(f"{what}: must be from {format_duration(low)} to "
                                  f"{format_duration(high)}, got {worker_raw[key]!r}")
            worker = replace(worker, **{key: value})

    processors: dict[str, dict[str, Any]] = {}
    for name, table in _table(raw, "processors", f"{source}: [processors]").items():
        where = f"{source}: [processors.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        _check_keys(table, PROCESSOR_SETTINGS, where)
        processors[name] = {k: PROCESSOR_SETTINGS[k](v, f"{where} {k}") for k, v in table.items()}

    schedules = []
    for name, table in _table(raw, "schedules", f"{source}: [schedules]").items():
        where = f"{source}: [schedules.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        schedule = parse_schedule(name, table, where)
        check_payload(schedule.data, f"{where} data", max_bytes)
        schedules.append(schedule)

    retention = dict(RETENTION)
    where = f"{source}: [retention]"
    retention_raw = _table(raw, "retention", where)
    _check_keys(retention_raw, RETENTION, where)
    for status, value in retention_raw.items():
        retention[status] = None if value == "forever" else parse_duration(
            value, what=f"{where} {status} (or \"forever\")")

    return Config(database_url=url, imports=tuple(imports), max_data_bytes=max_bytes,
                  worker=worker, processors=processors, schedules=tuple(schedules),
                  retention=retention, source=source)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        return tomllib.loads(content.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); TOML files are "
                          "UTF-8: save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: malformed TOML: nested too deeply") from None


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
        raw = _read_toml(chosen)
        config = _parse(raw, str(chosen))
    env_url = os.environ.get("ASYNCACTIONS_DATABASE_URL") or None
    return config.with_overrides(database_url=database_url or env_url or config.database_url)
