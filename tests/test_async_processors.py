"""SPEC §3 "asyncio": `async def` processors on the worker's own event loop, counted in
the same concurrency as sync ones; timeouts cancel the coroutine for real. (Their
outcomes are the sync ones' tests, run for both kinds: see processor_of.)"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import text

from asyncactions import (
    AsyncActionsError,
    ConfigError,
    Status,
    Worker,
    admin,
    init_action,
    init_actions,
    processor,
    report_exceptions,
)

from .conftest import Db, drain, worker_config


class Gauge:
    """How many attempts run at once, and the most there ever were (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = self.peak = 0

    def __enter__(self) -> Gauge:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        return self

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self.now -= 1


def statuses(db: Db) -> dict[str, int]:
    return dict(db.rows("SELECT status, count(*) FROM async_action GROUP BY status"))


def test_500_sleeping_async_attempts_run_at_once_in_one_worker(db: Db) -> None:
    """Each attempt waits until all 500 are running: they finish only if the worker
    really runs 500 at once, and it does so without 500 threads."""
    gauge, threads = Gauge(), []
    all_in = asyncio.Event()

    @processor("nap")
    async def nap(action):
        with gauge:
            if gauge.now == 500:
                threads.append(threading.active_count())
                all_in.set()
            await asyncio.wait_for(all_in.wait(), 60)
            await asyncio.sleep(0.1)

    init_actions(db.engine, "nap", [{}] * 500)
    drain(db, concurrency=500)
    assert statuses(db) == {"completed": 500}
    assert gauge.peak == 500
    assert threads[0] < 50, f"{threads[0]} threads for 500 async attempts"


def test_sync_and_async_processors_share_one_worker_and_its_concurrency(db: Db) -> None:
    gauge = Gauge()

    @processor("sync_side")
    def sync_side(action):
        with gauge:
            time.sleep(0.02)
        return "sync"

    @processor("async_side")
    async def async_side(action):
        with gauge:
            await asyncio.sleep(0.02)
        return "async"

    init_actions(db.engine, "sync_side", [{}] * 20)
    init_actions(db.engine, "async_side", [{}] * 20)
    drain(db, concurrency=3)
    assert db.rows("SELECT processor, result, count(*) FROM async_action "
                   "GROUP BY processor, result ORDER BY processor") in (
        [("async_side", '"async"', 20), ("sync_side", '"sync"', 20)],
        [("async_side", "async", 20), ("sync_side", "sync", 20)])
    assert 2 <= gauge.peak <= 3


def test_a_timeout_cancels_the_coroutine_runs_its_finally_and_frees_the_slot(db: Db) -> None:
    cleaned_up = threading.Event()

    @processor("hangs", timeout=timedelta(milliseconds=300), retries=0)
    async def hangs(action):
        try:
            await asyncio.sleep(60)
        finally:
            cleaned_up.set()

    @processor("quick")
    async def quick(action):
        return action.data

    hung = init_action(db.engine, "hangs")
    init_actions(db.engine, "quick", list(range(20)))
    started = time.monotonic()
    drain(db, concurrency=1)  # the only slot hangs first
    assert time.monotonic() - started < 30
    assert cleaned_up.is_set()
    assert statuses(db) == {"completed": 20, "failed": 1}
    timed_out = admin.get_action(db.engine, hung.id)
    assert timed_out.error == ("TimeoutError: attempt timed out after 300ms (the processor's "
                               "timeout) and was abandoned")
    assert (timed_out.finished_at - timed_out.started_at).total_seconds() < 3


def test_async_transactional_writes_commit_with_the_completion(ledger: Db) -> None:
    sessions = []

    @processor("book", transactional=True, retries=2, retry_interval=timedelta(0))
    async def book(action, session):
        sessions.append(type(session).__name__)
        await session.execute(text("INSERT INTO ledger VALUES (:a, :n)"),
                              {"a": action.id, "n": action.attempts})
        if action.attempts < 3:
            raise RuntimeError("booking failed after writing")
        return "booked"

    action = init_action(ledger.engine, "book", {})
    drain(ledger)
    done = admin.get_action(ledger.engine, action.id)
    assert (done.status, done.result, done.attempts) == (Status.COMPLETED, "booked", 3)
    assert sessions == ["AsyncSession"] * 3
    # The failed attempts' writes rolled back; the successful one's committed with it.
    assert ledger.rows("SELECT action_id, attempt FROM ledger") == [(action.id, 3)]


def test_canceling_a_running_async_attempt_keeps_it_canceled(db: Db) -> None:
    entered = threading.Event()

    @processor("slow")
    async def slow(action):
        entered.set()
        for _ in range(400):  # until canceled, or 20 s
            if admin.get_action(db.engine, action.id).status == Status.CANCELED:
                break
            await asyncio.sleep(0.05)
        return "late result"

    action = init_action(db.engine, "slow", {})
    worker = Worker(config=worker_config(db))
    # A daemon, stopped in any case: a failure must not leave pytest waiting on it.
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    try:
        assert entered.wait(10)
        assert admin.cancel(db.engine, action.id).status == Status.CANCELED
        thread.join(30)
    finally:
        worker.stop()
    final = admin.get_action(db.engine, action.id)
    assert (final.status, final.result) == (Status.CANCELED, None)


def test_a_cancel_of_a_running_async_attempt_cancels_its_task(db: Db) -> None:
    """SPEC §3: `cancel` of a running async attempt also cancels its task (seen by the
    worker's cancel watch within about a second); its `finally` blocks run."""
    entered, cleaned_up = threading.Event(), threading.Event()
    outcome: list[str] = []

    @processor("endless")
    async def endless(action):
        entered.set()
        try:
            await asyncio.sleep(3600)  # never ends by itself
            outcome.append("slept")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        finally:
            cleaned_up.set()

    action = init_action(db.engine, "endless", {})
    worker = Worker(config=worker_config(db))
    # A daemon, stopped in any case: a failure must not leave pytest waiting on it.
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    try:
        assert entered.wait(10)
        admin.cancel(db.engine, action.id)
        assert cleaned_up.wait(30), "the task was not cancelled"
        thread.join(30)  # the burst worker ends: nothing is left running
        assert not thread.is_alive()
    finally:
        worker.stop()
    assert outcome == ["cancelled"]
    assert admin.get_action(db.engine, action.id).status == Status.CANCELED


# --- bad input ----------------------------------------------------------------------------

def test_a_blocking_call_in_an_async_processor_is_named_in_a_warning(
        db: Db, caplog: pytest.LogCaptureFixture) -> None:
    @processor("blocks")
    async def blocks(action):
        time.sleep(1.0)  # the mistake: a sync call on the event loop

    action = init_action(db.engine, "blocks")
    with caplog.at_level(logging.WARNING, logger="asyncactions.eventloop"):
        drain(db, concurrency=2)
    # Once per stall, however long it lasts. (A loaded machine may starve the loop at
    # its start too: a warning that names no processor is not this one.)
    warnings = [r.getMessage() for r in caplog.records if r.name == "asyncactions.eventloop"
                and "by processor" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "blocked for" in warnings[0]
    assert f"by processor 'blocks' ({action.display_id})" in warnings[0]
    assert "await asyncio.to_thread(...)" in warnings[0]


def test_an_async_on_failure_is_refused_with_the_fix() -> None:
    async def notify(action):
        pass

    with pytest.raises(ConfigError, match=r"@processor\('p'\) on_failure: must be a plain "
                                          r"function, not an async def"):
        processor("p", on_failure=notify)


def test_other_async_defs_where_only_a_function_can_be_called_are_refused(db: Db) -> None:
    async def key(data):
        return "k"

    async def report(exc, action):
        pass

    with pytest.raises(AsyncActionsError, match="unique_key must be a plain function"):
        init_actions(db.engine, "p", [{}], unique_key=key)
    with pytest.raises(TypeError, match="report_exceptions needs a plain function, not an "
                                        "async def"):
        report_exceptions(report)
    assert db.scalar("SELECT count(*) FROM async_action") == 0


def test_a_sync_wrapper_that_returns_a_coroutine_fails_with_the_fix(db: Db) -> None:
    async def send(action):
        return "sent"

    @processor("wrapped", retries=0)
    def wrapped(action):  # a decorator that forgot to be async
        return send(action)

    action = init_action(db.engine, "wrapped")
    drain(db)
    failed = admin.get_action(db.engine, action.id)
    assert failed.status == Status.FAILED
    assert failed.error == ("TypeError: processor 'wrapped' returned a coroutine: register the "
                            "async def itself (or a wrapper that is an async def too)")
