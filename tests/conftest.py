"""Fixtures: a throwaway PostgreSQL database per test session and a fresh SQLite
file per test. Tests marked with the `db` fixture run once on each backend."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from asyncactions import Worker, migrate, processor
from asyncactions import processors as registry
from asyncactions.config import Config, WorkerSettings
from asyncactions.database import make_engine
from bench.chaos.harness import Cluster
from bench.chaos.harness import cluster as throwaway_cluster

ADMIN_URL = os.environ.get("ASYNCACTIONS_TEST_PG_URL",
                           "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parent.parent
TRUNCATE = ("TRUNCATE async_action, async_action_worker, async_action_schedule, async_action_rule, "
            "async_action_start, async_action_processor "
            "RESTART IDENTITY")


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


FAST = WorkerSettings(poll_interval=timedelta(milliseconds=50))


def worker_config(db: Db, **kw: Any) -> Config:
    """A config for in-process workers on `db` that poll every 50 ms."""
    return Config(database_url=db.url, **{"worker": FAST, **kw})


def drain(db: Db, concurrency: int = 4, **kw: Any) -> None:
    """Run a burst worker in this process until nothing is eligible."""
    Worker(config=worker_config(db, **kw), concurrency=concurrency).run(burst=True)


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    """The kind of processor a behavioural test registers (see processor_of)."""
    return request.param


def processor_of(kind: str, name: str, **settings: Any
                 ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """@processor(name, **settings) for a test's processor body: as written ("sync"),
    or ("async") as an `async def` that yields to the worker's event loop and then runs
    the same body, so one behavioural test checks both kinds."""

    def register(body: Callable[..., Any]) -> Callable[..., Any]:
        if kind == "sync":
            return processor(name, **settings)(body)

        async def run(*args: Any) -> Any:
            await asyncio.sleep(0)
            return body(*args)

        run.__qualname__ = body.__qualname__
        return processor(name, **settings)(run)

    return register


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


@dataclass
class Installed:
    """The built wheel, installed into a fresh virtualenv of its own."""

    wheel: Path
    venv: Path

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name

    def run(self, *args: str | Path, cwd: Path, env: dict[str, str] | None = None,
            ok: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command with only the virtualenv's programs on PATH (no source tree)."""
        result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True,
                                text=True, timeout=600,
                                env={"PATH": f"{self.venv / 'bin'}:/usr/bin:/bin",
                                     "HOME": str(Path.home()), **(env or {})})
        if ok:
            assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
        return result


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """One wheel build and one virtualenv per test session, shared by the tests that
    check what users install."""
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(base / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = (base / "dist").glob("asyncactions-*.whl")
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=600)
    subprocess.run([str(env_dir / "bin" / "pip"), "install", "--quiet", str(wheel)],
                   check=True, capture_output=True, timeout=600)
    return Installed(wheel, env_dir)


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest) -> Db:
    return request.getfixturevalue("pg" if request.param == "postgresql" else "sqlite")


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Db]:
    """SQLite only: a migrated database file of the test's own."""
    url = f"sqlite:///{tmp_path / 'asyncactions.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    yield Db(url, engine)
    engine.dispose()


@pytest.fixture
def ledger(db: Db) -> Iterator[Db]:
    """The application's own table, in the same database (transactional processors
    write to it)."""
    with db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE ledger (action_id integer, attempt integer)"))
    yield db
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE ledger"))


@pytest.fixture
def pg(pg_database: str) -> Iterator[Db]:
    """PostgreSQL only, for features SQLite does not have (LISTEN/NOTIFY)."""
    engine = make_engine(pg_database)
    with engine.begin() as conn:
        conn.execute(text(TRUNCATE))
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


@contextmanager
def worker_thread(worker: Worker, join: float = 10) -> Iterator[threading.Thread]:
    """`worker` running on a thread of its own for the block; stopped and joined after
    (the caller asserts the thread ended)."""
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        yield thread
    finally:
        worker.stop()
        thread.join(join)


def wait_until(condition, timeout: float = 60, interval: float = 0.02, what: str = "") -> float:
    """Poll `condition` until it is true; return the seconds it took. Fails at the deadline."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)
    return time.monotonic() - start


def index_scans(conn: Any, sql: str, args: Any, index: str) -> list[dict[str, Any]]:
    """The plan nodes of `sql` that scan `index`, by EXPLAIN (ANALYZE, BUFFERS) on a
    psycopg connection, rolled back: what a statement really read, not what it would."""
    with conn.transaction(force_rollback=True):
        (plan,), = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, args)
    if isinstance(plan, str):
        plan = json.loads(plan)

    def scans(node: dict[str, Any]) -> list[dict[str, Any]]:
        found = [node] if node.get("Index Name") == index else []
        return found + [s for child in node.get("Plans", []) for s in scans(child)]
    return scans(plan[0]["Plan"])


def plans_sent_here(conn: Any) -> list[dict[str, Any]]:
    """From now on, each statement `conn` (a SQLAlchemy Connection on PostgreSQL) runs,
    with its plan as the server ran it, buffers read included ({"Query Text", "Plan"}):
    auto_explain, sent to this client as notices. A prepared statement's generic plan
    shows here, which EXPLAIN cannot show."""
    for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                    "SET auto_explain.log_analyze = on", "SET auto_explain.log_buffers = on",
                    "SET auto_explain.log_format = json",
                    "SET auto_explain.log_level = notice"):
        conn.exec_driver_sql(setting)
    plans: list[dict[str, Any]] = []

    def on_notice(notice: Any) -> None:
        if "plan:" in notice.message_primary:
            plans.append(json.loads(notice.message_primary.split("plan:", 1)[1]))
    conn.connection.driver_connection.add_notice_handler(on_notice)
    return plans


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    """A plan node and every node below it."""
    return [node, *(n for child in node.get("Plans", []) for n in plan_nodes(child))]


_started: list[subprocess.Popen[str]] = []


def track(process: subprocess.Popen[str]) -> subprocess.Popen[str]:
    """Kill `process` (and its process group, if it leads one) when the test ends."""
    _started.append(process)
    return process


@pytest.fixture(autouse=True)
def reap_workers() -> Iterator[None]:
    """A test that fails half-way leaves no worker process behind."""
    yield
    while _started:
        process = _started.pop()
        if process.poll() is None:
            if os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait()


def start_worker(cwd: Path, database_url: str, *args: str) -> subprocess.Popen[str]:
    """A real worker process; its config is cwd/asyncactions.toml when present and its
    log goes to cwd/worker-PID.log (`worker_log(process)` reads it)."""
    with tempfile.NamedTemporaryFile("w", dir=cwd, prefix="worker-", suffix=".log",
                                     delete=False) as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "asyncactions", "worker", *args], cwd=cwd, text=True,
            stderr=log, stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{cwd}",
                 "ASYNCACTIONS_DATABASE_URL": database_url})
    process.log_path = Path(log.name)  # type: ignore[attr-defined]
    return track(process)


def worker_log(process: subprocess.Popen[str]) -> str:
    return process.log_path.read_text()  # type: ignore[attr-defined]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL server of our own, to restart at will (the chaos suite's)."""
    with throwaway_cluster() as server:
        yield server


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
