"""SPEC §2 status transitions, driven through a real Worker on each backend."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import Engine, event
from sqlalchemy.pool import Pool

from asyncactions import (
    ConfigError,
    Defer,
    PermanentFailure,
    Status,
    UnknownProcessor,
    Worker,
    admin,
    init_action,
    init_actions,
    processor,
    queries,
)
from asyncactions.claiming import (
    CLAIM_SESSION,
    MAX_UNWRITTEN,
    PREFETCH,
    PREFETCH_QUICK,
    Claimer,
    InFlight,
    set_claim_session,
)
from asyncactions.completer import Completer
from asyncactions.config import Config, WorkerSettings
from asyncactions.database import KeptConnection
from asyncactions.notifier import LISTEN, Wakeup
from asyncactions.outcomes import completed

from .conftest import (
    Db,
    drain,
    plan_nodes,
    plans_sent_here,
    processor_of,
    wait_until,
    worker_thread,
)
from .conftest import worker_config as config


def test_every_committed_action_runs_exactly_once_and_completes_with_its_result(
        db: Db, kind: str) -> None:
    runs: Counter[int] = Counter()
    lock = threading.Lock()

    @processor_of(kind, "double")
    def double(action):
        with lock:
            runs[action.id] += 1
        return {"twice": action.data["n"] * 2}

    actions = init_actions(db.engine, "double", [{"n": n} for n in range(300)])
    drain(db, concurrency=8)
    assert runs == Counter({a.id: 1 for a in actions})
    done = admin.get_action(db.engine, actions[7].id)
    assert done.status == Status.COMPLETED
    assert done.result == {"twice": 14}
    assert done.attempts == 1 and done.retries == 3
    assert done.finished_at >= done.started_at >= done.created_at
    assert done.claimed_by is None and done.lease_expires_at is None
    assert db.scalar("SELECT count(*) FROM async_action WHERE status <> 'completed'") == 0


def test_failure_with_retries_left_goes_back_to_pending_after_the_interval(
        db: Db, kind: str) -> None:
    @processor_of(kind, "flaky", retries=3, retry_interval=timedelta(minutes=10))
    def flaky(action):
        raise ConnectionError("smtp server refused")

    action = init_action(db.engine, "flaky", {})
    before = datetime.now(UTC)
    drain(db)  # burst stops: the retry is not eligible for ten minutes
    retried = admin.get_action(db.engine, action.id)
    assert retried.status == Status.PENDING
    assert (retried.retries, retried.attempts) == (2, 1)
    assert retried.error == "ConnectionError: smtp server refused"
    assert len(retried.errors) == 1
    entry = retried.errors[0]
    assert entry["attempt"] == 1 and entry["error"] == retried.error
    assert "raise ConnectionError" in entry["traceback"] and entry["worker"]
    assert before + timedelta(minutes=9) < retried.next_eligible_at < \
        datetime.now(UTC) + timedelta(minutes=11)


def test_retries_are_spent_then_the_action_fails_with_its_history(db: Db, kind: str) -> None:
    @processor_of(kind, "broken", retries=2, retry_interval=timedelta(0))
    def broken(action):
        raise ValueError(f"bad input on attempt {action.attempts}")

    action = init_action(db.engine, "broken", {})
    drain(db)  # zero interval: burst keeps going through every retry
    failed = admin.get_action(db.engine, action.id)
    assert failed.status == Status.FAILED
    assert (failed.retries, failed.attempts) == (0, 3)
    assert failed.error == "ValueError: bad input on attempt 3"
    assert [e["attempt"] for e in failed.errors] == [1, 2, 3]
    assert failed.finished_at is not None


def test_success_after_failures_completes_and_keeps_the_history(db: Db, kind: str) -> None:
    @processor_of(kind, "third_time_lucky", retries=3, retry_interval=timedelta(0))
    def lucky(action):
        if action.attempts < 3:
            raise TimeoutError("upstream timed out")
        return "ok"

    action = init_action(db.engine, "third_time_lucky", {})
    drain(db)
    done = admin.get_action(db.engine, action.id)
    assert (done.status, done.result, done.retries, done.attempts) == (
        Status.COMPLETED, "ok", 1, 3)
    assert [e["error"] for e in done.errors] == ["TimeoutError: upstream timed out"] * 2


def test_permanent_failure_fails_now_without_spending_retries(db: Db, kind: str) -> None:
    @processor_of(kind, "no_email", retries=5)
    def no_email(action):
        raise PermanentFailure("user has no email")

    action = init_action(db.engine, "no_email", {})
    drain(db)
    failed = admin.get_action(db.engine, action.id)
    assert (failed.status, failed.attempts, failed.retries) == (Status.FAILED, 1, 5)
    assert failed.error == "PermanentFailure: user has no email"


def test_defer_reschedules_without_spending_a_retry(db: Db, kind: str) -> None:
    @processor_of(kind, "later", retries=1)
    def later(action):
        if action.attempts < 3:
            raise Defer(timedelta(0))
        return action.attempts

    action = init_action(db.engine, "later", {})
    drain(db)
    done = admin.get_action(db.engine, action.id)
    assert (done.status, done.result, done.retries, done.errors) == (
        Status.COMPLETED, 3, 1, [])


def test_defer_with_a_delay_leaves_it_pending_until_then(db: Db, kind: str) -> None:
    @processor_of(kind, "snooze")
    def snooze(action):
        raise Defer(timedelta(hours=1))

    action = init_action(db.engine, "snooze", {})
    drain(db)
    snoozed = admin.get_action(db.engine, action.id)
    assert (snoozed.status, snoozed.retries) == (Status.PENDING, 3)
    assert snoozed.next_eligible_at > datetime.now(UTC) + timedelta(minutes=59)


def test_a_written_attempt_releases_itself_not_the_retry_claimed_since(sqlite: Db) -> None:
    """A retry due at once can be claimed again between its outcome's commit and the
    worker's note that it was written: that next attempt stays held (its lease renewed by
    the heartbeat, its slot counted, a burst worker not done while it runs)."""
    action = init_action(sqlite.engine, "p", {})
    first, retry = action._replace(attempts=1), action._replace(attempts=2)
    held = InFlight()
    held.add([first])
    held.add([retry])  # claimed again before the first attempt's write was noted
    held.remove([first])
    assert held.ids() == [action.id] and len(held) == 1
    held.remove([retry])
    assert held.ids() == [] and len(held) == 0


def test_delayed_actions_are_not_claimed_before_they_are_eligible(db: Db) -> None:
    ran: list[int] = []

    @processor("tomorrow")
    def tomorrow(action):
        ran.append(action.id)

    later = init_action(db.engine, "tomorrow", {}, delay=timedelta(days=1))
    now = init_action(db.engine, "tomorrow", {})  # the control: the worker does claim
    drain(db)
    assert ran == [now.id]
    assert admin.get_action(db.engine, later.id).status == Status.PENDING


def test_lower_priority_value_runs_first(db: Db) -> None:
    order: list[int] = []

    @processor("ordered")
    def ordered(action):
        order.append(action.data)

    for p in (5, -1, 3, 0):
        init_action(db.engine, "ordered", p, priority=p)
    drain(db, concurrency=1)
    assert order == [-1, 0, 3, 5]


def test_unserializable_result_fails_the_action_clearly(db: Db, kind: str) -> None:
    @processor_of(kind, "returns_object")
    def returns_object(action):
        return {"handle": object()}

    action = init_action(db.engine, "returns_object", {})
    drain(db)
    failed = admin.get_action(db.engine, action.id)
    assert failed.status == Status.FAILED
    assert 'result["handle"]: object of type object is not serializable' in failed.error


def test_config_overrides_decorator_settings(db: Db) -> None:
    @processor("configured", retries=5, retry_interval=timedelta(hours=1))
    def configured(action):
        raise RuntimeError("down")

    action = init_action(db.engine, "configured", {}, retries=1)
    drain(db, processors={"configured": {"retry_interval": timedelta(0)}})
    failed = admin.get_action(db.engine, action.id)
    assert (failed.status, failed.attempts) == (Status.FAILED, 2)


def test_disabled_processor_actions_are_not_claimed(db: Db) -> None:
    ran: list[str] = []

    @processor("off")
    def off(action):
        ran.append("off")

    @processor("on")
    def on(action):
        ran.append("on")

    init_action(db.engine, "off", {})
    init_action(db.engine, "on", {})
    drain(db, processors={"off": {"enabled": False}})
    assert ran == ["on"]
    assert db.scalar("SELECT status FROM async_action WHERE processor = 'off'") == "pending"


def test_processors_option_limits_what_the_worker_claims(db: Db) -> None:
    ran: list[str] = []

    for name in ("a", "b"):
        processor(name)(lambda action, name=name: ran.append(name))
    init_actions(db.engine, "a", [{}] * 3)
    init_actions(db.engine, "b", [{}] * 3)
    Worker(config=config(db), processors=["b"]).run(burst=True)
    assert ran == ["b"] * 3
    with pytest.raises(UnknownProcessor, match="unknown processor 'c'"):
        Worker(config=config(db), processors=["c"])


def test_the_claim_session_gets_every_one_of_its_settings(pg: Db) -> None:
    """All sent in one round trip: each is in force on the connection afterwards."""
    wanted = dict(setting.removeprefix("SET ").split(" = ") for setting in CLAIM_SESSION)
    conn = KeptConnection(pg.engine, single_statements=True, on_connect=set_claim_session)
    with conn.begin() as c:
        seen = {name: c.exec_driver_sql(f"SHOW {name}").scalar_one() for name in wanted}
    conn.close()
    assert seen == wanted and wanted["synchronous_commit"] == "off"


def test_claims_reuse_one_cached_plan_instead_of_planning_each_claim(pg: Db) -> None:
    init_actions(pg.engine, "p", [{}] * 30)
    conn = KeptConnection(pg.engine, single_statements=True, on_connect=set_claim_session)
    for _ in range(20):  # psycopg prepares a statement after 5 runs
        with conn.begin() as c:
            claimed, _ = queries.claim(c, "w", [("p", 3)], 1, timedelta(minutes=5))
            assert len(claimed) == 1
    with conn.begin() as c:
        generic, custom = c.exec_driver_sql(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
            "WHERE position('picked' in statement) > 0").one()
    conn.close()
    # Left to choose, PostgreSQL plans the first five runs anew and weighs the two kinds
    # again at each ANALYZE (some tipped a running worker to planning every claim); the
    # claim session has it run the one generic plan, the walk of the claim index.
    assert generic >= 10 and custom == 0


def test_outcome_writes_reuse_one_cached_plan_on_a_session_of_their_own(pg: Db) -> None:
    init_actions(pg.engine, "p", [{}] * 30)
    completer = Completer(pg.engine, lambda *_: None, own_session=lambda: True)
    conn = completer.connection()
    for _ in range(20):  # psycopg prepares a statement after 5 runs
        with pg.engine.begin() as c:
            (action,), _ = queries.claim(c, "w", [("p", 3)], 1, timedelta(minutes=5))
        completer.write(conn, [completed(action, None)])
    with conn.begin() as c:
        generic, custom = c.exec_driver_sql(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
            "WHERE position('json_to_recordset' in statement) > 0").one()
    conn.close()
    # Left to choose, PostgreSQL planned the first five batches anew (on a table of
    # 20,000 rows, every one).
    assert generic >= 10 and custom == 0
    assert pg.scalar("SELECT count(*) FROM async_action WHERE status = 'completed'") == 20


def test_outcome_writes_on_a_session_of_their_own_read_running_rows_by_the_lease_index(
        pg: Db) -> None:
    """The completer's session runs the write's one generic plan, which must still find
    the running rows by the partial lease index: with the status a bound value, the plan
    could not prove the index's predicate and read the whole table for every batch."""
    init_actions(pg.engine, "p", [{}] * 2_010)
    with pg.engine.begin() as c:  # what a drain leaves: many finished, a few running
        done, _ = queries.claim(c, "w", [("p", 3)], 2_000, timedelta(minutes=5))
        queries.record(c, [completed(a, None) for a in done])
    completer = Completer(pg.engine, lambda *_: None, own_session=lambda: True)
    conn = completer.connection()
    with conn.begin() as c:
        plans = plans_sent_here(c)
    for _ in range(8):  # psycopg prepares a statement after 5 runs
        with pg.engine.begin() as c:
            (action,), _ = queries.claim(c, "w", [("p", 3)], 1, timedelta(minutes=5))
        completer.write(conn, [completed(action, None)])
    conn.close()
    writes = [[n for n in plan_nodes(ran["Plan"]) if n.get("Relation Name") == "async_action"
               or n.get("Index Name")] for ran in plans if "json_to_recordset" in ran["Query Text"]]
    assert len(writes) == 8
    for scans in writes[-3:]:  # the prepared statement's generic plan
        assert "Seq Scan" not in {n["Node Type"] for n in scans}, scans
        assert any(n.get("Index Name") == "async_action_lease_idx" for n in scans), scans


