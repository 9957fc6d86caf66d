"""The claim floor: a worker's claims in quick succession start their walk of the claim
index where the previous claim's first action was, so a long transaction that pins the
xmin horizon (every claimed action's entry then stays in the index) does not make each
claim step over all of them; a walk from the front comes due again after EVERY times
its own duration, so nothing below a floor waits longer than that."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from asyncactions import (
    Defer,
    Status,
    Worker,
    admin,
    init_action,
    init_actions,
    processor,
    queries,
)
from asyncactions.action import Action
from asyncactions.claiming import CLAIM_SESSION, ClaimFloor
from asyncactions.config import WorkerSettings
from asyncactions.maintenance import Waker

from .conftest import Db, index_scans, wait_until, worker_thread
from .conftest import worker_config as config

LEASE = timedelta(minutes=5)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def act(id: int, processor: str = "p", priority: int = 0, second: int = 0) -> Action:
    at = T0 + timedelta(seconds=second)
    return Action(id, processor, Status.RUNNING, None, None, priority, 3, 1, None, [], None,
                  None, at, at, at, None, "w", None)


def key(a: Action) -> queries.Key:
    return (a.priority, a.next_eligible_at, a.id)


# --- the policy ----------------------------------------------------------------------

def front(floor: ClaimFloor, actions: list[Action], at: float, cost: float,
          short: bool = False) -> float | None:
    return floor.claimed(actions, at, at + cost, floored=False, short=short)


def floored(floor: ClaimFloor, actions: list[Action], at: float, cost: float,
            short: bool = False) -> float | None:
    return floor.claimed(actions, at, at + cost, floored=True, short=short)


def test_a_claim_walks_from_the_front_until_one_took_actions() -> None:
    floor = ClaimFloor(enabled=True)
    assert floor.floors(0.0) is None
    front(floor, [], 0.0, 0.5)
    assert floor.floors(1.0) is None


def in_use(floor: ClaimFloor, front_cost: float = 0.5, floor_cost: float = 0.125) -> float:
    """VOTES (two) probes in a row that find a floor CHEAPER; the time after them."""
    front(floor, [act(1)], 0.0, front_cost)
    at = front_cost
    for second in (3, 4):
        assert floor.floors(at) is not None  # a probe
        floored(floor, [act(second, second=second)], at, floor_cost)
        at += floor_cost
        if not floor.in_use:
            at += ClaimFloor.PROBE
            front(floor, [], at, front_cost)
            at += front_cost
    return at


def test_on_a_healthy_database_claims_walk_from_the_front_but_for_a_probe() -> None:
    floor = ClaimFloor(enabled=True)
    first, later = act(7, second=1), act(9, second=2)
    front(floor, [later, first], 0.0, 0.5)
    assert floor.floors(0.5) == {"p": key(first)}  # a probe: what would a floor save?
    floored(floor, [act(11, second=3), act(12, second=3)], 0.5, 0.375)  # not CHEAPER
    assert not floor.in_use
    assert floor.floors(0.875) is None
    front(floor, [], 0.875, 0.5)
    assert floor.floors(0.875 + ClaimFloor.PROBE - 0.125) is None
    assert floor.floors(0.875 + ClaimFloor.PROBE) == {"p": key(act(11, second=3))}


def test_the_claim_after_a_probe_walks_from_the_front_however_long_after() -> None:
    floor = ClaimFloor(enabled=True)
    front(floor, [act(1)], 0.0, 0.5)
    floored(floor, [act(2)], 0.5, 0.375)  # full: a backlog
    assert floor.floors(0.875 + 100 * ClaimFloor.PROBE) is None
    front(floor, [act(3)], 30.0, 0.5)
    assert floor.floors(30.5 + ClaimFloor.PROBE) is not None


def test_floors_are_used_after_probes_in_a_row_find_them_cheaper() -> None:
    floor = ClaimFloor(enabled=True)
    front(floor, [act(1)], 0.0, 0.5)
    floored(floor, [act(2)], 0.5, 0.125)  # a quarter: CHEAPER
    assert not floor.in_use
    front(floor, [act(3)], 1.0, 0.125)  # a hiccup's, or it was: this probe is not
    floored(floor, [act(4)], 2.0, 0.125)
    front(floor, [act(5)], 3.0, 0.5)
    floored(floor, [act(6)], 4.0, 0.125)  # a vote again, but the first of a new row
    assert not floor.in_use
    front(floor, [act(7)], 5.0, 0.5)
    floored(floor, [act(8)], 6.0, 0.125)
    assert floor.in_use


def test_a_probe_that_took_less_than_the_walk_from_the_front_casts_no_vote() -> None:
    floor = ClaimFloor(enabled=True)
    front(floor, [act(1)], 0.0, 0.5)
    floored(floor, [act(2)], 0.5, 0.125)  # a vote
    front(floor, [act(i) for i in range(3, 19)], 1.0, 0.5)  # took 16
    floored(floor, [], 2.0, 0.125)  # took none: of course it was cheaper
    assert not floor.in_use
    front(floor, [act(i) for i in range(20, 36)], 3.0, 0.5)
    floored(floor, [act(i) for i in range(40, 56)], 4.0, 0.125)  # the second vote
    assert floor.in_use


def test_probes_are_compared_like_with_like() -> None:
    floor = ClaimFloor(enabled=True)
    front(floor, [], 0.0, 0.5)  # took none
    floored(floor, [act(2)], 0.5, 0.125)  # took one: nothing like it to compare with
    front(floor, [], 1.0, 0.5)
    floored(floor, [act(3)], 2.0, 0.125)
    assert not floor.in_use
    front(floor, [], 3.0, 0.5)
    floored(floor, [], 4.0, 0.125)  # took none, as the walk before: a vote
    front(floor, [], 5.0, 0.5)
    floored(floor, [], 6.0, 0.125)
    assert floor.in_use


def test_while_a_walk_from_the_front_costs_more_claims_start_at_their_floor() -> None:
    floor = ClaimFloor(enabled=True)
    at = in_use(floor)
    assert floor.in_use
    assert floor.floors(at) == {"p": key(act(4, second=4))}
    floored(floor, [act(8, second=8)], at, 0.125)
    assert floor.floors(at + 0.25) == {"p": key(act(8, second=8))}


def test_a_due_walk_from_the_front_is_followed_by_a_second_that_decides() -> None:
    floor = ClaimFloor(enabled=True)
    at = in_use(floor)
    due = at + ClaimFloor.EVERY * 0.5  # from the probe that turned them on
    assert floor.floors(due - 0.125) is not None
    assert floor.floors(due) is None
    front(floor, [act(20, second=20)], due, 2.0)  # stepped over what it then cleaned
    assert floor.in_use and floor.floors(due + 2.0) is None  # so: again, to measure
    front(floor, [act(21, second=21)], due + 2.0, 0.5)  # still CHEAPER from a floor
    assert floor.in_use and floor.floors(due + 2.5) == {"p": key(act(21, second=21))}
    healthy = ClaimFloor(enabled=True)
    at = in_use(healthy)
    due = at + ClaimFloor.EVERY * 0.5
    front(healthy, [], due, 2.0)
    front(healthy, [act(30)], due + 2.0, 0.125)  # the horizon moved on: cheap again
    assert not healthy.in_use


def test_one_slow_claim_from_a_floor_does_not_end_floors() -> None:
    floor = ClaimFloor(enabled=True)
    at = in_use(floor, front_cost=0.5, floor_cost=0.0625)
    floored(floor, [act(9, second=9)], at, 0.5)  # as slow as a walk from the front
    due = at + ClaimFloor.EVERY * 0.5
    front(floor, [act(10, second=10)], due, 0.5)
    front(floor, [act(11, second=11)], due + 0.5, 0.5)  # decides: still CHEAPER
    assert floor.in_use


def test_floors_in_use_stay_while_a_floor_is_still_cheaper() -> None:
    floor = ClaimFloor(enabled=True)
    at = in_use(floor, front_cost=0.5, floor_cost=0.125)
    due = at + ClaimFloor.EVERY * 0.5
    front(floor, [act(10, second=10)], due, 0.25)
    front(floor, [act(11, second=11)], due + 0.25, 0.1875)  # 1.5x: not twice, but over
    assert floor.in_use  # STILL_CHEAPER


def test_a_short_floored_claim_is_followed_by_a_walk_from_the_front() -> None:
    floor = ClaimFloor(enabled=True)
    at = in_use(floor)
    # Floors in use: claim again from the front when one is due, not before.
    due = at + ClaimFloor.EVERY * 0.5
    assert floored(floor, [], at, 0.125, short=True) == due - (at + 0.125)
    assert floor.floors(at + 0.25) is not None
    healthy = ClaimFloor(enabled=True)
    front(healthy, [act(1)], 0.0, 0.5)
    # Not in use (a probe): claim again at once, from the front.
    assert floored(healthy, [act(2)], 0.5, 0.5, short=True) == 0.0
    assert healthy.floors(1.0) is None


def test_a_floor_is_the_first_action_of_the_last_priority_a_claim_reached() -> None:
    floor = ClaimFloor(enabled=True)
    urgent, first, later = act(9, priority=-1, second=5), act(3, second=1), act(4, second=2)
    front(floor, [urgent, later, first], 0.0, 0.5)
    assert floor.floors(0.5) == {"p": key(first)}


def test_a_claim_that_took_the_last_urgent_actions_leaves_the_floor_where_the_others_wait(
) -> None:
    floor = ClaimFloor(enabled=True)
    waiting = act(3, second=1)
    front(floor, [waiting], 0.0, 0.5)
    # Only urgent ones, and fewer than asked: none is left at their priority, and a floor
    # moved back to them would walk over everything claimed at the others' again.
    front(floor, [act(9, priority=-1, second=5)], 0.5, 0.5, short=True)
    assert floor.floors(1.0 + ClaimFloor.PROBE) == {"p": key(waiting)}
    # A full claim of them may have left more: the next walk starts at the first taken.
    burst = act(10, priority=-1, second=6)
    front(floor, [burst, act(11, priority=-1, second=7)], 1.0, 0.5)
    assert floor.floors(1.5 + ClaimFloor.PROBE) == {"p": key(burst)}


def test_each_processor_keeps_its_own_floor() -> None:
    floor = ClaimFloor(enabled=True)
    front(floor, [act(1, "a"), act(2, "b", priority=-1)], 0.0, 0.5)
    floored(floor, [act(8, "a", second=4)], 0.5, 0.125)
    front(floor, [], 0.625, 0.5)
    assert floor.floors(0.625 + ClaimFloor.PROBE) == {"a": key(act(8, "a", second=4)),
                                  "b": key(act(2, "b", priority=-1))}


def test_a_floor_not_enabled_is_never_given() -> None:
    floor = ClaimFloor(enabled=False)
    front(floor, [act(1)], 0.0, 0.5)
    assert floor.floors(0.0 + ClaimFloor.PROBE * 2) is None


# --- the statement -------------------------------------------------------------------

def test_a_floored_claim_sees_only_actions_from_its_key_on(db: Db) -> None:
    actions = init_actions(db.engine, "p", [{"i": i} for i in range(5)])
    urgent = init_action(db.engine, "p", priority=-1)
    with db.engine.begin() as conn:
        taken, _ = queries.claim(conn, "w", [("p", 3)], 10, LEASE,
                                 floors={"p": key(actions[2])})
    assert [a.id for a in taken] == [a.id for a in actions[2:]]
    with db.engine.begin() as conn:
        taken, _ = queries.claim(conn, "w", [("p", 3)], 10, LEASE)
    assert [a.id for a in taken] == [urgent.id, actions[0].id, actions[1].id]


def test_a_floor_applies_to_its_own_processor_in_a_shared_claim(db: Db) -> None:
    a = init_actions(db.engine, "a", [{}] * 3)
    b = init_actions(db.engine, "b", [{}] * 3)
    with db.engine.begin() as conn:
        taken, _ = queries.claim(conn, "w", [("a", 3), ("b", 3)], 10, LEASE,
                                 floors={"b": key(b[1])})
    assert {x.id for x in taken} == {x.id for x in [*a, b[1], b[2]]}


def _walk_buffers(conn: psycopg.Connection, floors: dict[str, queries.Key] | None,
                  dialect: object) -> int:
    """Buffers the claim's index scan touched, by EXPLAIN ANALYZE (rolled back)."""
    sql, args = queries.claim_statement("postgresql", (("p", 3),)).render(
        dialect, queries.claim_params([("p", 3)], 100, "probe", LEASE, floors))
    (scan,) = index_scans(conn, sql, args, "async_action_claim_idx")
    return scan["Shared Hit Blocks"] + scan["Shared Read Blocks"]


