"""SPEC §4 command line, run as a real process: migrations, enqueue, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from asyncactions import init_action, migrate

from .conftest import ROOT, Db, cli, track


def env_for(db: Db) -> dict[str, str]:
    return {"ASYNCACTIONS_DATABASE_URL": db.url}


def test_db_upgrade_current_downgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert "no database file" in cli("--database-url", url, "db", "current").stderr
    up = cli("--database-url", url, "db", "upgrade")
    head = migrate.head()
    assert up.returncode == 0 and f"is at revision {head}" in up.stdout
    assert cli("--database-url", url, "db", "current").stdout.strip() == head
    assert "is at revision 0001" in cli("--database-url", url, "db", "downgrade", "0001").stdout
    assert "(newest: " in cli("--database-url", url, "db", "current").stdout
    down = cli("--database-url", url, "db", "downgrade", "base")
    assert down.returncode == 0 and "is at revision base" in down.stdout
    assert "base" in cli("--database-url", url, "db", "current").stdout


def test_db_sql_prints_ddl_for_a_dba() -> None:
    pg = cli("db", "sql", "--dialect", "postgresql").stdout
    assert "CREATE TABLE async_action (" in pg and "JSONB" in pg
    assert "WHERE status = 'pending'" in pg and "fillfactor" in pg
    assert "asyncactions_alembic_version" in pg
    assert "CREATE TABLE async_action (" in cli("db", "sql", "--dialect", "sqlite").stdout


def test_enqueue_and_show(db: Db, tmp_path: Path) -> None:
    init_action(db.engine, "send_welcome_email", {})  # makes the name known
    out = cli("enqueue", "send_welcome_email", "--data", '{"user_id": 42}', "--related-id",
              "user:42", "--delay", "5m", "--priority", "2", env=env_for(db))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ASYNC-00000002"
    shown = cli("show", "ASYNC-00000002", "--format", "json", env=env_for(db))
    fields = json.loads(shown.stdout)
    assert fields["data"] == {"user_id": 42} and fields["related_id"] == "user:42"
    assert fields["priority"] == 2 and fields["status"] == "pending"
    assert cli("show", "2", env=env_for(db)).returncode == 0


PROCS = textwrap.dedent("""
    from asyncactions import processor, PermanentFailure

    @processor("echo")
    def echo(action):
        return {"echo": action.data}

    @processor("refuse")
    def refuse(action):
        raise PermanentFailure("refused on purpose")
