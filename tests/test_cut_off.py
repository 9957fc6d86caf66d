"""A worker cut off before its COMMIT holds nothing past a lease (issue 15). Its client
is gone (a partition, a frozen host) but its connection is not closed, so the server
keeps the transaction open, with every lock it took, until TCP gives up on it: hours.
Each worker transaction whose locks others need ends itself after a lease of waiting
for its client (see queries.ends_if_abandoned); each is cut off here by a real proxy at
its COMMIT (tests/cut_off.py). A transactional processor's own work is left to TCP
keepalives instead (tested here for its settings, and by the chaos suite's partition
on a real cut link)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Float, insert, literal, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from asyncactions import admin, init_action, init_actions, processor, queries
from asyncactions.database import make_engine
from asyncactions.executor import Attempt, Executor
from asyncactions.maintenance import Rescuer, StartsTrimmer, fire_due
from asyncactions.processors import registered
from asyncactions.schedules import Schedule
from asyncactions.schema import async_action_start, db_now

from .conftest import Db
from .cut_off import cut_before_commit

LEASE = timedelta(seconds=1)
PATIENCE = 30.0  # seconds: far past the lease; without the fix they wait for hours


def in_background(fn: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def vanishing(fn: Callable[[], object]) -> Callable[[], None]:
    """The cut-off client's side: what it hears once the test ends (its connection
    lost) reaches no one."""
    def run() -> None:
        with suppress(sa_exc.DBAPIError):
            fn()
    return run


def until(done: Callable[[], bool], step: Callable[[], object], pause: float) -> bool:
    """Run `step` every `pause` seconds until `done()`, for PATIENCE at most."""
    deadline = time.monotonic() + PATIENCE
    while not done() and time.monotonic() < deadline:
        step()
        time.sleep(pause)
    return done()


@pytest.fixture
def bookings(pg: Db) -> Iterator[Db]:
    """The application's table a transactional processor writes to."""
    with pg.engine.begin() as conn:
        conn.execute(text("CREATE TABLE bookings (action_id integer)"))
    yield pg
    with pg.engine.begin() as conn:
        conn.execute(text("DROP TABLE bookings"))


def test_a_heartbeat_cut_off_at_its_commit_lets_the_rescue_through_after_a_lease(
        pg: Db) -> None:
    """The beat locks the worker's row and extends its actions' leases: the new leader's
    rescue waits on both."""
    with pg.engine.begin() as conn:
        queries.register_worker(conn, "gone", "elsewhere", 1, ["p"], lease=LEASE)
    init_actions(pg.engine, "p", [1])
    with pg.engine.begin() as conn:
        (held,), _ = queries.claim(conn, "gone", [("p", 3)], 1, LEASE)
    with cut_before_commit(pg.url) as (url, proxy):
        vanished = make_engine(url)

        def beat() -> None:
            with vanished.begin() as conn:
                queries.heartbeat(conn, "gone", LEASE, [held.id])
        in_background(vanishing(beat))
        assert proxy.cut.wait(PATIENCE)
        # The leader's rescue, on a thread: without the fix it waits on the worker's row
        # for good, inside run_once.
        rescuer = Rescuer(pg.engine, LEASE, {}, lambda *_: None)
        in_background(lambda: until(lambda: admin.get_action(pg.engine, held.id).status
                                    == "pending", rescuer.run_once, rescuer.interval)
                      ).join(PATIENCE)
        assert admin.get_action(pg.engine, held.id).status == "pending"  # a retry left
    vanished.dispose()


def test_a_transactional_attempt_cut_off_at_its_commit_is_rescued_after_a_lease(
        bookings: Db) -> None:
    pg = bookings
    with pg.engine.begin() as conn:
        queries.register_worker(conn, "gone", "elsewhere", 1, ["book"], lease=LEASE)

    @processor("book", transactional=True)
    def book(action, session):
        session.execute(text("INSERT INTO bookings VALUES (:a)"), {"a": action.id})
        return "booked"

    init_action(pg.engine, "book", {})
    with pg.engine.begin() as conn:
        (action,), _ = queries.claim(conn, "gone", [("book", 3)], 1, LEASE)
    with cut_before_commit(pg.url) as (url, proxy):
        vanished = make_engine(url)
        executor = Executor(registered(), "gone", vanished, max_bytes=1 << 20, lease=LEASE)
        in_background(lambda: executor.run(Attempt([action], "book", None)))
        assert proxy.cut.wait(PATIENCE)  # its outcome written, its COMMIT never sent
        rescuer = Rescuer(pg.engine, LEASE, registered(), lambda *_: None)
        assert until(lambda: admin.get_action(pg.engine, action.id).status == "pending",
                     rescuer.run_once, rescuer.interval)
    again = admin.get_action(pg.engine, action.id)
    assert again.status == "pending" and "was lost" in again.errors[-1]["error"]
    assert pg.rows("SELECT action_id FROM bookings") == []  # its writes went with it
    vanished.dispose()


