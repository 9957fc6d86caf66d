"""Fixtures: a throwaway PostgreSQL database per test session and a fresh SQLite
file per test. Tests marked with the `db` fixture run once on each backend."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from asyncactions import migrate
from asyncactions import processors as registry
from asyncactions.database import make_engine

ADMIN_URL = os.environ.get("ASYNCACTIONS_TEST_PG_URL",
                           "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Db:
    """One backend under test: its URL and an engine of ours on it."""

    url: str
    engine: Engine

    @property
    def name(self) -> str:
        return self.engine.dialect.name

    def scalar(self, sql: str, **params: object) -> object:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def rows(self, sql: str, **params: object) -> list[tuple]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]


def _admin() -> Engine:
    return create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A database of its own on the local server, migrated, dropped at the end."""
    name = f"asyncactions_test_{uuid.uuid4().hex[:10]}"
    admin = _admin()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_database")
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE async_action, async_action_worker RESTART IDENTITY"))
    else:
        url = f"sqlite:///{tmp_path / 'asyncactions.db'}"
        engine = make_engine(url)
        migrate.upgrade(engine)
    yield Db(url, engine)
    engine.dispose()


@pytest.fixture
def pg(pg_database: str) -> Iterator[Db]:
    """PostgreSQL only, for features SQLite does not have (LISTEN/NOTIFY)."""
    engine = make_engine(pg_database)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE async_action, async_action_worker RESTART IDENTITY"))
    yield Db(pg_database, engine)
    engine.dispose()


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    """Processors registered by a test disappear after it."""
    before = dict(registry._registry)
    yield
    registry._registry.clear()
    registry._registry.update(before)


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real `asyncactions` command in a subprocess."""
    return subprocess.run([sys.executable, "-m", "asyncactions", *args], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