""")


def test_enqueue_wait_prints_the_result_and_exit_code_follows_the_outcome(
        db: Db, tmp_path: Path) -> None:
    (tmp_path / "procs.py").write_text(PROCS)
    env = env_for(db)
    worker = track(subprocess.Popen([sys.executable, "-m", "asyncactions", "worker",
                                     "--import", "procs"], cwd=tmp_path,
                                    stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "PYTHONPATH": str(ROOT), **env}))
    try:
        ok = cli("enqueue", "echo", "--import", "procs", "--data", '{"a": 1}', "--wait",
                 "--timeout", "30s", cwd=tmp_path, env=env)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.splitlines()[1:] == ["ASYNC-00000001 completed", '{"echo":{"a":1}}']
        bad = cli("enqueue", "refuse", "--import", "procs", "--wait", cwd=tmp_path, env=env)
        assert bad.returncode == 1
        assert "failed: PermanentFailure: refused on purpose" in bad.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "stopping gracefully" in err


def test_enqueue_wait_times_out_with_its_own_exit_code(db: Db, tmp_path: Path) -> None:
    init_action(db.engine, "nobody_runs_this", {})
    out = cli("enqueue", "nobody_runs_this", "--wait", "--timeout", "300ms", env=env_for(db))
    assert out.returncode == 3
    assert "still pending after 0.3s" in out.stderr


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unknown_processor_names_are_refused_and_nothing_is_enqueued(db: Db) -> None:
    line = one_line_error(cli("enqueue", "no_such_processor", env=env_for(db)))
    assert "unknown processor 'no_such_processor'" in line
    assert db.scalar("SELECT count(*) FROM async_action") == 0
    line = one_line_error(cli("worker", "--processors", "nope", "--burst", "--import",
                              "examples.shop", cwd=ROOT, env=env_for(db)))
    assert "unknown processor 'nope'" in line and "send_welcome_email" in line


def test_malformed_config_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "asyncactions.toml").write_text("[worker\nconcurrency = 1\n")
    line = one_line_error(cli("db", "current", cwd=tmp_path))
    assert "asyncactions.toml: malformed TOML" in line
    (tmp_path / "asyncactions.toml").write_text("[worker]\nconcurrency = 0\n")
    line = one_line_error(cli("db", "current", cwd=tmp_path))
    assert "[worker] concurrency: must be a whole number from 1 to 10000, got 0" in line


def test_unreachable_database_is_one_line() -> None:
    line = one_line_error(cli("--database-url", "postgresql://nobody@127.0.0.1:1/none",
                              "db", "upgrade"))
    assert "127.0.0.1:1" in line and "server is running" in line
    line = one_line_error(cli("--database-url", "mysql://x/y", "db", "current"))
    assert "unsupported backend 'mysql'" in line


def test_module_that_does_not_import_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import does_not_exist\n")
    line = one_line_error(cli("worker", "--import", "broken", "--burst", cwd=tmp_path))
    assert "cannot import 'broken': ModuleNotFoundError" in line


def test_bad_options_are_one_line(tmp_path: Path) -> None:
    assert "is not a duration" in one_line_error(cli("enqueue", "x", "--delay", "soon"))
    assert "not valid JSON" in one_line_error(cli("enqueue", "x", "--data", "{oops"))
    assert "No such command" in one_line_error(cli("frobnicate"))
    assert "0 is not in the range" in one_line_error(cli("worker", "--concurrency", "0"))


def test_postgres_without_schema_says_to_upgrade(pg_database: str) -> None:
    from sqlalchemy import create_engine

    from .conftest import ADMIN_URL
    name = "asyncactions_test_noschema"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = pg_database.rsplit("/", 1)[0] + "/" + name
        line = one_line_error(cli("--database-url", url, "worker", "--import",
                                  "examples.shop", "--burst", cwd=ROOT))
        assert "run `asyncactions db upgrade` first" in line
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_the_worker_command_keeps_start_up_objects_out_of_the_collector(
        db: Db, tmp_path: Path) -> None:
    (tmp_path / "gc_state.py").write_text(textwrap.dedent("""
        import gc
        from asyncactions import processor

        @processor("gc_state")
        def gc_state(action):
            return {"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()[0]}
    """))
    init_action(db.engine, "gc_state", {})
    run = cli("worker", "--import", "gc_state", "--burst", cwd=tmp_path, env=env_for(db))
    assert run.returncode == 0, run.stderr
    seen = json.loads(db.scalar("SELECT CAST(result AS TEXT) FROM async_action"))
    assert seen["frozen"] > 10_000  # the modules' objects, at least
    assert seen["threshold"] == 10_000


def test_readme_quickstart_runs_the_example_on_the_embedded_default(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {"ASYNCACTIONS_DATABASE_URL": "", "ASYNCACTIONS_CONFIG": ""}
    seed = subprocess.run([sys.executable, "-m", "examples.shop"], cwd=tmp_path,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert seed.returncode == 0, seed.stderr
    started = time.monotonic()
    run = cli("worker", "--import", "examples.shop", "--burst", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - started < 60
    assert "Welcome email sent to ada@example.com" in run.stdout
    assert "invoice for 19.90 EUR synced" in run.stdout
    assert (tmp_path / "asyncactions.db").exists()
    import sqlite3
    statuses = dict(sqlite3.connect(tmp_path / "asyncactions.db").execute(
        "SELECT status, count(*) FROM async_action GROUP BY status").fetchall())
    assert statuses == {"completed": 8, "failed": 1}  # the order without an email


@pytest.fixture(autouse=True)
def _no_stray_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASYNCACTIONS_CONFIG", raising=False)
    monkeypatch.delenv("ASYNCACTIONS_DATABASE_URL", raising=False)