def test_while_xmin_is_pinned_a_floored_claim_steps_over_none_of_the_claimed(pg: Db) -> None:
    init_actions(pg.engine, "p", [{"i": i} for i in range(6000)])
    url = pg.url.replace("+psycopg", "")
    with psycopg.connect(url) as pinning, psycopg.connect(url, autocommit=True) as probe:
        pinning.execute("SELECT txid_current()")  # holds a snapshot: xmin stays
        for setting in CLAIM_SESSION:
            probe.execute(setting)
        for _ in range(59):
            with pg.engine.begin() as conn:
                taken, _ = queries.claim(conn, "w", [("p", 3)], 100, LEASE)
        floors = {"p": key(taken[0])}
        from_front = _walk_buffers(probe, None, pg.engine.dialect)
        from_floor = _walk_buffers(probe, floors, pg.engine.dialect)
        pinning.rollback()
    # From the front the scan visits the 5,900 claimed rows' entries; from the floor,
    # the last claim's 100 and the 100 it takes.
    assert from_floor * 5 < from_front, (from_floor, from_front)


# --- the worker ----------------------------------------------------------------------

@contextmanager
def spinning(db: Db, **settings: Any) -> Iterator[tuple[threading.Event, list[int]]]:
    """A worker running actions that run again at once (deferred, no delay) until one of
    priority -1 has run: a steady flow of claims, each above the floor the last one left.
    Yields that action's event and the spins so far."""
    done, spins = threading.Event(), []

    @processor("spin", **settings)
    def spin(action):
        if action.priority < 0:
            done.set()
            return
        spins.append(action.id)
        if not done.is_set():
            raise Defer(0)

    init_actions(db.engine, "spin", [{}] * 8)
    with worker_thread(Worker(config=config(db), concurrency=4)):
        wait_until(lambda: len(spins) >= 8, 30, what="the first spins")
        yield done, spins