def test_a_transactional_processor_runs_in_a_transaction_its_host_cannot_strand(
        pg: Db) -> None:
    """A host that drops off the network (no proxy stands in for that here; the chaos
    suite's partition cuts a real link) is found out by TCP keepalives: the processor's
    transaction probes its client every few seconds and gives up after about a lease."""
    if make_url(pg.url).host is None:
        pytest.skip("the test database is reached over a Unix socket: no TCP to probe")
    seen: dict[str, str] = {}

    @processor("probe", transactional=True)
    def probe(action, session):
        for name in ("tcp_keepalives_idle", "tcp_keepalives_interval",
                     "tcp_keepalives_count", "tcp_user_timeout"):
            seen[name] = session.execute(text(f"SHOW {name}")).scalar()

    init_action(pg.engine, "probe", {})
    with pg.engine.begin() as conn:
        (action,), _ = queries.claim(conn, "w", [("probe", 3)], 1, timedelta(seconds=30))
    executor = Executor(registered(), "w", pg.engine, max_bytes=1 << 20,
                        lease=timedelta(seconds=30))
    executor.run(Attempt([action], "probe", None))
    assert seen == {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "3",
                    "tcp_keepalives_count": "3", "tcp_user_timeout": "30000"}
    assert admin.get_action(pg.engine, action.id).status == "completed"


def test_a_capped_claim_cut_off_at_its_commit_holds_up_the_other_claimers_a_lease_at_most(
        pg: Db) -> None:
    flow = queries.Flow(concurrency=2, rate_count=None, rate_seconds=None)
    first, second = init_actions(pg.engine, "capped", [1, 2])
    with cut_before_commit(pg.url) as (url, proxy):
        vanished = make_engine(url)

        def claim_and_vanish() -> None:
            with vanished.begin() as conn:
                queries.lock_processor(conn, "capped", LEASE)
                queries.claim(conn, "gone", [("capped", 3)], 1, LEASE, flow)
        in_background(vanishing(claim_and_vanish))
        assert proxy.cut.wait(PATIENCE)
        # Every other claimer of the processor waits for its lock, then takes both:
        # the cut-off claim was rolled back with its transaction.
        claimed: list[int] = []

        def claim_here() -> None:
            with pg.engine.begin() as conn:
                queries.lock_processor(conn, "capped", timedelta(minutes=5))
                actions, _ = queries.claim(conn, "here", [("capped", 3)], 2,
                                           timedelta(minutes=5), flow)
            claimed.extend(a.id for a in actions)
        in_background(claim_here).join(PATIENCE)
        assert sorted(claimed) == [first.id, second.id]  # while the client is still cut off
    vanished.dispose()


def test_a_schedule_fire_cut_off_at_its_commit_leaves_it_to_the_next_leader(pg: Db) -> None:
    s = Schedule("tick", "p", every=timedelta(minutes=1))
    start = datetime(2026, 11, 23, 1, 0, 30, tzinfo=UTC)
    fire_due(pg.engine, s, now=start)  # first sight: starts from now
    due = start + timedelta(seconds=35)  # 01:01:00 is due
    with cut_before_commit(pg.url) as (url, proxy):
        vanished = make_engine(url)
        in_background(vanishing(lambda: fire_due(vanished, s, now=due, lease=LEASE)))
        assert proxy.cut.wait(PATIENCE)  # the old leader's fire, never committed
        fired: list[int] = []
        in_background(lambda: fired.append(fire_due(pg.engine, s, now=due,
                                                     lease=LEASE))).join(PATIENCE)
        assert fired == [1]  # while the old leader is still cut off
    assert pg.rows("SELECT unique_key FROM async_action WHERE processor = 'p'") == [
        ("schedule:tick:2026-11-23T01:01:00+00:00",)]
    vanished.dispose()


def test_a_trim_of_the_rate_log_cut_off_at_its_commit_leaves_it_to_the_next_one(
        pg: Db) -> None:
    with pg.engine.begin() as conn:  # starts older than any rate window
        conn.execute(insert(async_action_start).from_select(
            ["processor", "started_at"], select(literal("rated"), db_now(literal(-7200.0, Float)))))
    with cut_before_commit(pg.url) as (url, proxy):
        vanished = make_engine(url)
        in_background(vanishing(StartsTrimmer(vanished, LEASE).run_once))
        assert proxy.cut.wait(PATIENCE)  # its DELETE ran, its COMMIT never came
        trimmed: list[int] = []
        in_background(lambda: trimmed.append(StartsTrimmer(pg.engine, LEASE).run_once())
                      ).join(PATIENCE)
        assert trimmed == [1]  # while the old leader is still cut off
    vanished.dispose()
