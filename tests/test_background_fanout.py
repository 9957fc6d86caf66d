"""SPEC §3 background fan-out: `enqueue_all(..., background=True, on_complete=...)`
records one fan-out action; a worker streams the cross product in batches, each batch
its own transaction with the fan-out's progress, resumes after a crash without
duplicates or gaps, and enqueues `on_complete` once with the count."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Text, bindparam, update
from sqlalchemy.orm import Session

from asyncactions import (
    AsyncActionsError,
    Status,
    Worker,
    admin,
    aio,
    codec,
    enqueue_all,
    init_actions,
    processor,
)
from asyncactions import enqueue as enqueue_module
from asyncactions import fanout as fanout_module
from asyncactions.admin import pause
from asyncactions.database import make_async_engine
from asyncactions.enqueue import FANOUT, combinations
from asyncactions.schema import as_payload, async_action

from .conftest import Db, drain, start_worker, wait_until, worker_config, worker_log


def data_of(db: Db, processor: str) -> list[Any]:
    return [json.loads(d) if isinstance(d, str) else d for (d,) in db.rows(
        "SELECT data FROM async_action WHERE processor = :p ORDER BY id", p=processor)]


def fanout_action(db: Db) -> Any:
    (action_id,) = [r[0] for r in db.rows(f"SELECT id FROM async_action "
                                          f"WHERE processor = '{FANOUT}'")]
    return admin.get_action(db.engine, action_id)


def done_so_far(db: Db) -> int:
    """The fan-out's progress, read while its worker writes (see fanout_status)."""
    if db.name != "sqlite":
        return fanout_action(db).data["done"]
    return json.loads(plain_read(db, f"SELECT data FROM async_action "
                                     f"WHERE processor = '{FANOUT}'"))["done"]


def fanout_status(db: Db) -> str:
    """The fan-out's status, read while its worker writes. On SQLite a plain read: the
    engine's transactions take the write lock first (BEGIN IMMEDIATE), so a poll through
    it waits for the worker, and saw the fan-out only once it had finished."""
    if db.name != "sqlite":
        return fanout_action(db).status
    return Status(plain_read(db, f"SELECT status FROM async_action "
                                 f"WHERE processor = '{FANOUT}'"))


def plain_read(db: Db, sql: str) -> Any:
    """One value, without waiting for the worker's writes (see fanout_status)."""
    if db.name != "sqlite":
        return db.scalar(sql)
    with closing(sqlite3.connect(db.engine.url.database, timeout=30)) as conn:
        (value,) = conn.execute(sql).fetchone()
    return value