def test_a_processor_gets_its_actions_times_in_utc_whatever_zone_the_server_is_in(
        db: Db, kind: str) -> None:
    seen: list = []
    processor_of(kind, "when")(seen.append)
    stored = init_action(db.engine, "when", {})
    # Sessions of this worker's engine start in New York (SQLite keeps UTC text).
    url = db.url + ("?options=-c%20TimeZone%3DAmerica/New_York"
                    if db.name == "postgresql" else "")
    Worker(config=Config(database_url=url, worker=config(db).worker)).run(burst=True)
    (action,) = seen
    for at in (action.created_at, action.next_eligible_at, action.started_at,
               action.lease_expires_at):
        assert at.utcoffset() == timedelta(0)
    assert action.created_at == stored.created_at
    assert action.started_at >= action.created_at


def test_an_idle_worker_wakes_on_the_enqueue_not_the_poll_even_after_losing_its_backend(
        pg: Db) -> None:
    picked: queue.Queue[int] = queue.Queue()

    @processor("wake_me")
    def wake_me(action):
        picked.put(action.data["n"])

    polls_rarely = Config(database_url=pg.url,
                          worker=WorkerSettings(poll_interval=timedelta(minutes=10)))
    worker = Worker(config=polls_rarely)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        for n in range(3):
            init_action(pg.engine, "wake_me", {"n": n})
            assert picked.get(timeout=10) == n  # not the 10-minute poll
        # The claim connection, which also listens, is cut: the worker connects again
        # and listens on the new connection.
        killed = pg.scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND query LIKE 'WITH picked%'")
        assert killed == 1
        for n in range(3, 6):
            init_action(pg.engine, "wake_me", {"n": n})
            assert picked.get(timeout=10) == n
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_a_backend_terminated_while_the_claim_connection_proves_its_session_is_retried(
        pg: Db, caplog: pytest.LogCaptureFixture) -> None:
    """A new claim connection listens, then waits for a probe notification to prove it is
    a session of its own; a backend terminated in that wait is one more database error
    the claim loop survives: it connects again and listens, not a worker that exits (nor
    one that takes the lost probe for a pooler and polls from then on)."""
    picked: queue.Queue[int] = queue.Queue()
    terminated: list[int] = []

    @processor("probed")
    def probed(action):
        picked.put(action.data["n"])

    def cut_the_listener_at_the_first_probe(conn, cursor, statement, params, context,
                                            executemany) -> None:
        if "pg_notify" in statement and "probe:" in str(params) and not terminated:
            terminated.append(pg.scalar(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query = :listen", listen=LISTEN))

    init_action(pg.engine, "probed", {"n": 1})
    polls_rarely = Config(database_url=pg.url,
                          worker=WorkerSettings(poll_interval=timedelta(minutes=10)))
    event.listen(Engine, "before_cursor_execute", cut_the_listener_at_the_first_probe)
    try:
        with caplog.at_level(logging.WARNING, logger="asyncactions.claiming"), \
                worker_thread(Worker(config=polls_rarely)) as thread:
            assert picked.get(timeout=20) == 1  # claimed at once on the new connection
            assert terminated == [1]
            init_action(pg.engine, "probed", {"n": 2})
            assert picked.get(timeout=10) == 2  # woken by its notification, not the poll
            assert thread.is_alive()
    finally:
        event.remove(Engine, "before_cursor_execute", cut_the_listener_at_the_first_probe)
    assert not thread.is_alive()
    assert "claiming failed" in caplog.text  # the error path, then a new connection
    assert "did not come back" not in caplog.text


def test_a_worker_whose_first_connection_is_terminated_at_once_still_starts(
        pg: Db) -> None:
    """The database answered, then dropped the connection before SQLAlchemy's own set-up
    queries on it ran (a backend terminated, a restart): a blip the start-up retries,
    not a database that cannot be used."""
    picked: queue.Queue[int] = queue.Queue()
    terminated: list[int] = []

    @processor("first_connection_cut")
    def first_connection_cut(action):
        picked.put(action.data["n"])

    def cut_the_first_connection(dbapi_connection, record) -> None:
        if terminated or dbapi_connection.info.dbname != pg.engine.url.database:
            return
        pid = dbapi_connection.info.backend_pid
        terminated.append(pid)
        pg.scalar("SELECT pg_terminate_backend(:pid)", pid=pid)
        wait_until(lambda: pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid",
                                     pid=pid) == 0, what="the backend to end")

    init_action(pg.engine, "first_connection_cut", {"n": 1})
    # On every new pool, ahead of SQLAlchemy's own first-connection set-up.
    event.listen(Pool, "first_connect", cut_the_first_connection, insert=True)
    try:
        with worker_thread(Worker(config=config(pg))) as thread:
            assert picked.get(timeout=20) == 1
            assert len(terminated) == 1
            assert thread.is_alive()
    finally:
        event.remove(Pool, "first_connect", cut_the_first_connection)
    assert not thread.is_alive()


def test_waking_reads_every_notification_so_none_pile_up_on_the_claim_connection(
        pg: Db) -> None:
    listening = psycopg.connect(pg.engine.url.set(drivername="postgresql")
                                .render_as_string(hide_password=False), autocommit=True)
    listening.execute(LISTEN)
    init_actions(pg.engine, "not_mine", [{}] * 3)  # one notification for the three
    init_action(pg.engine, "not_mine", {})
    init_action(pg.engine, "not_mine", {})
    listening.execute("SELECT 1")  # they arrive with this reply, as during a claim
    Wakeup(["mine"]).wait(0, listening)  # what the claim loop does between full claims
    assert list(listening.notifies(timeout=0.2)) == []
    listening.close()


def test_worker_without_processors_is_a_clear_error(db: Db) -> None:
    with pytest.raises(ConfigError, match="no enabled processors"):
        Worker(config=config(db))


def test_stop_from_another_thread_ends_a_running_worker(db: Db) -> None:
    started = threading.Event()

    @processor("signal_start")
    def signal_start(action):
        started.set()

    worker = Worker(config=config(db))
    thread = threading.Thread(target=worker.run)
    thread.start()
    init_action(db.engine, "signal_start", {})
    assert started.wait(10), "the running worker never picked the action up"
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert db.scalar("SELECT status FROM async_action") == "completed"
    assert db.scalar("SELECT count(*) FROM async_action_worker") == 0


def test_a_canceled_action_stays_canceled_when_its_attempt_finishes(db: Db) -> None:
    entered, release = threading.Event(), threading.Event()

    @processor("slow")
    def slow(action):
        entered.set()
        release.wait(10)
        return "late result"

    action = init_action(db.engine, "slow", {})
    worker = Worker(config=config(db))
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    thread.start()
    assert entered.wait(10)
    assert admin.cancel(db.engine, action.id).status == Status.CANCELED
    release.set()
    thread.join(10)
    final = admin.get_action(db.engine, action.id)
    assert (final.status, final.result) == (Status.CANCELED, None)


def test_an_attempt_longer_than_the_lease_keeps_it_while_the_worker_beats(db: Db) -> None:
    """The heartbeat renews the leases of running attempts again and again: an attempt
    that lasts several leases is neither rescued nor run twice."""
    lease = 2  # seconds: a second's stall of a loaded machine is not a lost worker
    started: list[int] = []
    beats_seen = threading.Event()

    @processor("long", retries=0)
    def long(action):
        started.append(action.id)
        lease_at_start = admin.get_action(db.engine, action.id).lease_expires_at
        begun = time.monotonic()
        renewals = set()
        # Three renewals at least, and two leases' time.
        while (len(renewals) < 3 or time.monotonic() - begun < 2 * lease) and \
                time.monotonic() - begun < 30:
            renewals.add(admin.get_action(db.engine, action.id).lease_expires_at)
            renewals.discard(lease_at_start)
            time.sleep(0.05)
        if len(renewals) >= 3:
            beats_seen.set()

    action = init_action(db.engine, "long")
    settings = WorkerSettings(poll_interval=timedelta(milliseconds=50),
                              lease=timedelta(seconds=lease))
    Worker(config=Config(database_url=db.url, worker=settings), concurrency=2).run(burst=True)
    assert beats_seen.is_set()
    done = admin.get_action(db.engine, action.id)
    assert (done.status, done.attempts, started) == (Status.COMPLETED, 1, [action.id]), done.error


def test_a_listening_worker_runs_a_delayed_action_when_the_leader_wakes_it(pg: Db) -> None:
    """A listening worker polls only as a safety net (every 30 s with the default lease):
    the leader's wake-up, every poll interval, notifies it once the delay has run out."""
    ran = threading.Event()

    @processor("later")
    def later(action):
        ran.set()

    with worker_thread(Worker(config=config(pg), concurrency=1)):
        init_action(pg.engine, "later", delay=timedelta(seconds=1))
        wait_until(ran.is_set, 15, what="the delayed action, woken once due")


def asked_claims(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """How many actions each claim of processor `name` asks for, as it is made."""
    asked: list[int] = []
    claim = queries.claim

    def recorded(conn, worker, processors, free, *args, **kwargs):
        if name in dict(processors):
            asked.append(free)
        return claim(conn, worker, processors, free, *args, **kwargs)

    monkeypatch.setattr(queries, "claim", recorded)
    return asked


def test_a_worker_holds_a_second_waiting_attempt_per_thread_once_its_attempts_are_quick(
        db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    """Quick attempts: claims of up to three attempts per thread (one running, two
    waiting), which cost less per action."""
    asked = asked_claims(monkeypatch, "instant")

    @processor("instant")
    def instant(action):
        pass

    init_actions(db.engine, "instant", [{}] * 300)
    drain(db, concurrency=2)
    assert max(asked) > PREFETCH * 2
    assert max(asked) <= PREFETCH_QUICK * 2


def test_a_worker_holds_one_waiting_attempt_per_thread_while_its_attempts_are_slow(
        db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow attempts: never more than one waiting per thread, so a backlog is not held by
    one worker while another has threads free."""
    asked = asked_claims(monkeypatch, "slow")

    @processor("slow")
    def slow(action):
        time.sleep(0.02)

    init_actions(db.engine, "slow", [{}] * 12)
    drain(db, concurrency=2)
    assert asked  # the slow actions were claimed
    assert max(asked) <= PREFETCH * 2


def test_claims_stop_while_the_outcomes_not_yet_written_reach_their_bound(
        pg: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a crash can make run twice is bounded: while the outcome writes are held up,
    a worker holds at most its slots' attempts plus MAX_UNWRITTEN outcomes."""
    written = threading.Event()  # the completer's writes wait for this
    write = Completer.write

    def held_up(self: Completer, conn: KeptConnection, batch: list) -> None:
        written.wait(60)
        write(self, conn, batch)

    monkeypatch.setattr(Completer, "write", held_up)
    rounds = [0]  # claim rounds run so far
    claim_round = Claimer.claim_round

    def counted(self: Claimer, conn: KeptConnection) -> tuple[int, bool]:
        rounds[0] += 1
        return claim_round(self, conn)

    monkeypatch.setattr(Claimer, "claim_round", counted)

    @processor("quick")
    def quick(action):
        pass

    init_actions(pg.engine, "quick", [{}] * (MAX_UNWRITTEN + 500))
    slots = PREFETCH_QUICK * 2  # concurrency 2, attempts quick
    running = "SELECT count(*) FROM async_action WHERE status = 'running'"
    with worker_thread(Worker(config=config(pg), concurrency=2)):
        try:
            wait_until(lambda: pg.scalar(running) >= MAX_UNWRITTEN, 60,
                       what="claims up to the bound")
            for _ in range(10):  # each enqueue's notification wakes a claim round
                seen = rounds[0]
                init_action(pg.engine, "quick")
                wait_until(lambda seen=seen: rounds[0] > seen, 30, what="a claim round")
            assert pg.scalar(running) <= slots + MAX_UNWRITTEN
        finally:
            written.set()
