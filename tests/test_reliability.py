"""Issue 3: nothing lost, nothing stuck, under crashes, outages and bad processors.

Real worker processes, real signals, a real PostgreSQL restart. Figures (recovery
time, duplicates, timeout detection) are printed: run with `-s` to see them.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, text, update

from asyncactions import (
    Status,
    Worker,
    admin,
    init_action,
    init_actions,
    migrate,
    processor,
    queries,
)
from asyncactions.config import Config, WorkerSettings
from asyncactions.database import make_engine
from asyncactions.maintenance import pid_namespace
from asyncactions.schema import async_action_worker

from .conftest import (
    Cluster,
    Db,
    drain,
    start_worker,
    wait_until,
    worker_config,
    worker_log,
    worker_thread,
)

FAULTS = textwrap.dedent("""
    import asyncio, os, time
    from datetime import timedelta
    from pathlib import Path
    from asyncactions import processor

    RUNS = Path(__file__).parent / "runs.log"

    def note(action):
        fd = os.open(RUNS, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{action.id} {os.getpid()}\\n".encode())
        os.close(fd)

    @processor("short", retries=5, retry_interval=timedelta(0))
    def short(action):
        note(action)
        time.sleep(0.005)

    @processor("slow", retries=3, retry_interval=timedelta(0))
    def slow(action):
        note(action)
        time.sleep(action.data["seconds"])
        return "finished"

    @processor("slow_async", retries=3, retry_interval=timedelta(0))
    async def slow_async(action):
        note(action)
        await asyncio.sleep(action.data["seconds"])
        return "finished"

    @processor("poison", retries=2, retry_interval=timedelta(0))
    def poison(action):
        note(action)
        os._exit(13)
""")


def setup(tmp_path: Path, **worker: str | int) -> Path:
    settings = {"concurrency": 8, "poll_interval": "100ms", "lease": "3s",
                "shutdown_grace": "10s", **worker}
    lines = [f"{k} = {v!r}".replace("'", '"') for k, v in settings.items()]
    (tmp_path / "asyncactions.toml").write_text(
        'imports = ["faults"]\n[worker]\n' + "\n".join(lines) + "\n")
    (tmp_path / "faults.py").write_text(FAULTS)
    return tmp_path


def runs(tmp_path: Path) -> Counter[int]:
    log = tmp_path / "runs.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return Counter(int(line.split()[0]) for line in lines)


def by_status(db: Db) -> dict[str, int]:
    return dict(db.rows("SELECT status, count(*) FROM async_action GROUP BY status"))


def test_kill_9_mid_run_loses_nothing_and_reruns_only_what_was_in_flight(
        db: Db, tmp_path: Path) -> None:
    setup(tmp_path)
    actions = init_actions(db.engine, "short", [{}] * 3000)
    first = start_worker(tmp_path, db.url)
    wait_until(lambda: by_status(db).get("completed", 0) >= 1000
               and by_status(db).get("running", 0) > 0, what="1000 completed, more running")
    first.kill()
    first.wait()
    killed = time.monotonic()
    in_flight = {r[0] for r in db.rows("SELECT id FROM async_action WHERE status = 'running'")}
    done_at_kill = by_status(db).get("completed", 0)
    assert in_flight and done_at_kill < 3000, "the kill must land mid-run"
    second = start_worker(tmp_path, db.url)
    ids = ",".join(map(str, in_flight)) or "0"
    wait_until(lambda: db.scalar(f"SELECT count(*) FROM async_action WHERE status = 'running' "
                                 f"AND id IN ({ids})") == 0, what="recovery")
    recovery = time.monotonic() - killed
    wait_until(lambda: by_status(db) == {"completed": 3000}, timeout=120, what="all completed")
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0, worker_log(second)

    counts = runs(tmp_path)
    assert set(counts) == {a.id for a in actions}
    twice = {action_id for action_id, n in counts.items() if n > 1}
    assert twice <= in_flight, "only actions in flight at the kill may run again"
    # In flight at the kill: recovered as a lost attempt, unless the dying worker's last
    # outcome write was already on its way to the server (it then commits after the
    # kill, and the action completed on its first attempt).
    seen = [admin.get_action(db.engine, i) for i in in_flight]
    lost = [a for a in seen if any("was lost" in e["error"] for e in a.errors)]
    assert lost, "actions in flight at the kill come back as lost attempts"
    assert all(a in lost or (a.attempts, a.errors) == (1, []) for a in seen)
    print(f"\n[{db.name}] kill -9 after {done_at_kill} of 3000: {len(in_flight)} in flight, "
          f"{len(twice)} ran twice, "
          f"recovered {recovery:.2f}s after the kill (new worker started at once)")


def test_a_lost_remote_workers_actions_return_when_its_lease_expires(db: Db) -> None:
    """A worker on another host stops heartbeating: no pid to check, the lease decides."""
    done = threading.Event()

    @processor("resumable", retries=1, retry_interval=timedelta(0))
    def resumable(action):
        done.set()
        return "second try"

    @processor("last_chance", retries=0)
    def last_chance(action):  # pragma: no cover - must never run again
        raise AssertionError("a lost action with no retries left must fail, not rerun")

    resumable_id = init_action(db.engine, "resumable", {}).id
    last_id = init_action(db.engine, "last_chance", {}).id
    lease = 1.0
    # It stopped heartbeating just after its last beat: still registered for a minute
    # (the workers' lease), so only its actions' lease of a second can bring them back.
    # It started after the worker below (which so leads, and rescues).
    claimed_at = time.monotonic()
    last_beat = datetime.now(UTC)
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO async_action_worker VALUES ('elsewhere:99:0-dead', "
                          "'elsewhere', 99, 'resumable,last_chance', :started, :beat)"),
                     {"started": last_beat + timedelta(hours=1), "beat": last_beat})
    with db.engine.begin() as conn:
        claimed, _ = queries.claim(conn, "elsewhere:99:0-dead",
                                   [("resumable", 1), ("last_chance", 0)], 2,
                                   timedelta(seconds=lease))
    assert len(claimed) == 2
    config = Config(database_url=db.url, worker=WorkerSettings(
        poll_interval=timedelta(milliseconds=50), lease=timedelta(seconds=60)))
    worker = Worker(config=config)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        assert done.wait(45)
        waited = time.monotonic() - claimed_at
        wait_until(lambda: admin.get_action(db.engine, last_id).status == Status.FAILED)
    finally:
        worker.stop()
        thread.join(30)
    assert waited >= lease, "recovered before the lease ran out"
    again = admin.get_action(db.engine, resumable_id)
    assert (again.status, again.attempts, again.retries, again.result) == (
        Status.COMPLETED, 2, 0, "second try")
    assert "worker elsewhere:99:0-dead was lost while running attempt 1" in \
        again.errors[0]["error"]
    lost = admin.get_action(db.engine, last_id)
    assert lost.attempts == 1 and lost.error.startswith("WorkerLost: ")
    print(f"\n[{db.name}] remote worker lost: its action ran again {waited:.2f}s after the "
          f"claim (lease {lease}s)")


def test_a_starting_worker_recovers_its_hosts_crashed_workers_actions_leader_or_not(
        db: Db) -> None:
    """A worker restarted after a crash on this host takes its predecessor's actions back
    as it starts, though another worker leads (and would, by the leases, only later)."""
    done = threading.Event()

    @processor("resumable", retries=1, retry_interval=timedelta(0))
    def resumable(action):
        done.set()

    action = init_action(db.engine, "resumable", {})
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()  # a pid whose process is gone
    host, now = socket.gethostname(), datetime.now(UTC)
    crashed = f"{host}:{exited.pid}:{pid_namespace()}-crashed"
    leader = "elsewhere:1:0-leader"

    def beat() -> None:  # the leader lives on, and leads: it started first
        with db.engine.begin() as conn:
            conn.execute(update(async_action_worker).where(async_action_worker.c.id == leader)
                         .values(heartbeat_at=datetime.now(UTC)))

    with db.engine.begin() as conn:
        conn.execute(insert(async_action_worker), [
            {"id": leader, "hostname": "elsewhere", "pid": 1, "processors": "resumable",
             "started_at": now - timedelta(hours=1), "heartbeat_at": now},
            {"id": crashed, "hostname": host, "pid": exited.pid, "processors": "resumable",
             "started_at": now - timedelta(minutes=1), "heartbeat_at": now}])
        (claimed,), _ = queries.claim(conn, crashed, [("resumable", 1)], 1,
                                      timedelta(minutes=10))
    assert claimed.id == action.id
    with worker_thread(Worker(config=worker_config(db))):
        wait_until(lambda: beat() or done.is_set(), 30, what="the crashed worker's action")
    errors = admin.get_action(db.engine, action.id).errors
    assert f"worker {crashed} was lost while running attempt 1" in errors[0]["error"]


@pytest.mark.parametrize("slow", ["slow", "slow_async"])
def test_sigterm_finishes_in_flight_attempts_and_leaves_the_rest_untouched(
        db: Db, tmp_path: Path, slow: str) -> None:
    setup(tmp_path, concurrency=4)
    init_actions(db.engine, slow, [{"seconds": 0.5}] * 40)
    worker = start_worker(tmp_path, db.url)
    wait_until(lambda: sum(runs(tmp_path).values()) >= 4, what="4 attempts started")
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker_log(worker)
    assert time.monotonic() - signalled < 10, "took longer than shutdown_grace"
    started = set(runs(tmp_path))
    statuses = by_status(db)
    assert statuses.get("running", 0) == 0
    assert statuses["completed"] == len(started) >= 4
    completed = {r[0] for r in db.rows("SELECT id FROM async_action WHERE status='completed'")}
    assert completed == started
    untouched = db.rows("SELECT DISTINCT attempts, retries, error FROM async_action "
                        "WHERE status = 'pending'")
    # Handed back as if never claimed (retries, once set by a claim, stay set).
    assert {(attempts, error) for attempts, _, error in untouched} == {(0, None)}
    assert {retries for _, retries, _ in untouched} <= {None, 3}
    assert db.scalar("SELECT count(*) FROM async_action_worker") == 0
    assert "stopping gracefully" in worker_log(worker)


@pytest.mark.parametrize("slow", ["slow", "slow_async"])
def test_attempts_past_the_grace_are_recorded_as_interrupted(db: Db, tmp_path: Path,
                                                            slow: str) -> None:
    setup(tmp_path, shutdown_grace="1s")
    action = init_action(db.engine, slow, {"seconds": 60})
    worker = start_worker(tmp_path, db.url)
    wait_until(lambda: runs(tmp_path), what="the attempt to start")
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker_log(worker)
    assert time.monotonic() - signalled < 20  # the grace, not the attempt's 60 s
    interrupted = admin.get_action(db.engine, action.id)
    assert (interrupted.status, interrupted.attempts, interrupted.retries) == (
        Status.PENDING, 1, 2)
    assert interrupted.error.startswith("Interrupted: the worker stopped while this attempt")


def test_a_second_signal_stops_at_once(db: Db, tmp_path: Path) -> None:
    setup(tmp_path, shutdown_grace="60s")
    init_action(db.engine, "slow", {"seconds": 60})
    worker = start_worker(tmp_path, db.url)
    wait_until(lambda: runs(tmp_path), what="the attempt to start")
    worker.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping gracefully" in worker_log(worker), what="the first signal")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(5) != 0
    # The abandoned attempt comes back: a new worker on this host sees the process is gone.
    setup(tmp_path, shutdown_grace="60s")
    (tmp_path / "faults.py").write_text(FAULTS.replace('time.sleep(action.data["seconds"])',
                                                       "pass"))
    rescuer = start_worker(tmp_path, db.url)
    wait_until(lambda: by_status(db) == {"completed": 1}, what="the rescue")
    rescuer.send_signal(signal.SIGTERM)
    assert rescuer.wait(30) == 0


def test_hung_attempts_time_out_and_the_worker_keeps_working(db: Db) -> None:
    release = threading.Event()

    @processor("hangs", timeout=timedelta(seconds=1), retries=0)
    def hangs(action):
        release.wait(60)

    @processor("quick")
    def quick(action):
        return action.data

    hung = init_actions(db.engine, "hangs", [{}] * 3)
    init_actions(db.engine, "quick", list(range(200)))
    try:
        drain(db, concurrency=3)  # every slot hangs at first
    finally:
        release.set()
    assert by_status(db) == {"completed": 200, "failed": 3}
    detected = []
    for action in hung:
        timed_out = admin.get_action(db.engine, action.id)
        assert timed_out.error == ("TimeoutError: attempt timed out after 1s (the processor's "
                                   "timeout) and was abandoned")
        detected.append((timed_out.finished_at - timed_out.started_at).total_seconds())
    assert all(d >= 1.0 for d in detected), detected  # never before the timeout
    print(f"\n[{db.name}] timeout=1s detected after {max(detected):.2f}s at most")


def test_a_timed_out_attempt_frees_its_slot_for_the_one_waiting_behind_it(db: Db) -> None:
    """One slot, two attempts claimed together: the one waiting starts when the first is
    abandoned at its timeout, though no claim follows (nothing else is pending)."""
    release, ran = threading.Event(), threading.Event()

    @processor("hangs", timeout=timedelta(seconds=1), retries=0)
    def hangs(action):
        release.wait(60)

    @processor("quick")
    def quick(action):
        ran.set()

    hung = init_action(db.engine, "hangs")  # first in claim order: it takes the slot
    init_action(db.engine, "quick")
    try:
        with worker_thread(Worker(config=worker_config(db), concurrency=1)):
            wait_until(ran.is_set, 30, what="the attempt waiting behind the hung one")
    finally:
        release.set()
    assert admin.get_action(db.engine, hung.id).status == Status.FAILED  # timed out


def test_a_poison_action_fails_once_its_retries_are_spent(db: Db, tmp_path: Path) -> None:
    setup(tmp_path, concurrency=2)
    # The test process does not import faults.py, so it passes the processor's retries.
    poison = init_action(db.engine, "poison", {}, retries=2)
    init_actions(db.engine, "short", [{}] * 50)
    starts = 0
    while admin.get_action(db.engine, poison.id).status != Status.FAILED:
        starts += 1
        assert starts <= 6, "workers keep dying on the poison action"
        worker = start_worker(tmp_path, db.url)

        def died_or_poison_failed(worker=worker) -> bool:
            return worker.poll() is not None or \
                admin.get_action(db.engine, poison.id).status == Status.FAILED

        wait_until(died_or_poison_failed, what="the worker to die or the poison action to fail")
        if worker.poll() is None:
            wait_until(lambda: by_status(db).get("completed", 0) == 50, what="the rest")
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == 0
        else:
            assert worker.returncode == 13, worker_log(worker)
    failed = admin.get_action(db.engine, poison.id)
    assert (failed.attempts, failed.retries) == (3, 0)
    assert failed.error.startswith("WorkerLost: ")
    assert runs(tmp_path)[poison.id] == 3


def test_terminated_backends_do_not_stop_the_worker(pg: Db, tmp_path: Path) -> None:
    setup(tmp_path)
    actions = init_actions(pg.engine, "short", [{}] * 2000)
    worker = start_worker(tmp_path, pg.url)
    wait_until(lambda: by_status(pg).get("completed", 0) >= 300, what="300 completed")
    database = pg.engine.url.database
    for _ in range(5):
        wait_until(lambda: pg.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = :d "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            d=database) > 0, what="the worker to reconnect")
        terminated = pg.scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE datname = :d AND backend_type = 'client backend' "
                               "AND pid <> pg_backend_pid()", d=database)
        assert terminated >= 1
        time.sleep(0.2)  # the fault's cadence, not a synchronisation
    wait_until(lambda: by_status(pg) == {"completed": 2000}, timeout=120, what="all completed")
    assert worker.poll() is None, worker_log(worker)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert set(runs(tmp_path)) == {a.id for a in actions}
    assert "failed" in worker_log(worker)  # it noticed, and went on


def test_a_postgresql_restart_mid_run_loses_nothing(cluster: Cluster, tmp_path: Path) -> None:
    engine = make_engine(cluster.url())
    migrate.upgrade(engine)
    db = Db(cluster.url(), engine)
    setup(tmp_path)
    actions = init_actions(engine, "short", [{}] * 2000)
    worker = start_worker(tmp_path, cluster.url())
    wait_until(lambda: by_status(db).get("completed", 0) >= 300, what="300 completed")
    engine.dispose()
    cluster.pg_ctl("-m", "fast", "stop")
    time.sleep(2)  # the outage lasts two seconds
    cluster.pg_ctl("start")
    wait_until(lambda: by_status(db) == {"completed": 2000}, timeout=120, what="all completed")
    assert worker.poll() is None, worker_log(worker)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    counts = runs(tmp_path)
    assert set(counts) == {a.id for a in actions}
    print(f"\n[restart] {sum(n > 1 for n in counts.values())} actions ran twice")
    engine.dispose()


pytestmark = pytest.mark.timeout(300)
