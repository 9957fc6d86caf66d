"""Through PgBouncer in transaction mode (Debian's pgbouncer, started here on a loopback
port): the settings the README gives (`?prepare_threshold=none` in the URL,
`[worker] listen = false`) make enqueue, the worker, wait_for and the CLI work, and a
worker left listening says so, polls, and leaks no session settings to other clients.

The pooler has ONE server connection, so whatever one client leaves on its session,
every other client sees.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from asyncactions import Status, Worker, admin, init_action, init_actions, migrate, processor
from asyncactions.config import Config, WorkerSettings
from asyncactions.database import make_engine
from asyncactions.errors import ConfigError

from .conftest import ADMIN_URL, cli, free_port, wait_until, worker_thread

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@pytest.fixture(scope="module")
def bouncer_log() -> Iterator[Path]:
    """Where the module's PgBouncer logs (in a directory of its own)."""
    home = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    yield home / "pgbouncer.log"
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def bouncer(bouncer_log: Path) -> Iterator[int]:
    """A PgBouncer in transaction mode with one server connection; its port."""
    if not os.path.exists(PGBOUNCER):
        pytest.fail("pgbouncer is not installed: apt-get install pgbouncer (.ci/run does)")
    server = make_url(ADMIN_URL)
    port = free_port()
    home = bouncer_log.parent
    (home / "users.txt").write_text(f'"{server.username}" ""\n')
    (home / "pgbouncer.ini").write_text(f"""
[databases]
* = host={server.host} port={server.port or 5432}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {home / "users.txt"}
admin_users = {server.username}
pool_mode = transaction
default_pool_size = 1
max_client_conn = 100
ignore_startup_parameters = extra_float_digits,options
logfile = {bouncer_log}
""")
    as_user = []
    if os.geteuid() == 0:  # pgbouncer will not run as root
        as_user = ["-u", "postgres"]
        shutil.chown(home, "postgres")
    proc = subprocess.Popen([PGBOUNCER, *as_user, str(home / "pgbouncer.ini")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def answers() -> bool:
        try:
            psycopg.connect(f"postgresql://{server.username}@127.0.0.1:{port}/postgres",
                            connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return False

    wait_until(answers, what="pgbouncer to answer")
    yield port
    proc.terminate()
    proc.wait(10)


@pytest.fixture(autouse=True)
def pooler_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test here that fails shows what the pooler logged while it ran (a stalled or
    refused server login, a dropped client): the evidence is gone with the pooler."""
    if "bouncer" not in request.fixturenames:
        yield
        return
    log: Path = request.getfixturevalue("bouncer_log")
    start = log.stat().st_size if log.exists() else 0
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed and log.exists():  # shown with the failure
        lines = log.read_bytes()[start:].decode(errors="replace").splitlines()[-60:]
        print(f"--- pgbouncer's log while the test ran (last {len(lines)} lines) ---",
              *lines, sep="\n")


@pytest.fixture
def pooled(bouncer: int) -> Iterator[str]:
    """A new database, migrated through the pooler; its URL through the pooler."""
    name = f"asyncactions_pgb_{uuid.uuid4().hex[:8]}"
    admin_engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    server = make_url(ADMIN_URL)
    url = f"postgresql+psycopg://{server.username}@127.0.0.1:{bouncer}/{name}" \
          "?prepare_threshold=none"
    engine = make_engine(url)
    migrate.upgrade(engine)  # `db upgrade` through the pooler
    engine.dispose()
    yield url
    with admin_engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin_engine.dispose()


def settings_seen_by_another_client(url: str) -> tuple[str, str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return (conn.execute(text("SHOW synchronous_commit")).scalar_one(),
                    conn.execute(text("SHOW enable_seqscan")).scalar_one())
    finally:
        engine.dispose()


def zone_seen_by_another_client(url: str) -> str:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SHOW TimeZone")).scalar_one()
    finally:
        engine.dispose()


def test_enqueue_from_many_threads_works_through_the_pooler(pooled: str) -> None:
    engine = make_engine(pooled)
    failures: list[BaseException] = []

    def enqueue() -> None:
        try:
            for i in range(100):  # psycopg would prepare from the fifth on
                init_action(engine, "p", {"i": i})
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=enqueue) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    init_actions(engine, "p", [{}] * 2000)  # the COPY path too
    with engine.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM async_action")).scalar_one()
    engine.dispose()
    assert failures == []
    assert count == 2400


def test_a_poll_only_worker_drains_and_wait_for_returns_through_the_pooler(
        pooled: str) -> None:
    zones = set()

    @processor("pooled")
    def pooled_processor(action):
        zones.update(at.tzinfo for at in (action.created_at, action.started_at))
        return {"n": action.data["n"] * 2}

    zone_before = zone_seen_by_another_client(pooled)
    engine = make_engine(pooled)
    first = init_action(engine, "pooled", {"n": 21})
    poll_only = WorkerSettings(poll_interval=timedelta(milliseconds=50), listen=False)
    worker = Worker(config=Config(database_url=pooled, worker=poll_only))
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        done = admin.wait_for(engine, first.id, timeout=30)
        more = init_actions(engine, "pooled", [{"n": n} for n in range(50)])
        finals = [admin.wait_for(engine, a.id, timeout=30) for a in more]
    finally:
        worker.stop()
        thread.join(30)
    engine.dispose()
    assert (done.status, done.result) == (Status.COMPLETED, {"n": 42})
    assert {a.status for a in finals} == {Status.COMPLETED}
    assert settings_seen_by_another_client(pooled) == ("on", "on")
    # Its claims read UTC through the pooler too (psycopg's zone for a session in 'UTC'),
    # and the pooler kept that setting the worker's own.
    assert zones == {UTC}
    assert zone_seen_by_another_client(pooled) == zone_before != "UTC"


def test_a_listening_worker_behind_the_pooler_says_so_and_leaks_no_session_settings(
        pooled: str, caplog: pytest.LogCaptureFixture) -> None:
    @processor("listening")
    def listening(action):
        return None

    engine = make_engine(pooled)
    actions = init_actions(engine, "listening", [{}] * 20)
    settings = WorkerSettings(poll_interval=timedelta(milliseconds=50))  # listen = true
    with caplog.at_level(logging.WARNING, logger="asyncactions.claiming"):
        Worker(config=Config(database_url=pooled, worker=settings)).run(burst=True)
    statuses = {admin.get_action(engine, a.id).status for a in actions}
    engine.dispose()
    assert statuses == {Status.COMPLETED}
    assert "did not come back" in caplog.text and "listen = false" in caplog.text
    # The claim session's settings (asynchronous commit, no sequential scans) were never
    # set, so no other client of the pooler runs with them.
    assert settings_seen_by_another_client(pooled) == ("on", "on")


def test_a_worker_found_behind_the_pooler_does_not_probe_again_when_it_reconnects(
        bouncer: int, pooled: str, caplog: pytest.LogCaptureFixture) -> None:
    """Found behind a pooler once, the worker polls; a new claim connection (the pooler
    dropped its clients) is the same pooler: no second probe, nor its wait and warning."""
    @processor("reconnecting")
    def reconnecting(action):
        return None

    engine = make_engine(pooled)
    first = init_action(engine, "reconnecting", {})
    settings = WorkerSettings(poll_interval=timedelta(milliseconds=50))  # listen = true
    worker = Worker(config=Config(database_url=pooled, worker=settings))

    def warnings() -> int:
        return caplog.text.count("did not come back")

    try:
        with caplog.at_level(logging.WARNING, logger="asyncactions.claiming"), \
                worker_thread(worker, join=30) as thread:
            wait_until(lambda: admin.get_action(engine, first.id).status == Status.COMPLETED,
                       what="the first action")
            assert warnings() == 1
            name = make_url(pooled).database
            with psycopg.connect(f"postgresql://{make_url(ADMIN_URL).username}@127.0.0.1:"
                                 f"{bouncer}/pgbouncer", autocommit=True,
                                 cursor_factory=psycopg.ClientCursor) as console:
                console.execute(f"KILL {name}")  # every client connection to it dropped
                console.execute(f"RESUME {name}")
            second = init_action(engine, "reconnecting", {})
            # Claimed on a new claim connection, made (and probed, if at all) before it.
            wait_until(lambda: admin.get_action(engine, second.id).status == Status.COMPLETED,
                       what="the action enqueued after the reconnect")
    finally:
        engine.dispose()
    assert not thread.is_alive()
    assert warnings() == 1
    assert "claiming failed" in caplog.text  # the claim connection was indeed dropped


def test_a_direct_listening_worker_keeps_its_session_settings_and_does_not_warn(
        pg_database: str, caplog: pytest.LogCaptureFixture) -> None:
    """The control: without a pooler the check passes and nothing is said."""
    @processor("direct")
    def direct(action):
        return None

    engine = make_engine(pg_database)
    action = init_action(engine, "direct", {})
    settings = WorkerSettings(poll_interval=timedelta(milliseconds=50))
    with caplog.at_level(logging.WARNING, logger="asyncactions.claiming"):
        Worker(config=Config(database_url=pg_database, worker=settings)).run(burst=True)
    assert admin.get_action(engine, action.id).status == Status.COMPLETED
    engine.dispose()
    assert "did not come back" not in caplog.text


def test_every_cli_command_works_through_the_pooler(pooled: str, tmp_path: Path) -> None:
    (tmp_path / "jobs.py").write_text("from asyncactions import processor\n"
                                      "processor('cli_job')(lambda action: 'ok')\n")
    (tmp_path / "asyncactions.toml").write_text(
        'imports = ["jobs"]\n[worker]\nlisten = false\npoll_interval = "50ms"\n')
    env = {"ASYNCACTIONS_DATABASE_URL": pooled}
    commands = [
        ["db", "upgrade"], ["db", "current"],
        ["enqueue", "cli_job", "--data", '{"a": 1}'],
        ["worker", "--burst"],
        ["enqueue", "cli_job", "--delay", "1h"],
        ["list"], ["show", "1"], ["stats"], ["workers"], ["processors"], ["schedules"],
        ["cancel", "2"], ["retry", "2"], ["purge", "--older-than", "1d", "--dry-run"],
    ]
    for command in commands:
        result = cli(*command, cwd=tmp_path, env=env)
        assert result.returncode == 0, (command, result.stderr)
    engine = make_engine(pooled)
    assert admin.get_action(engine, 1).status == Status.COMPLETED
    assert admin.get_action(engine, 2).status == Status.PENDING  # canceled, then retried
    engine.dispose()


@pytest.mark.parametrize("value", ["0x", "-1", "sometimes"])
def test_a_prepare_threshold_that_is_neither_none_nor_a_count_is_one_line(value: str) -> None:
    with pytest.raises(ConfigError, match=r"prepare_threshold=.* must be none .* or a whole "
                                          "number"):
        make_engine(f"postgresql+psycopg://u:secret@127.0.0.1/db?prepare_threshold={value}")


def test_async_enqueue_and_wait_for_work_through_the_pooler(pooled: str) -> None:
    import asyncio

    from asyncactions import aio
    from asyncactions.database import make_async_engine

    async def scenario() -> tuple[int, list[int]]:
        engine = make_async_engine(pooled)
        try:
            async with engine.begin() as conn:
                for i in range(20):  # psycopg would prepare from the fifth on
                    await aio.init_action(conn, "pooled_async", {"i": i})
            many = await aio.init_actions(engine, "pooled_async", [{}] * 1500)  # COPY
            await aio.cancel(engine, many[0].id)
            done = await aio.wait_for(engine, many[0].id, timeout=30)
            return done.id, [a.id for a in many]
        finally:
            await engine.dispose()

    canceled, ids = asyncio.run(scenario())
    engine = make_engine(pooled)
    assert admin.get_action(engine, canceled).status == Status.CANCELED
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM async_action")).scalar_one() == 1520
    engine.dispose()
    assert len(ids) == 1500


def test_the_web_server_works_through_the_pooler(pooled: str, tmp_path: Path) -> None:
    from .web_server import serve

    with serve(pooled, tmp_path) as server, server.client() as api:
        init_action_engine = make_engine(pooled)
        init_action(init_action_engine, "via_web", {})  # known by its rows
        init_action_engine.dispose()
        for _ in range(10):  # past psycopg's prepare threshold on every connection
            created = api.post("/api/v1/actions", json={"processor": "via_web"})
            assert created.status_code == 202, created.text
            assert api.get(f"/api/v1/actions/{created.json()['id']}").status_code == 200
        listed = api.get("/api/v1/actions", params={"processor": "via_web"}).json()
        assert len(listed["actions"]) == 11
        assert api.get("/api/v1/stats").status_code == 200
        # No request failed on the server's side.
        assert "Traceback" not in (tmp_path / next(
            p.name for p in tmp_path.iterdir() if p.name.startswith("web-"))).read_text()