def test_a_background_fan_out_is_one_action_until_a_worker_streams_it(
        db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    # 20 combinations: 3 batches on either path
    monkeypatch.setattr(enqueue_module, "FANOUT_BATCH", 7)
    monkeypatch.setattr(fanout_module, "COPY_BATCH", 7)
    with Session(db.engine) as session, session.begin():
        count = enqueue_all(session, "visit", each={"city": ["a", "b", "c", "d"],
                                                    "day": range(5)},
                            static={"kind": "survey"}, background=True, on_complete="report",
                            priority=3)
    assert count == 20
    assert db.rows("SELECT processor FROM async_action") == [(FANOUT,)]
    reports: list[Any] = []
    processor("report")(lambda action: reports.append(action.data))
    drain(db)
    visits = sorted((d["city"], d["day"], d["kind"]) for d in data_of(db, "visit"))
    assert visits == [(c, d, "survey") for c in "abcd" for d in range(5)]
    assert db.scalar("SELECT count(*) FROM async_action WHERE processor = 'visit' "
                     "AND priority = 3") == 20
    assert reports == [{"count": 20, "processor": "visit"}]
    fan = fanout_action(db)
    assert (fan.status, fan.result) == (Status.COMPLETED, {"count": 20, "processor": "visit"})
    assert fan.data["done"] == 20


def test_a_worker_busy_with_a_backlog_still_starts_a_fan_out(db: Db) -> None:
    # The built-in fan-out is claimed apart from the worker's other processors: when
    # their claims leave room, or at least every second while they come back full, so
    # a backlog (here about 3 s of work) does not hold a fan-out back until it drains.
    # A starting worker claims its own backlog first.
    processor("busy")(lambda action: time.sleep(0.004))
    processor("visit")(lambda action: None)
    init_actions(db.engine, "busy", [{}] * 3000)
    enqueue_all(db.engine, "visit", each={"i": range(10)}, background=True)
    worker = Worker(config=worker_config(db), concurrency=4)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_until(lambda: fanout_status(db) == Status.COMPLETED, 60, what="the fan-out")
        left = plain_read(db, "SELECT count(*) FROM async_action WHERE processor = 'busy' "
                              "AND status = 'pending'")
        busy_first = plain_read(
            db, "SELECT min(started_at) FILTER (WHERE processor = 'busy') < "
                f"min(started_at) FILTER (WHERE processor = '{FANOUT}') FROM async_action")
    finally:
        worker.stop()
        thread.join(60)
    assert left > 0, "the fan-out waited for the whole backlog"
    assert busy_first


def test_a_rolled_back_background_fan_out_leaves_nothing(db: Db) -> None:
    with Session(db.engine) as session:
        session.begin()
        enqueue_all(session, "visit", each={"i": range(3)}, background=True)
        session.rollback()
    assert db.scalar("SELECT count(*) FROM async_action") == 0


def test_aio_enqueue_all_records_a_background_fan_out(db: Db) -> None:
    async def main() -> int:
        engine = make_async_engine(db.url)
        try:
            return await aio.enqueue_all(engine, "visit", each={"i": range(4), "j": [1, 2]},
                                         background=True)
        finally:
            await engine.dispose()

    assert asyncio.run(main()) == 8
    assert fanout_action(db).data["total"] == 8


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"each": {"i": (x for x in range(3))}, "background": True},
     r"^enqueue_all\(background=True\): each\['i'\] is a generator; give a list of JSON "
     r"values or a range"),
    ({"each": {"i": {1, 2}}, "background": True}, r"each\['i'\] is a set"),
    ({"each": {"i": [object()]}, "background": True}, r'data\["each"\]\["i"\]\["values"\]'
                                                       r"\[0\]: object of type object"),
    ({"each": {"i": [1]}, "background": True, "unique_key": str},
     r"unique_key cannot be stored for the worker"),
    ({"each": {"i": [1]}, "on_complete": "report"}, r"on_complete needs background=True"),
])
def test_what_a_background_fan_out_cannot_store_is_refused_in_one_line(
        db: Db, kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(AsyncActionsError, match=problem) as refused:
        enqueue_all(db.engine, "visit", **kwargs)
    assert "\n" not in str(refused.value)
    assert db.scalar("SELECT count(*) FROM async_action") == 0


WORKER_MODULE = """
import os
import threading
from pathlib import Path

from asyncactions import fanout, processor

fanout.COPY_BATCH = 1000
write_batch = fanout._write_batch


def hang_in_the_third_batch(conn, action, spec, stop, write):
    write_batch(conn, action, spec, stop, write)
    if stop == 3000 and os.environ.get("HANG_FILE"):
        # The third batch's rows are written, not committed: say so, and never return.
        Path(os.environ["HANG_FILE"]).touch()
        threading.Event().wait()


fanout._write_batch = hang_in_the_third_batch


@processor("report")
def report(action):
    return action.data
"""


def test_a_fan_out_survives_a_kill_of_its_worker_with_every_combination_once(
        db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enqueue_module, "FANOUT_BATCH", 1000)
    (tmp_path / "fan_jobs.py").write_text(WORKER_MODULE)
    (tmp_path / "asyncactions.toml").write_text(
        'imports = ["fan_jobs"]\n[worker]\npoll_interval = "50ms"\nlease = "4s"\n')
    total = enqueue_all(db.engine, "visit", each={"i": range(1000), "j": range(100)},
                        background=True, on_complete="report")
    assert total == 100_000
    hang = tmp_path / "hanging"
    monkeypatch.setenv("HANG_FILE", str(hang))
    first = start_worker(tmp_path, db.url)
    wait_until(hang.exists, what="the third batch")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(30)
    # Mid-way: the two committed batches landed, the open one did not.
    assert fanout_action(db).data["done"] == 2000
    assert db.scalar("SELECT count(*) FROM async_action WHERE processor = 'visit'") == 2000
    monkeypatch.delenv("HANG_FILE")
    second = start_worker(tmp_path, db.url)
    wait_until(lambda: db.scalar("SELECT count(*) FROM async_action WHERE processor = "
                                 "'report' AND status = 'completed'") == 1,
               timeout=120, what="on_complete")
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0, worker_log(second)
    assert db.scalar("SELECT count(*) FROM async_action WHERE processor = 'visit'") == total
    assert db.scalar("SELECT count(DISTINCT data) FROM async_action "
                     "WHERE processor = 'visit'") == total
    assert data_of(db, "report") == [{"count": total, "processor": "visit"}]
    fan = fanout_action(db)
    assert (fan.status, fan.attempts, fan.result["count"]) == (Status.COMPLETED, 2, total)


AWKWARD = ['say "hi"', "back\\slash", "tab\there", "é 😀", None, True, 1.5, -7,
           {"nested": [1, {"deep": "x"}]}, [], datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
           Decimal("19.90")]


def test_each_combination_is_stored_as_its_encoding_once_in_order(
        db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    # Suffixes of at most 2 combinations: the last iterable alone, so the prefix holds
    # three values; batches of 50 end inside a prefix.
    monkeypatch.setattr(fanout_module, "SUFFIXES", 2)
    monkeypatch.setattr(fanout_module, "COPY_BATCH", 50)
    monkeypatch.setattr(enqueue_module, "FANOUT_BATCH", 50)
    each = {"a": AWKWARD, "b": range(3), "c": AWKWARD[:5], "d": [False, "z"]}
    static = {"kind": "awk\\ward", "when": date(2026, 12, 6)}
    total = enqueue_all(db.engine, "visit", each=each, static=static, background=True,
                        related_id="order:1", retries=4, priority=-2, ordering_key="k",
                        delay=timedelta(hours=1))
    assert total == 12 * 3 * 5 * 2
    processor("report")(lambda action: None)  # a worker needs one; "visit" is not run
    drain(db)
    expected = [json.loads(codec.dumps(c)) for c in combinations(each, static)]
    assert data_of(db, "visit") == expected
    assert db.rows("SELECT DISTINCT related_id, retries, priority, ordering_key, event, status "
                   "FROM async_action WHERE processor = 'visit'") == [
        ("order:1", 4, -2, "k", None, "pending")]
    early = db.scalar("SELECT min(next_eligible_at) FROM async_action "
                      "WHERE processor = 'visit'")
    early = early if isinstance(early, datetime) else datetime.fromisoformat(str(early))
    assert early.replace(tzinfo=UTC) > datetime.now(UTC) + timedelta(minutes=59)


def test_a_value_too_large_fails_the_fan_out_naming_the_limit(pg: Db) -> None:
    enqueue_all(pg.engine, "visit", each={"i": range(3), "text": ["x" * 100]},
                background=True, max_data_bytes=64)
    processor("report")(lambda action: None)
    drain(pg)
    fan = fanout_action(pg)  # retried later, to the same end
    assert (fan.status, fan.attempts) == (Status.PENDING, 1)
    assert "bytes encoded, over the limit of 64" in fan.error
    assert pg.scalar("SELECT count(*) FROM async_action WHERE processor = 'visit'") == 0


@dataclass
class Visit:
    a: int
    b: int


@pytest.mark.parametrize("path", ["text", "init_actions"])
def test_a_resumed_fan_out_starts_at_the_combination_it_had_reached(
        db: Db, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    monkeypatch.setattr(enqueue_module, "FANOUT_BATCH", 7)
    monkeypatch.setattr(fanout_module, "COPY_BATCH", 7)
    each = {"a": range(4), "b": [0, 1, 2, 3, 4]}
    enqueue_all(db.engine, "visit", each=each, background=True)
    fan = fanout_action(db)
    with db.engine.begin() as conn:  # as if an attempt had died after 9 combinations
        conn.execute(update(async_action).where(async_action.c.id == fan.id).values(
            data=as_payload(bindparam("d", type_=Text))), {"d": codec.dumps(
                {**fan.data, "done": 9})})
    if path == "init_actions":  # a schema registered here: each item is checked
        processor("visit", schema=Visit)(lambda action: None)
        pause(db.engine, "visit")  # recorded, not run
    processor("report")(lambda action: None)
    drain(db)
    assert data_of(db, "visit") == list(combinations(each, {}))[9:]


def test_a_schema_registered_on_the_worker_checks_each_combination(db: Db) -> None:
    processor("visit", schema=Visit)(lambda action: None)
    enqueue_all(db.engine, "visit", each={"a": [1], "b": ["two"]}, background=True)
    drain(db)
    assert 'data[0]["b"]: Input should be a valid integer' in fanout_action(db).error
    assert db.scalar("SELECT count(*) FROM async_action WHERE processor = 'visit'") == 0
