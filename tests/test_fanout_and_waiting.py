"""SPEC §3: enqueue_all fans out in the caller's transaction; wait_for blocks until final."""

from __future__ import annotations

import threading
import time
import tracemalloc

import pytest
from sqlalchemy.orm import Session

from asyncactions import (
    AsyncActionsError,
    Status,
    Worker,
    enqueue_all,
    init_action,
    processor,
    wait_for,
)
from asyncactions.enqueue import combinations

from .conftest import Db, worker_config


def test_enqueue_all_inserts_the_cross_product_with_static_data(db: Db) -> None:
    count = enqueue_all(db.engine, "send_reminder",
                        each={"user": (u for u in range(3)), "channel": ["mail", "sms"]},
                        static={"campaign": "winter"}, related_id="campaign:winter")
    assert count == 6
    rows = db.rows("SELECT related_id, COUNT(*) FROM async_action GROUP BY related_id")
    assert rows == [("campaign:winter", 6)]
    from asyncactions import get_action
    datas = [get_action(db.engine, i).data for i in range(1, 7)]
    assert datas == [{"user": u, "channel": c, "campaign": "winter"}
                     for u in range(3) for c in ("mail", "sms")]


def test_enqueue_all_joins_the_callers_transaction(db: Db) -> None:
    with Session(db.engine) as session:
        session.begin()
        assert enqueue_all(session, "p", each={"n": range(12_000)}) == 12_000
        session.rollback()
    assert db.scalar("SELECT count(*) FROM async_action") == 0


def test_enqueue_all_refuses_a_key_given_twice(db: Db) -> None:
    with pytest.raises(AsyncActionsError, match="user is both in each and in static"):
        enqueue_all(db.engine, "p", each={"user": [1]}, static={"user": 2})


def test_a_million_combinations_stream_in_flat_memory() -> None:
    """The fan-out's generator: a million combinations from a one-shot generator."""
    tracemalloc.start()
    users = (f"user-{i}" for i in range(250_000))
    seen = sum(1 for _ in combinations({"user": users, "day": range(4)}, {"k": 1}))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seen == 1_000_000
    assert peak < 5 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_enqueue_all_keeps_memory_flat_against_the_database(pg: Db) -> None:
    tracemalloc.start()
    count = enqueue_all(pg.engine, "p", each={"user": (i for i in range(12_000)),
                                              "day": range(5)})
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 60_000 == pg.scalar("SELECT count(*) FROM async_action")
    # Twelve batches of 5,000: memory holds about one batch, not sixty thousand actions.
    assert peak < 20 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_wait_for_returns_the_final_action_once_it_finishes(db: Db) -> None:
    release = threading.Event()
    finished_at: list[float] = []

    @processor("waited_on")
    def waited_on(action):
        release.wait(30)
        finished_at.append(time.monotonic())
        return {"done": True}

    action = init_action(db.engine, "waited_on", {})
    worker = Worker(config=worker_config(db))
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        threading.Timer(0.3, release.set).start()
        final = wait_for(db.engine, action.id, timeout=30)
        returned = time.monotonic()
    finally:
        worker.stop()
        thread.join(30)
    assert (final.status, final.result) == (Status.COMPLETED, {"done": True})
    assert returned >= finished_at[0]  # how soon is the benchmark's to say, not a test's


def test_wait_for_times_out_promptly(db: Db) -> None:
    action = init_action(db.engine, "nobody_runs_this", {})
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ASYNC-00000001 is still pending after 0.3s"):
        wait_for(db.engine, action.id, timeout=0.3)
    assert time.monotonic() - started >= 0.3  # never early
