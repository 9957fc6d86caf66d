"""PostgreSQL helpers shared by every scenario: throwaway databases, the server's
durability settings (every figure is reported next to them) and WAL counters."""

from __future__ import annotations

import os
import platform
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent

DURABILITY_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "wal_level",
                       "wal_sync_method", "commit_delay", "shared_buffers", "autovacuum")


def libpq_url(url: str) -> str:
    """A plain postgresql:// URL (libpq, asyncpg) from a SQLAlchemy-style one."""
    scheme, rest = url.split("://", 1)
    return "postgresql://" + rest if scheme.startswith("postgres") else url


def sqlalchemy_url(url: str) -> str:
    return "postgresql+psycopg://" + libpq_url(url).split("://", 1)[1]


def with_dbname(url: str, dbname: str) -> str:
    return make_url(libpq_url(url)).set(database=dbname).render_as_string(hide_password=False)


@contextmanager
def fresh_database(admin_url: str, label: str) -> Iterator[str]:
    """A new, empty database for one measurement; dropped (forcibly) afterwards."""
    name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_dbname(admin_url, name)
    finally:
        with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(libpq_url(url), autocommit=True)


def scalar(url_or_conn: str | psycopg.Connection[Any], sql: str) -> Any:
    if isinstance(url_or_conn, str):
        with connect(url_or_conn) as conn:
            return scalar(conn, sql)
    row = url_or_conn.execute(sql).fetchone()
    return row[0] if row else None


def server_settings(url: str) -> dict[str, Any]:
    """Durability settings and version: figures mean nothing without them."""
    with connect(url) as conn:
        rows = conn.execute("SELECT name, current_setting(name) FROM pg_settings "
                            "WHERE name = ANY(%s)", [list(DURABILITY_SETTINGS)]).fetchall()
        settings: dict[str, Any] = dict(sorted(rows))
        settings["server_version"] = scalar(conn, "SHOW server_version")
    return settings


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "cpu": _cpu_model(),
            "asyncactions_commit": _git_commit()}  # last commit that touched the package


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--",
                              "asyncactions", "migrations"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def checkpoint(url: str) -> None:
    """Flush dirty pages before a timed phase, so the previous phase's checkpoint work
    does not land inside this one (the server's settings stay untouched)."""
    with connect(url) as conn:
        conn.execute("CHECKPOINT")


def wal_counters(url: str) -> dict[str, int]:
    """Cluster-wide WAL syncs and bytes (pg_stat_wal, PostgreSQL >= 14): how many
    fsyncs and how much WAL an action costs says where durable throughput goes."""
    with connect(url) as conn:
        row = conn.execute("SELECT wal_sync, wal_bytes FROM pg_stat_wal").fetchone()
    return {"wal_sync": int(row[0]), "wal_bytes": int(row[1])} if row else {}


def analyze(url: str, table: str) -> None:
    """What autovacuum would do after a bulk insert, given time (and if it is on)."""
    with connect(url) as conn:
        conn.execute(f"VACUUM ANALYZE {table}")
