"""SPEC §3 "Flow control and live attempts", statement by statement on both backends:
ordering keys, concurrency caps, rate limits, pause and resume, progress and cancel.
(tests/test_flow_workers.py holds them across real worker processes.)"""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from sqlalchemy import Float, event, insert, literal, select, text
from sqlalchemy import exc as sa_exc

import asyncactions
from asyncactions import (
    AsyncActionsError,
    ConfigError,
    UnknownProcessor,
    admin,
    init_action,
    init_actions,
    processor,
    queries,
)
from asyncactions.action import Action, Status
from asyncactions.config import load_config
from asyncactions.live import CancelWatch, LiveAttempt, LiveAttempts
from asyncactions.maintenance import StartsTrimmer
from asyncactions.outcomes import Kind, Outcome
from asyncactions.schema import async_action_start, db_now

from .conftest import Db, cli, wait_until, worker_config

LEASE = timedelta(minutes=5)


def claim(db: Db, processors: list[str], free: int = 100, flow: queries.Flow | None = None,
          worker: str = "w1") -> list[Action]:
    with db.engine.begin() as conn:
        if flow is not None:
            queries.lock_processor(conn, processors[0], LEASE)
        actions, _ = queries.claim(conn, worker, [(p, 3) for p in processors], free, LEASE,
                                   flow)
    return actions


def finish(db: Db, action: Action, kind: Kind = Kind.COMPLETED,
           delay: timedelta = timedelta(0)) -> None:
    with db.engine.begin() as conn:
        assert queries.record(conn, [Outcome(action, kind, action.retries or 0, delay=delay)])


def ids(actions: list[Action]) -> list[int]:
    return [a.id for a in actions]


# --- ordering keys -------------------------------------------------------------------------

def test_actions_of_one_ordering_key_run_one_at_a_time_in_id_order(db: Db) -> None:
    first, second, third = (init_action(db.engine, "p", {"n": n}, ordering_key="customer:42")
                            for n in range(3))
    keyless = init_action(db.engine, "p", {"n": 9})
    other_key = init_action(db.engine, "p", {"n": 10}, ordering_key="customer:7")
    assert first.ordering_key == "customer:42"
    assert sorted(ids(claim(db, ["p"]))) == sorted([first.id, keyless.id, other_key.id])
    assert claim(db, ["p"]) == [], "the second of the key waits for the first"
    finish(db, admin.get_action(db.engine, first.id))
    assert ids(claim(db, ["p"])) == [second.id]
    finish(db, admin.get_action(db.engine, second.id))
    assert ids(claim(db, ["p"])) == [third.id]


def test_a_pending_retry_holds_later_actions_of_its_key_back(db: Db) -> None:
    first, second = (init_action(db.engine, "p", {}, ordering_key="k") for _ in range(2))
    (running,) = claim(db, ["p"])
    finish(db, running, Kind.RETRIED, delay=timedelta(hours=1))  # pending, not yet eligible
    assert admin.get_action(db.engine, first.id).status == Status.PENDING
    assert claim(db, ["p"]) == []
    admin.cancel(db.engine, first.id)  # a canceled one lets them go
    assert ids(claim(db, ["p"])) == [second.id]


def test_a_failed_action_lets_the_later_ones_of_its_key_go(db: Db) -> None:
    first, second = (init_action(db.engine, "p", {}, ordering_key="k") for _ in range(2))
    (running,) = claim(db, ["p"])
    finish(db, running, Kind.FAILED)
    assert admin.get_action(db.engine, first.id).status == Status.FAILED
    assert ids(claim(db, ["p"])) == [second.id]


def test_an_earlier_action_run_again_waits_for_the_running_one_of_its_key(db: Db) -> None:
    first, second = (init_action(db.engine, "p", {}, ordering_key="k") for _ in range(2))
    finish(db, claim(db, ["p"])[0])
    assert ids(claim(db, ["p"])) == [second.id]
    admin.retry(db.engine, first.id)  # earlier in id order, but the later one is running
    assert claim(db, ["p"]) == []


