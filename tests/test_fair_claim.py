"""The claim shares a worker's free slots fairly among its processors (issue 15, retry
storm): a backlog of one processor, however old, must not starve another's actions;
priority still comes first, and a processor with nothing to run leaves its share to
the others. On both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from asyncactions import init_action, init_actions, queries
from asyncactions.action import Action

from .conftest import Db

LEASE = timedelta(minutes=5)
HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)


def claim(engine: Engine, processors: list[str], free: int, worker: str = "w") -> list[Action]:
    with engine.begin() as conn:
        actions, malformed = queries.claim(conn, worker, [(p, 3) for p in processors], free,
                                           LEASE)
    assert malformed == []
    return actions


def test_a_backlog_of_one_processor_does_not_starve_another(db: Db) -> None:
    storm = init_actions(db.engine, "storm", list(range(500)), eligible_at=HOUR_AGO)
    healthy = init_action(db.engine, "healthy", "late")
    claimed = claim(db.engine, ["healthy", "storm"], 4)
    assert healthy.id in [a.id for a in claimed]
    # The rest of the slots go to the backlog, oldest first.
    assert [a.id for a in claimed if a.processor == "storm"] == [a.id for a in storm[:3]]


def test_slots_go_round_robin_across_processors_in_claim_order(db: Db) -> None:
    a = init_actions(db.engine, "a", list(range(10)), eligible_at=HOUR_AGO)
    b = init_actions(db.engine, "b", list(range(10)),
                     eligible_at=HOUR_AGO + timedelta(minutes=1))
    (c,) = init_actions(db.engine, "c", [0], eligible_at=HOUR_AGO + timedelta(minutes=2))
    claimed = claim(db.engine, ["a", "b", "c"], 5)
    # Turn by turn, each turn in eligibility order: a1 b1 c1, then a2 b2.
    assert [x.id for x in claimed] == [a[0].id, b[0].id, c.id, a[1].id, b[1].id]


def test_priority_comes_before_fairness(db: Db) -> None:
    urgent = init_actions(db.engine, "a", list(range(5)), priority=-1)
    init_action(db.engine, "b", "normal", eligible_at=HOUR_AGO)
    claimed = claim(db.engine, ["a", "b"], 3)
    assert [x.id for x in claimed] == [x.id for x in urgent[:3]]


def test_a_processor_with_nothing_to_run_leaves_every_slot_to_the_others(db: Db) -> None:
    a = init_actions(db.engine, "a", list(range(6)))
    init_action(db.engine, "b", "later", delay=timedelta(hours=1))  # not eligible yet
    claimed = claim(db.engine, ["a", "b", "idle"], 4)
    assert [x.id for x in claimed] == [x.id for x in a[:4]]
    assert len(claim(db.engine, ["a", "b", "idle"], 10)) == 2


def test_concurrent_fair_claims_skip_each_others_rows_and_still_fill(
        db: Db) -> None:
    if db.name != "postgresql":
        pytest.skip("SQLite has one writer: claims cannot overlap")
    init_actions(db.engine, "a", list(range(20)), eligible_at=HOUR_AGO)
    init_actions(db.engine, "b", list(range(20)))
    with db.engine.connect() as first, db.engine.connect() as second, first.begin():
        mine, _ = queries.claim(first, "w1", [("a", 3), ("b", 3)], 4, LEASE)
        # The first claim's transaction is still open: its rows are locked.
        with second.begin():
            theirs, _ = queries.claim(second, "w2", [("a", 3), ("b", 3)], 4, LEASE)
    assert len(mine) == len(theirs) == 4
    assert not {x.id for x in mine} & {x.id for x in theirs}
    for claimed in (mine, theirs):
        assert sorted(x.processor for x in claimed) == ["a", "a", "b", "b"]