def floors_always_in_use(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """As while a long transaction pins the horizon: floors in use from the start, and
    kept whatever the walks from the front measure. Returns, claim by claim, whether it
    started at a floor (the first two walk from the front: one takes actions, so there
    is a floor; the next measures)."""
    monkeypatch.setattr(ClaimFloor, "CHEAPER", -1.0)
    init, claimed = ClaimFloor.__init__, ClaimFloor.claimed
    starts: list[bool] = []

    def in_use_from_the_start(self: ClaimFloor, enabled: bool) -> None:
        init(self, enabled)
        self.in_use = True

    def noted(self: ClaimFloor, actions: Any, started: float, ended: float,
              floored: bool, short: bool) -> float | None:
        starts.append(floored)
        return claimed(self, actions, started, ended, floored=floored, short=short)

    monkeypatch.setattr(ClaimFloor, "__init__", in_use_from_the_start)
    monkeypatch.setattr(ClaimFloor, "claimed", noted)
    return starts


@pytest.mark.parametrize("settings", [{}, {"concurrency": 8}], ids=["plain", "capped"])
def test_a_worker_whose_floors_are_in_use_claims_from_its_last_claim(
        pg: Db, monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any]) -> None:
    floored = floors_always_in_use(monkeypatch)
    monkeypatch.setattr(ClaimFloor, "EVERY", 10**9)  # no walk from the front comes due
    with spinning(pg, **settings) as (done, spins):
        # The first claim may have taken every spin: wait for one from its floor.
        wait_until(lambda: True in floored, 30, what="a claim from a floor")
        # Lower priority runs first: below the floor of every claim from now on.
        urgent = init_action(pg.engine, "spin", priority=-1)
        seen = len(spins)
        wait_until(lambda: len(spins) >= seen + 400 or done.is_set(), 60,
                   what="400 more spins")
        assert not done.is_set()
        assert admin.get_action(pg.engine, urgent.id).status == Status.PENDING