def test_bulk_enqueue_takes_an_ordering_key_per_item(db: Db) -> None:
    by_fn = init_actions(db.engine, "p", [{"c": i % 2} for i in range(4)],
                         ordering_key=lambda d: f"c:{d['c']}")
    by_list = init_actions(db.engine, "p", [{}, {}], ordering_key=["x", None])
    one_key = init_actions(db.engine, "p", [{}, {}], ordering_key="all")
    with_unique = init_actions(db.engine, "p", [{"u": 1}, {"u": 2}], ordering_key=["u", "u"],
                               unique_key=lambda d: f"u{d['u']}")
    expected = ["c:0", "c:1", "c:0", "c:1", "x", None, "all", "all", "u", "u"]
    actions = [*by_fn, *by_list, *one_key, *with_unique]
    assert [a.ordering_key for a in actions] == expected
    assert [admin.get_action(db.engine, a.id).ordering_key for a in actions] == expected
    with pytest.raises(AsyncActionsError, match="ordering_key has 1 keys for 2 actions"):
        init_actions(db.engine, "p", [{}, {}], ordering_key=["a"])
    with pytest.raises(AsyncActionsError, match="ordering_key must be a str or None, not int"):
        init_action(db.engine, "p", {}, ordering_key=42)  # type: ignore[arg-type]


def test_a_large_bulk_enqueue_by_copy_keeps_each_ordering_key(pg: Db) -> None:
    actions = init_actions(pg.engine, "p", [{"i": i} for i in range(1500)],
                           ordering_key=lambda d: f"k\t{d['i'] % 3}" if d["i"] % 5 else None)
    stored = dict(pg.rows("SELECT id, ordering_key FROM async_action"))
    assert [stored[a.id] for a in actions] == [a.ordering_key for a in actions]
    assert actions[1].ordering_key == "k\t1" and actions[0].ordering_key is None


