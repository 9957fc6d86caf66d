"""Real worker processes sharing one database never run the same action twice."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

from asyncactions import init_actions

from .conftest import ROOT, Db, track

PROCESSORS = textwrap.dedent("""
    import os, time
    from pathlib import Path
    from asyncactions import processor

    HERE = Path(__file__).parent

    def both_workers_ready():
        # Each has claimed some (and holds them here): both take a share, whoever
        # started first.
        (HERE / f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 60
        while len(list(HERE.glob("ready-*"))) < 2:
            assert time.monotonic() < deadline, "the second worker never claimed"
            time.sleep(0.01)

    @processor("record")
    def record(action):
        both_workers_ready()
        time.sleep(0.002)
        fd = os.open(HERE / "runs.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{action.id} {os.getpid()}\\n".encode())
        os.close(fd)
""")


def test_two_worker_processes_split_the_work_and_never_share_an_action(db: Db,
                                                                        tmp_path: Path) -> None:
    (tmp_path / "procs.py").write_text(PROCESSORS)
    actions = init_actions(db.engine, "record", [{"i": i} for i in range(400)])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ASYNCACTIONS_DATABASE_URL": db.url}
    workers = [track(subprocess.Popen([sys.executable, "-m", "asyncactions", "worker",
                                       "--import", "procs", "--burst", "--concurrency", "4"],
                                      cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                                      text=True))
               for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    runs = [line.split() for line in (tmp_path / "runs.log").read_text().splitlines()]
    per_action = Counter(int(action_id) for action_id, _ in runs)
    assert per_action == Counter({a.id: 1 for a in actions})
    assert len({pid for _, pid in runs}) == 2, "both processes should have taken a share"
    assert db.scalar("SELECT count(*) FROM async_action WHERE status = 'completed'") == 400