def test_a_sqlite_worker_claims_from_the_front_whatever_the_floors_would_say(
        sqlite: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    floors_always_in_use(monkeypatch)
    monkeypatch.setattr(ClaimFloor, "EVERY", 10**9)
    with spinning(sqlite) as (done, _):
        init_action(sqlite.engine, "spin", priority=-1)
        wait_until(done.is_set, 30, what="the action below where a floor would be")


def test_an_action_below_the_floor_runs_when_a_walk_from_the_front_is_due(
        pg: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    floors_always_in_use(monkeypatch)
    with spinning(pg) as (done, _):
        urgent = init_action(pg.engine, "spin", priority=-1)
        wait_until(done.is_set, 30, what="the urgent action to run amid the spinning")
    assert admin.get_action(pg.engine, urgent.id).status == Status.COMPLETED


def test_a_short_floored_claim_claims_again_from_the_front_though_nothing_wakes_it(
        pg: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    floors_always_in_use(monkeypatch)
    monkeypatch.setattr(ClaimFloor, "EVERY", 500)  # the next walk from the front: ~0.5 s on
    ran = []

    @processor("p")
    def p(action):
        ran.append(action.priority)

    # The leader's wake-up for due actions runs a moment after the start, then every
    # poll interval (ten minutes): after its first run, nothing else wakes the loop
    # but the enqueues' notifications.
    woke = threading.Event()
    wake_once = Waker.run_once

    def waking(self: Waker) -> int:
        try:
            return wake_once(self)
        finally:
            woke.set()

    monkeypatch.setattr(Waker, "run_once", waking)
    slow_poll = WorkerSettings(poll_interval=timedelta(minutes=10))
    with worker_thread(Worker(config=config(pg, worker=slow_poll), concurrency=1)):
        wait_until(woke.is_set, 30, what="the leader's first wake-up")
        for n in (1, 2):  # two walks from the front: the second measures, floors stay
            init_action(pg.engine, "p")
            wait_until(lambda n=n: ran == [0] * n, 30, what="an action")
        # Its notification wakes a claim that starts at the floor the last one left
        # and comes back with nothing: only the walk from the front, when due, sees it.
        init_action(pg.engine, "p", priority=-1)
        wait_until(lambda: ran == [0, 0, -1], 60, what="the action below the floor")