def test_two_claimers_never_run_two_actions_of_one_key_at_once(pg: Db) -> None:
    """The race the claim's NOT EXISTS cannot see: a lower id of the key commits after
    a claimer took the higher one, and a second claimer, in between, sees the lower one
    as first. The unique index on running keys refuses the second claim."""
    later = init_action(pg.engine, "p", {}, ordering_key="k")
    with pg.engine.connect() as producer, pg.engine.connect() as first_claimer:
        producer.begin()
        producer.execute(text("INSERT INTO async_action (id, processor, ordering_key, "
                              "next_eligible_at, created_at) VALUES (:id, 'p', 'k', now(), "
                              "now())"), {"id": later.id - 1 if later.id > 1 else 0})
        first_claimer.begin()
        taken, _ = queries.claim(first_claimer, "w1", [("p", 3)], 10, LEASE)
        assert ids(taken) == [later.id]
        producer.commit()  # the earlier action appears while the first claim is open
        second: list[object] = []

        def claim_second() -> None:
            try:
                second.append(claim(pg, ["p"], worker="w2"))
            except sa_exc.IntegrityError as exc:
                second.append(exc)

        thread = threading.Thread(target=claim_second)
        thread.start()
        # Its insert into the unique index waits for the first claim's transaction.
        wait_until(lambda: not thread.is_alive() or pg.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"), 30, what="the second claim to wait on a lock")
        assert thread.is_alive(), "the second claim waits on the first one's key"
        first_claimer.commit()
        thread.join(10)
    assert isinstance(second[0], sa_exc.IntegrityError)
    assert pg.scalar("SELECT count(*) FROM async_action WHERE status = 'running'") == 1


# --- concurrency caps and rate limits --------------------------------------------------------

def test_a_concurrency_cap_claims_only_what_the_cluster_has_room_for(db: Db) -> None:
    init_actions(db.engine, "capped", [{}] * 5)
    cap = queries.Flow(2, None, None)
    first = claim(db, ["capped"], 10, cap)
    assert len(first) == 2
    assert claim(db, ["capped"], 10, cap, worker="w2") == []
    finish(db, first[0])
    assert len(claim(db, ["capped"], 10, cap, worker="w2")) == 1
    assert db.scalar("SELECT count(*) FROM async_action WHERE status = 'pending' "
                     "AND attempts = 0") == 2, "held back: still pending, no attempt spent"


def test_concurrent_claimers_of_a_capped_processor_never_exceed_its_cap(pg: Db) -> None:
    init_actions(pg.engine, "capped", [{}] * 50)
    cap = queries.Flow(3, None, None)
    for _ in range(5):  # a race: run it a few times
        start = threading.Barrier(8)
        claimed: list[int] = []

        def claimer(n: int, start: threading.Barrier = start,
                    claimed: list[int] = claimed) -> None:
            start.wait()
            claimed.append(len(claim(pg, ["capped"], 5, cap, worker=f"w{n}")))

        threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sum(claimed) == 3
        assert pg.scalar("SELECT count(*) FROM async_action WHERE status = 'running'") == 3
        with pg.engine.begin() as conn:
            conn.execute(text("UPDATE async_action SET status = 'pending' "
                              "WHERE status = 'running'"))


def test_a_rate_limit_starts_no_more_than_its_count_within_the_window(db: Db) -> None:
    init_actions(db.engine, "rated", [{}] * 5)
    rate = queries.Flow(None, 3, 3600.0)
    first = claim(db, ["rated"], 10, rate)
    assert len(first) == 3
    for action in first:
        finish(db, action)  # finished attempts still count: they started in the window
    assert claim(db, ["rated"], 10, rate) == []
    with db.engine.connect() as conn:
        opens = queries.rate_window_opens(conn, "rated", 3, 3600.0)
    assert opens is not None and 3590 < opens <= 3600
    assert len(claim(db, ["rated"], 10, queries.Flow(None, 5, 3600.0))) == 2


def test_the_leader_trims_logged_starts_that_no_rate_window_counts(db: Db) -> None:
    init_actions(db.engine, "rated", [{}] * 4)
    assert len(claim(db, ["rated"], 4, queries.Flow(None, 10, 1.0))) == 4
    assert db.scalar("SELECT count(*) FROM async_action_start") == 4
    with db.engine.begin() as conn:  # and two from longer ago than the longest window
        for ago in (3601.0, 7200.0):
            conn.execute(insert(async_action_start).from_select(
                ["processor", "started_at"],
                select(literal("rated"), db_now(literal(-ago, Float)))))
    assert StartsTrimmer(db.engine).run_once() == 2
    assert db.scalar("SELECT count(*) FROM async_action_start") == 4


def test_processor_caps_come_from_the_decorator_and_the_config_file(tmp_path) -> None:
    @processor("limited", concurrency=2, rate_limit="5/s")
    def limited(action: Action) -> None:
        pass

    settings = asyncactions.processors.lookup("limited").settings  # type: ignore[union-attr]
    assert settings.concurrency == 2 and str(settings.rate_limit) == "5/s"
    assert settings.rate_limit.count == 5 and settings.rate_limit.seconds == 1.0
    (tmp_path / "c.toml").write_text('[processors.limited]\nconcurrency = 4\n'
                                     'rate_limit = "100/m"\n')
    config = load_config(tmp_path / "c.toml")
    assert config.processors["limited"]["concurrency"] == 4
    assert config.processors["limited"]["rate_limit"].seconds == 60.0


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("rate_limit", "5 per second",
     "@processor('x') rate_limit: must be COUNT/PERIOD with a COUNT of 1 or more and a "
     "PERIOD of s, m or h (e.g. \"5/s\", \"100/m\"), got '5 per second'"),
    ("concurrency", 0, "@processor('x') concurrency: must be a whole number from 1 to "
                       "1000000, got 0"),
])
def test_bad_caps_are_refused_in_one_line_naming_the_setting(setting: str, value: object,
                                                              message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        processor("x", **{setting: value})
    assert str(refused.value) == message


def test_bad_caps_in_the_config_file_are_refused_in_one_line(tmp_path) -> None:
    (tmp_path / "asyncactions.toml").write_text('[processors.x]\nrate_limit = "5 per second"\n')
    result = cli("processors", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "[processors.x] rate_limit: must be COUNT/PERIOD" in result.stderr


# --- pause and resume ---------------------------------------------------------------------

def test_a_paused_processor_is_not_claimed_until_it_is_resumed(db: Db) -> None:
    action = init_action(db.engine, "p", {})
    other = init_action(db.engine, "q", {})
    state = asyncactions.pause(db.engine, "p", by="ops")
    assert state.paused and state.paused_by == "ops"
    assert ids(claim(db, ["p", "q"])) == [other.id]
    init_action(db.engine, "p", {})  # still enqueued while paused
    with db.engine.connect() as conn:
        assert not queries.any_eligible(conn, ["p"])
    assert admin.processor_states(db.engine)["p"].paused
    assert not asyncactions.resume(db.engine, "p").paused
    assert action.id in ids(claim(db, ["p"]))


def test_pausing_an_unknown_processor_is_refused(db: Db) -> None:
    with pytest.raises(UnknownProcessor, match="unknown processor 'nope'; known: none"):
        asyncactions.pause(db.engine, "nope")
    assert db.scalar("SELECT count(*) FROM async_action_processor") == 0


def test_cli_pause_and_resume_show_in_processors(db: Db, tmp_path) -> None:
    (tmp_path / "procs.py").write_text(
        "from asyncactions import processor\n"
        "@processor('mailer', concurrency=3, rate_limit='20/s')\n"
        "def mailer(action):\n    pass\n")
    env = {"ASYNCACTIONS_DATABASE_URL": db.url, "PYTHONPATH": str(tmp_path)}
    init_action(db.engine, "mailer", {})
    unknown = cli("pause", "mailer", "nope", cwd=tmp_path, env=env)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "unknown processor 'nope'" in unknown.stderr
    assert db.scalar("SELECT count(*) FROM async_action_processor") == 0, "all or none"
    paused = cli("pause", "mailer", cwd=tmp_path, env=env)
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout == "mailer paused\n"
    shown = cli("processors", "--import", "procs", "--format", "json", cwd=tmp_path, env=env)
    (row,) = [json.loads(line) for line in shown.stdout.splitlines()]
    assert row["state"] == "paused" and row["concurrency"] == 3 and row["rate_limit"] == "20/s"
    assert row["paused_by"] and row["paused_at"]
    assert cli("resume", "mailer", cwd=tmp_path, env=env).stdout == "mailer resumed\n"
    shown = cli("processors", "--import", "procs", "--format", "json", cwd=tmp_path, env=env)
    assert json.loads(shown.stdout)["state"] == "running"


# --- live attempts ------------------------------------------------------------------------

def test_progress_is_stored_for_the_running_attempt_and_checked(db: Db) -> None:
    init_action(db.engine, "p", {})
    (action,) = claim(db, ["p"])
    live = LiveAttempt([action], db.engine)
    live.progress(0.4, "40 of 100 rows")
    stored = admin.get_action(db.engine, action.id).progress
    assert stored["fraction"] == 0.4 and stored["message"] == "40 of 100 rows"
    assert stored["at"].startswith("20")
    with pytest.raises(AsyncActionsError) as refused:
        live.progress(1.5)
    assert str(refused.value) == ("progress(): fraction must be a number from 0 to 1 "
                                  "(0.4 for 40%), got 1.5")
    admin.cancel(db.engine, action.id)
    live.progress(0.9)  # fenced: a canceled attempt's report changes nothing
    assert admin.get_action(db.engine, action.id).progress["fraction"] == 0.4


def test_an_attempt_that_ends_while_the_cancel_watch_looks_is_not_taken_for_canceled(
        db: Db) -> None:
    init_action(db.engine, "p", {})
    init_action(db.engine, "p", {})
    with db.engine.begin() as conn:
        (ending, canceled), _ = queries.claim(conn, "w", [("p", 3)], 2, timedelta(minutes=5))
    live = LiveAttempts()
    attempts = [LiveAttempt([a], db.engine) for a in (ending, canceled)]
    tokens = [live.begin(a) for a in attempts]
    admin.cancel(db.engine, canceled.id)

    def meanwhile(*_: object) -> None:  # between the watch's look at its attempts and
        if attempts[0] in live.snapshot():  # its read of their rows
            live.end(attempts[0], tokens[0])
            with db.engine.begin() as conn:
                queries.record(conn, [Outcome(ending, Kind.COMPLETED, 3)])
    event.listen(db.engine, "before_cursor_execute", meanwhile)
    try:
        assert CancelWatch(db.engine, live).run_once() == 1
    finally:
        event.remove(db.engine, "before_cursor_execute", meanwhile)
    assert (attempts[0].cancel_requested, attempts[1].cancel_requested) == (False, True)


def test_an_attempt_whose_action_was_claimed_again_by_its_own_worker_is_told_to_stop(
        db: Db) -> None:
    """Lost (its lease ran out while it hung) and claimed again by the same worker: the
    row says running, by this worker, but for the next attempt, not this one."""
    init_action(db.engine, "p", {})
    with db.engine.begin() as conn:
        (action,), _ = queries.claim(conn, "w", [("p", 3)], 1, timedelta(minutes=5))
    live = LiveAttempts()
    attempt = LiveAttempt([action], db.engine)
    token = live.begin(attempt)
    try:
        assert CancelWatch(db.engine, live).run_once() == 0
        with db.engine.begin() as conn:  # the rescue, then this worker's next claim of it
            conn.execute(text("UPDATE async_action SET attempts = attempts + 1 "
                              "WHERE id = :id"), {"id": action.id})
        assert CancelWatch(db.engine, live).run_once() == 1
        assert attempt.cancel_requested
    finally:
        live.end(attempt, token)  # current_attempt() is this thread's: leave it as found


def test_current_attempt_outside_a_processor_is_an_error() -> None:
    with pytest.raises(AsyncActionsError, match="only available inside a processor"):
        asyncactions.current_attempt()


def test_a_processor_sees_its_attempt_its_cancel_and_reports_progress(db: Db) -> None:
    seen: dict[str, object] = {}
    started = threading.Event()

    @processor("long")
    def long(action: Action) -> str:
        attempt = asyncactions.current_attempt()
        seen["action"] = attempt.action.id
        attempt.progress(0.5, "half way")
        started.set()
        while not attempt.cancel_requested and not seen.get("give_up"):
            threading.Event().wait(0.01)
        seen["stopped"] = True
        return "stopped"

    action = init_action(db.engine, "long", {})
    worker = asyncactions.Worker(config=worker_config(db), processors=["long"])
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        assert started.wait(30)
        assert admin.get_action(db.engine, action.id).progress["message"] == "half way"
        admin.cancel(db.engine, action.id)
        # The watch looks twice a second: the processor learns it within about a second.
        wait_until(lambda: seen.get("stopped"), timeout=10, what="the processor to stop")
    finally:
        seen["give_up"] = True
        worker.stop()
        thread.join(30)
    assert seen["action"] == action.id
    assert admin.get_action(db.engine, action.id).status == Status.CANCELED


def test_a_capped_action_is_claimed_while_the_worker_is_busy_and_starts_next(
        db: Db) -> None:
    """Every slot taken and one attempt waiting: the claim loop still claims for a capped
    processor, and its attempt goes ahead of the one waiting (it holds a slot of the
    cluster's cap from its claim on)."""
    gate, started = threading.Event(), []

    @processor("plain")
    def plain(action):
        started.append(("plain", action.id))
        gate.wait(30)

    @processor("capped", concurrency=1)
    def capped(action):
        started.append(("capped", action.id))

    plains = init_actions(db.engine, "plain", [{}] * 3)
    worker = asyncactions.Worker(config=worker_config(db), concurrency=1)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        # One running, one claimed ahead and waiting for the slot.
        wait_until(lambda: db.scalar("SELECT count(*) FROM async_action "
                                     "WHERE status = 'running'") == 2, 30,
                   what="the slot taken and one attempt waiting")
        urgent = init_action(db.engine, "capped")
        wait_until(lambda: admin.get_action(db.engine, urgent.id).status != Status.PENDING,
                   30, what="the capped action claimed while the worker is busy")
        gate.set()
        wait_until(lambda: len(started) == 4, 30, what="every attempt")
    finally:
        gate.set()
        worker.stop()
        thread.join(30)
    assert started == [("plain", plains[0].id), ("capped", urgent.id),
                       ("plain", plains[1].id), ("plain", plains[2].id)]
