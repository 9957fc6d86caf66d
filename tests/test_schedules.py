"""Issue 5 schedules: each fire time enqueues one action, whatever the number of workers."""

from __future__ import annotations

import signal
import threading
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from asyncactions import ConfigError, get_action
from asyncactions.config import load_config
from asyncactions.maintenance import fire_due
from asyncactions.schedules import Schedule

from .conftest import Db, start_worker, wait_until, worker_log


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_every_fires_on_a_grid_all_workers_share() -> None:
    s = Schedule("tick", "p", every=timedelta(seconds=30))
    assert s.next_fire_after(at("2026-11-23T05:41:10+00:00")) == at("2026-11-23T05:41:30+00:00")
    assert s.next_fire_after(at("2026-11-23T05:41:30+00:00")) == at("2026-11-23T05:42:00+00:00")
    assert s.due_fires(at("2026-11-23T05:39:50+00:00"), at("2026-11-23T05:41:10+00:00")) \
        == [at("2026-11-23T05:40:00+00:00"), at("2026-11-23T05:40:30+00:00"),
            at("2026-11-23T05:41:00+00:00")]
    assert s.due_fires(at("2026-11-23T05:41:00+00:00"), at("2026-11-23T05:41:10+00:00")) == []
    # Missed for long: the newest ten only.
    long_ago = s.due_fires(at("2026-11-23T01:00:00+00:00"), at("2026-11-23T05:41:10+00:00"))
    assert long_ago == [at("2026-11-23T05:36:30+00:00") + timedelta(seconds=30 * k)
                        for k in range(10)]


def test_cron_fires_in_its_timezone() -> None:
    s = Schedule("nightly", "p", cron="0 2 * * *", timezone="Europe/Paris")
    # 02:00 in Paris is 01:00 UTC in winter.
    assert s.next_fire_after(at("2026-11-23T05:00:00+00:00")) == at("2026-11-24T01:00:00+00:00")
    assert s.due_fires(at("2026-11-21T05:00:00+00:00"), at("2026-11-23T05:00:00+00:00")) \
        == [at("2026-11-22T01:00:00+00:00"), at("2026-11-23T01:00:00+00:00")]


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "asyncactions.toml"
    path.write_text(body)
    return path


def test_schedules_load_from_the_config(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, """
[schedules.nightly_report]
processor = "build_report"
cron = "0 2 * * *"
data = { kind = "daily" }

[schedules.heartbeat]
processor = "ping"
every = "30s"
timezone = "Europe/Paris"
"""))
    assert config.schedules == (
        Schedule("nightly_report", "build_report", {"kind": "daily"}, cron="0 2 * * *"),
        Schedule("heartbeat", "ping", None, every=timedelta(seconds=30),
                 timezone="Europe/Paris"))


@pytest.mark.parametrize(("body", "message"), [
    ('cron = "0 2 * * *"', "processor is required"),
    ('processor = "p"', 'give exactly one of cron = "0 2 * * *" or every = "30s"'),
    ('processor = "p"\ncron = "0 2 * *"\nevery = "1s"', "give exactly one of"),
    ('processor = "p"\ncron = "0 2 * *"', "'0 2 * *' is not a cron expression"),
    ('processor = "p"\nevery = "often"', "every: 'often' is not a duration"),
    ('processor = "p"\nevery = "1s"\ntimezone = "Mars/Olympus"', "not a known timezone"),
    ('processor = "p"\nevery = "1s"\ncolour = 1', "unknown key 'colour'"),
])
def test_schedule_errors_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"\[schedules\.s\]") as err:
        load_config(write_config(tmp_path, f"[schedules.s]\n{body}\n"))
    assert message in str(err.value)


def test_a_fire_time_is_enqueued_once_however_many_workers_try(db: Db) -> None:
    s = Schedule("report", "build_report", {"kind": "daily"}, every=timedelta(minutes=1))
    start = at("2026-11-23T05:40:30+00:00")
    assert fire_due(db.engine, s, now=start) == 0  # first sight: starts from now
    now = at("2026-11-23T05:41:05+00:00")
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def contend() -> None:
        barrier.wait()
        results.append(fire_due(db.engine, s, now=now))

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0] * 7 + [1]
    assert db.rows("SELECT processor, unique_key FROM async_action") == [
        ("build_report", "schedule:report:2026-11-23T05:41:00+00:00")]


def test_a_short_gap_misses_no_fire_and_a_long_one_does_not_flood(db: Db) -> None:
    s = Schedule("tick", "p", every=timedelta(minutes=1))
    fire_due(db.engine, s, now=at("2026-11-23T01:00:30+00:00"))
    assert fire_due(db.engine, s, now=at("2026-11-23T01:03:05+00:00")) == 3  # 01:01..01:03
    assert fire_due(db.engine, s, now=at("2026-11-23T05:41:05+00:00")) == 10  # not 278
    assert fire_due(db.engine, s, now=at("2026-11-23T05:41:30+00:00")) == 0
    keys = [k for (k,) in db.rows("SELECT unique_key FROM async_action ORDER BY id")]
    assert keys[:3] == [f"schedule:tick:2026-11-23T01:0{m}:00+00:00" for m in (1, 2, 3)]
    assert keys[-1] == "schedule:tick:2026-11-23T05:41:00+00:00" and len(keys) == 13


TICK = '''
from asyncactions import processor

@processor("tick")
def tick(action):
    return action.data
'''


def test_two_workers_fire_each_time_once(db: Db, tmp_path: Path) -> None:
    (tmp_path / "ticks.py").write_text(TICK)
    write_config(tmp_path, 'imports = ["ticks"]\n[worker]\npoll_interval = "100ms"\n'
                 '[schedules.tick]\nprocessor = "tick"\nevery = "1s"\ndata = { n = 1 }\n')
    workers = [start_worker(tmp_path, db.url) for _ in range(2)]
    try:
        wait_until(lambda: db.scalar("SELECT count(*) FROM async_action WHERE status = "
                                     "'completed'") >= 4, timeout=60, what="four ticks")
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            assert worker.wait(30) == 0, worker_log(worker)
    keys = [k for (k,) in db.rows("SELECT unique_key FROM async_action ORDER BY id")]
    assert len(keys) == len(set(keys)) >= 4
    fires = [datetime.fromisoformat(k.split(":", 2)[2]) for k in keys]
    assert all(b - a == timedelta(seconds=1) for a, b in pairwise(fires))
    assert get_action(db.engine, 1).data == {"n": 1}
    assert datetime.now(UTC) - fires[-1] < timedelta(seconds=30)


def test_schedules_command_lists_the_next_fire_time(tmp_path: Path) -> None:
    import json

    from .conftest import cli
    write_config(tmp_path, '[schedules.nightly_report]\nprocessor = "build_report"\n'
                 'cron = "0 2 * * *"\ntimezone = "Europe/Paris"\n'
                 '[schedules.tick]\nprocessor = "ping"\nevery = "30s"\n')
    out = cli("schedules", "--format", "json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    nightly, tick = (json.loads(line) for line in out.stdout.splitlines())
    assert (nightly["name"], nightly["processor"], nightly["when"]) == (
        "nightly_report", "build_report", "cron 0 2 * * *")
    fire = datetime.fromisoformat(nightly["next_fire"])
    assert (fire.hour, fire.minute) == (2, 0) and fire > datetime.now(UTC)
    assert fire - datetime.now(UTC) <= timedelta(days=1)
    assert tick["when"] == "every 30s"
    assert datetime.fromisoformat(tick["next_fire"]) - datetime.now(UTC) <= timedelta(seconds=30)
