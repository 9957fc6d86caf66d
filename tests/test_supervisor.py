"""`worker --processes N`: several worker processes, restarted when one dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from asyncactions import init_actions

from .conftest import ROOT, Db, track, wait_until

SLOW = textwrap.dedent("""
    import time
    from asyncactions import processor

    @processor("slow")
    def slow(action):
        time.sleep(0.01)
""")


def supervise(tmp_path: Path, db: Db, *args: str) -> subprocess.Popen[str]:
    (tmp_path / "jobs.py").write_text(SLOW)
    # Its own process group, so a failed test can kill the supervisor and its children.
    return track(subprocess.Popen(
        [sys.executable, "-m", "asyncactions", "worker", "--import", "jobs", "--processes",
         "2", "--concurrency", "4", *args], cwd=tmp_path, text=True, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}",
             "ASYNCACTIONS_DATABASE_URL": db.url}, start_new_session=True))


def worker_pids(db: Db) -> set[int]:
    return {pid for (pid,) in db.rows("SELECT pid FROM async_action_worker")}


def test_burst_with_two_processes_drains_and_exits_0(db: Db, tmp_path: Path) -> None:
    init_actions(db.engine, "slow", [{}] * 300)
    supervisor = supervise(tmp_path, db, "--burst")
    _, err = supervisor.communicate(timeout=120)
    assert supervisor.returncode == 0, err
    assert db.rows("SELECT status, count(*) FROM async_action GROUP BY status") == [
        ("completed", 300)]
    assert err.count("started worker process") == 2


def test_a_killed_worker_process_is_restarted(pg: Db, tmp_path: Path) -> None:
    supervisor = supervise(tmp_path, pg)
    try:
        wait_until(lambda: len(worker_pids(pg)) == 2, what="two workers")
        victim = min(worker_pids(pg))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(worker_pids(pg) - {victim}) == 2, what="a replacement")
        init_actions(pg.engine, "slow", [{}] * 100)
        wait_until(lambda: pg.scalar("SELECT count(*) FROM async_action WHERE status = "
                                     "'completed'") == 100, what="the work")
    finally:
        supervisor.send_signal(signal.SIGTERM)
        _, err = supervisor.communicate(timeout=60)
    assert supervisor.returncode == 0, err
    assert f"(pid {victim}) exited with status -9; restarting it" in err
    assert worker_pids(pg) == set() or worker_pids(pg) == {victim}
