"""SPEC §3 enqueue: the action exists if and only if the caller's transaction commits."""

from __future__ import annotations

import functools
import json
import random
import re
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from uuid import UUID

import psycopg
import pytest
from sqlalchemy.orm import Session

from asyncactions import (
    AsyncActionsError,
    Status,
    UnserializableData,
    admin,
    init_action,
    init_actions,
    processor,
)
from asyncactions.enqueue import COPY_FROM, LINES_PER_WRITE
from asyncactions.notifier import NOTIFY_CHANNEL

from .conftest import Db


def count(db: Db) -> int:
    return int(db.scalar("SELECT count(*) FROM async_action"))


def test_committed_session_enqueue_persists_the_action(db: Db) -> None:
    with Session(db.engine) as session, session.begin():
        action = init_action(session, "send_welcome_email", {"user_id": 42},
                             related_id="user:42")
    stored = admin.get_action(db.engine, action.id)
    assert stored.status == Status.PENDING == "pending"
    assert stored.processor == "send_welcome_email"
    assert stored.data == {"user_id": 42}
    assert stored.related_id == "user:42"
    # retries: None until a worker claims it and sets the processor's.
    assert (stored.retries, stored.attempts, stored.priority) == (None, 0, 0)
    assert stored.created_at.tzinfo is not None
    assert stored.next_eligible_at <= datetime.now(UTC) + timedelta(seconds=1)


def test_rolled_back_session_leaves_no_action(db: Db) -> None:
    with Session(db.engine) as session:
        session.begin()
        init_action(session, "send_welcome_email", {"user_id": 1})
        session.rollback()
    assert count(db) == 0


def test_connection_joins_the_callers_transaction(db: Db) -> None:
    with db.engine.connect() as conn:
        with conn.begin():
            init_action(conn, "p", 1)
        trans = conn.begin()
        init_action(conn, "p", 2)
        trans.rollback()
    assert db.rows("SELECT data FROM async_action") in ([(1,)], [("1",)])


def test_connection_in_commit_as_you_go_style_keeps_the_action_until_commit(db: Db) -> None:
    with db.engine.connect() as conn:  # no begin(): the action starts a transaction
        init_action(conn, "p", "rolled back on close")
    with db.engine.connect() as conn:
        init_action(conn, "p", "committed")
        conn.commit()
    assert db.rows("SELECT data FROM async_action") in ([("committed",)], [('"committed"',)])


def test_engine_runs_in_its_own_transaction(db: Db) -> None:
    action = init_action(db.engine, "p", {"a": 1})
    assert admin.get_action(db.engine, action.id).data == {"a": 1}


def test_an_engine_enqueue_leaves_its_pooled_connection_transactional(db: Db) -> None:
    # On PostgreSQL the one-statement enqueue runs in autocommit; the connection it
    # borrowed must go back to the pool as it came.
    kept = init_action(db.engine, "p", {"kept": True})
    with db.engine.connect() as conn:
        init_action(conn, "p", {"kept": False})
        conn.rollback()
    assert db.rows("SELECT id FROM async_action") == [(kept.id,)]


def test_bulk_insert_keeps_order_and_options(db: Db) -> None:
    actions = init_actions(db.engine, "p", [{"i": i} for i in range(500)],
                           related_id="batch:1", priority=5, retries=7)
    assert [a.data["i"] for a in actions] == list(range(500))
    assert [a.id for a in actions] == sorted(a.id for a in actions)
    stored = admin.get_action(db.engine, actions[123].id)
    assert (stored.data, stored.related_id, stored.priority, stored.retries) == (
        {"i": 123}, "batch:1", 5, 7)
    assert init_actions(db.engine, "p", []) == []


def test_retries_are_kept_when_given_and_left_to_the_processor_when_not(db: Db) -> None:
    @processor("five_retries", retries=5)
    def five(action):  # pragma: no cover - never run
        return None

    # Registered here or not, the claiming worker's settings decide (test_wedges.py).
    assert init_action(db.engine, "five_retries").retries is None
    assert init_action(db.engine, "not_registered_here").retries is None
    assert init_action(db.engine, "five_retries", retries=0).retries == 0


def test_delay_and_eligible_at_set_next_eligible_at(db: Db) -> None:
    delayed = admin.get_action(db.engine, init_action(db.engine, "p",
                                                      delay=timedelta(minutes=5)).id)
    assert delayed.next_eligible_at - delayed.created_at == timedelta(minutes=5)
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert admin.get_action(db.engine,
                            init_action(db.engine, "p", eligible_at=when).id).next_eligible_at \
        == when


def test_unique_key_returns_the_live_action_instead_of_a_new_one(db: Db) -> None:
    first = init_action(db.engine, "p", {"n": 1}, unique_key="order:42:invoice")
    again = init_action(db.engine, "p", {"n": 2}, unique_key="order:42:invoice")
    assert again.id == first.id and again.data == {"n": 1}
    assert count(db) == 1
    admin.cancel(db.engine, first.id)  # finished actions keep their key but do not block
    third = init_action(db.engine, "p", {"n": 3}, unique_key="order:42:invoice")
    assert third.id != first.id


def test_typed_data_round_trips_with_its_types(db: Db) -> None:
    data = {
        "aware": datetime(2026, 11, 23, 5, 41, tzinfo=UTC),
        "naive": datetime(2026, 11, 23, 5, 41),
        "day": date(2026, 11, 23),
        "amount": Decimal("19.90"),
        "ref": UUID("12345678-1234-5678-1234-567812345678"),
        "nested": [{"when": date(2020, 1, 1)}, [Decimal("1E+3")]],
    }
    stored = admin.get_action(db.engine, init_action(db.engine, "p", data).id).data
    assert stored == data
    assert stored["naive"].tzinfo is None and stored["aware"].tzinfo is UTC
    assert type(stored["day"]) is date
    # Readable by plain SQL for audits.
    raw = db.scalar("SELECT data FROM async_action")
    raw = raw if isinstance(raw, dict) else json.loads(raw)
    assert raw["amount"] == {"$decimal": "19.90"}


def test_unserializable_data_is_refused_naming_the_path_and_nothing_is_written(db: Db) -> None:
    class Tempfile:
        pass

    with Session(db.engine) as session, session.begin():
        with pytest.raises(UnserializableData) as err:
            init_action(session, "p", {"order": {"when": Tempfile()}})
        init_action(session, "p", {"ok": True})  # the transaction is still usable
    assert 'data["order"]["when"]: object of type Tempfile is not serializable' in str(err.value)
    assert "datetime, date, Decimal or UUID" in str(err.value)
    with pytest.raises(UnserializableData, match=r"data\[1\]"):
        init_actions(db.engine, "p", [{"ok": 1}, float("nan")])
    assert count(db) == 1


@pytest.mark.parametrize("where", [0, LINES_PER_WRITE + 7], ids=["first write", "later write"])
def test_a_bad_item_in_a_large_bulk_enqueue_leaves_the_callers_transaction_usable(
        db: Db, where: int) -> None:
    """On PostgreSQL a large one is sent by COPY as it is encoded: an item that fails to
    encode ends the COPY part-way, and its rows go back out of the caller's transaction,
    nothing else with them."""
    items: list[object] = [{"i": i} for i in range(2 * LINES_PER_WRITE)]
    items[where] = {"nan": float("nan")}
    with Session(db.engine) as session, session.begin():
        before = init_action(session, "p", {"before": True})
        with pytest.raises(UnserializableData, match=rf"data\[{where}\]"):
            init_actions(session, "p", items)
        after = init_action(session, "p", {"after": True})  # the transaction is usable
    assert db.rows("SELECT id FROM async_action ORDER BY id") == [(before.id,), (after.id,)]


def test_oversized_data_is_refused_with_size_and_limit(db: Db) -> None:
    with pytest.raises(UnserializableData, match=r"over the limit of 131072"):
        init_action(db.engine, "p", {"blob": "x" * 140_000})
    assert count(db) == 0


def _listener(pg: Db) -> psycopg.Connection:
    conn = psycopg.connect(pg.engine.url.set(drivername="postgresql")
                           .render_as_string(hide_password=False), autocommit=True)
    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
    return conn


def first_notification_after(listener: psycopg.Connection, pg: Db) -> str:
    """Commit an enqueue of "marker" and return the payload of the first notification
    the listener gets: notifications arrive in commit order, so one sent by what the
    test did before comes first."""
    init_action(pg.engine, "marker")
    return next(iter(listener.notifies(timeout=10, stop_after=1))).payload


def test_notification_is_sent_at_commit_and_never_on_rollback(pg: Db) -> None:
    listener = _listener(pg)
    with Session(pg.engine) as session:
        session.begin()
        init_action(session, "rolled_back", {})
        session.rollback()
    with Session(pg.engine) as session, session.begin():
        init_action(session, "committed", {})
    # Notifications arrive in commit order: had the rollback sent one, it came first.
    notes = list(listener.notifies(timeout=10, stop_after=1))
    assert [(n.channel, n.payload) for n in notes] == [(NOTIFY_CHANNEL, "committed")]
    listener.close()


def test_bulk_insert_sends_one_notification(pg: Db) -> None:
    listener = _listener(pg)
    init_actions(pg.engine, "bulk", [{"i": i} for i in range(1000)])
    assert [n.payload for n in listener.notifies(timeout=10, stop_after=1)] == ["bulk"]
    assert first_notification_after(listener, pg) == "marker"  # and no second one
    listener.close()


def test_bulk_insert_is_one_statement_on_postgresql_and_copy_when_large(pg: Db) -> None:
    from sqlalchemy import event

    statements: list[str] = []
    with pg.engine.connect() as conn:
        event.listen(conn, "before_cursor_execute",
                     lambda *args: statements.append(args[2]))
        with conn.begin():
            init_actions(conn, "bulk", [{"i": i} for i in range(COPY_FROM - 1)])
        assert len(statements) == 1 and statements[0].startswith("INSERT")
        statements.clear()
        with conn.begin():
            init_actions(conn, "bulk", [{"i": i} for i in range(COPY_FROM)])
        # One statement draws the ids and sends the notification; COPY writes the rows,
        # in a savepoint of the caller's transaction.
        assert [s.split()[0] for s in statements] == ["SAVEPOINT", "SELECT", "RELEASE"]
        assert "INSERT" not in statements[1]
    assert pg.scalar("SELECT count(*) FROM async_action") == 2 * COPY_FROM - 1


def awkward(i: int) -> object:
    """Data that exercises every escape: quotes, backslashes, control characters,
    non-ASCII, typed values, JSON null and bare scalars."""
    if i % 7 == 0:
        return None
    if i % 11 == 0:
        return "a\\b\tc"
    return {"i": i, "text": 'say "hi"\\ \t tab \n line é 😀', "nested": [1.5, None, True],
            "when": datetime(2026, 11, 23, 8, 0, i % 60, tzinfo=UTC), "amount": Decimal("19.90")}


@pytest.mark.parametrize("n", [5, COPY_FROM], ids=["statement", "copy-on-postgresql"])
@pytest.mark.parametrize("when", ["now", "delay", "naive eligible_at"])
def test_bulk_insert_returns_exactly_what_it_stored(db: Db, n: int, when: str) -> None:
    timing = {"now": {}, "delay": {"delay": timedelta(minutes=5)},
              "naive eligible_at": {"eligible_at": datetime(2030, 1, 2, 3, 4, 5)}}[when]
    actions = init_actions(db.engine, "p\tq\\r", [awkward(i) for i in range(n)],
                           related_id="batch\n\\1", priority=-3, retries=0, **timing)
    assert [a.data for a in actions] == [awkward(i) for i in range(n)]
    assert [admin.get_action(db.engine, a.id) for a in actions] == actions
    first = actions[0]
    if when == "delay":
        assert first.next_eligible_at - first.created_at == timedelta(minutes=5)
    elif when == "naive eligible_at":
        assert first.next_eligible_at == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    else:
        assert first.next_eligible_at == first.created_at


def test_a_large_bulk_enqueue_of_any_sequence_works_on_an_autocommit_connection(
        pg: Db) -> None:
    """No savepoint where there is no transaction to keep (each statement commits), and
    data that cannot be sliced (a deque) is encoded all the same."""
    with pg.engine.connect() as conn:
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        actions = init_actions(auto, "p", deque({"i": i} for i in range(COPY_FROM)))
    assert [a.data for a in actions] == [{"i": i} for i in range(COPY_FROM)]
    assert count(pg) == COPY_FROM


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "ordering keys"])
def test_a_copy_sent_in_several_writes_stores_every_action_in_the_callers_order(
        pg: Db, keyed: bool) -> None:
    n = 2 * LINES_PER_WRITE + 1  # three writes, the last of one line
    keys = {"ordering_key": lambda d: f"k\t{d['i'] % 3}" if isinstance(d, dict) else None} \
        if keyed else {}
    actions = init_actions(pg.engine, "p", [awkward(i) for i in range(n)], **keys)
    assert [a.data for a in actions] == [awkward(i) for i in range(n)]
    assert [a.id for a in actions] == sorted(a.id for a in actions)
    stored = {row[0]: row[1:] for row in pg.rows(
        "SELECT id, data IS NULL, ordering_key FROM async_action")}
    assert len(stored) == n
    for a in (actions[0], actions[LINES_PER_WRITE - 1], actions[LINES_PER_WRITE],
              actions[-1]):
        assert admin.get_action(pg.engine, a.id) == a
        assert stored[a.id] == (a.data is None, a.ordering_key)
    assert keyed == (actions[1].ordering_key == "k\t1")


@pytest.mark.parametrize("n", [5, COPY_FROM], ids=["statement", "copy"])
def test_rolled_back_bulk_insert_leaves_nothing_and_wakes_nobody(pg: Db, n: int) -> None:
    listener = _listener(pg)
    with pg.engine.connect() as conn:
        trans = conn.begin()
        init_actions(conn, "bulk", [{"i": i} for i in range(n)])
        trans.rollback()
    assert count(pg) == 0
    assert first_notification_after(listener, pg) == "marker"
    listener.close()


# --- unique keys ------------------------------------------------------------------------

def live_with_key(db: Db, key: str) -> list[tuple]:
    return db.rows("SELECT id FROM async_action WHERE unique_key = :k AND status IN "
                   "('pending', 'running')", k=key)


def test_unique_keys_keep_working_once_the_driver_prepares_the_statement(db: Db) -> None:
    # psycopg prepares a statement after five runs; PostgreSQL must still match the
    # ON CONFLICT target to the partial index then.
    with db.engine.begin() as conn:
        ids = [init_action(conn, "p", {"n": n}, unique_key=f"k{n % 3}").id for n in range(30)]
        bulk = [init_actions(conn, "p", [{}, {}], unique_key=["k0", "new"])[0].id
                for _ in range(15)]
    assert len(set(ids)) == 3 and set(bulk) == {ids[0]}
    assert count(db) == 4


def test_concurrent_enqueues_of_one_key_make_one_action_and_all_get_its_id(db: Db) -> None:
    from asyncactions.database import make_engine

    engine = make_engine(db.url, pool_size=16)  # a connection per thread
    start = threading.Barrier(16)

    def enqueue(n: int) -> int:
        start.wait()
        with engine.begin() as conn:  # a transaction of its own
            return init_action(conn, "p", {"n": n}, unique_key="order:42:invoice").id

    try:
        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(enqueue, range(16)))
    finally:
        engine.dispose()
    assert len(set(ids)) == 1
    assert live_with_key(db, "order:42:invoice") == [(ids[0],)]
    assert count(db) == 1


def test_bulk_unique_keys_skip_live_and_repeated_keys_and_keep_input_order(db: Db) -> None:
    holder = init_action(db.engine, "p", {"old": True}, unique_key="b")
    actions = init_actions(db.engine, "p", [{"i": i} for i in range(6)],
                           unique_key=["a", "b", None, "a", None, "c"])
    assert [a.data for a in actions] == [{"i": 0}, {"old": True}, {"i": 2}, {"i": 0},
                                         {"i": 4}, {"i": 5}]
    assert actions[1] == admin.get_action(db.engine, holder.id)
    assert actions[3].id == actions[0].id
    assert [a.unique_key for a in actions] == ["a", "b", None, "a", None, "c"]
    assert count(db) == 5  # the holder and four new ones
    for new in (actions[0], actions[2], actions[4], actions[5]):
        assert admin.get_action(db.engine, new.id) == new
    # A function of the data works the same; finished holders do not block.
    admin.cancel(db.engine, holder.id)
    again = init_actions(db.engine, "p", [{"k": "a"}, {"k": "b"}, {"k": "a"}],
                         unique_key=lambda d: d["k"])
    assert again[0].id == actions[0].id and again[2].id == actions[0].id
    assert again[1].id not in (holder.id, *(a.id for a in actions))
    assert live_with_key(db, "b") == [(again[1].id,)]


@pytest.mark.parametrize(("keys", "message"), [
    ("one-for-all", "one unique_key per action"),
    (["a"], "1 keys for 2 actions"),
    ([1, 2], r"unique_key of data\[0\] must be a str or None, not int"),
])
def test_bulk_unique_keys_refuse_what_is_not_one_key_per_action(db: Db, keys: object,
                                                                 message: str) -> None:
    with pytest.raises(AsyncActionsError, match=message):
        init_actions(db.engine, "p", [{}, {}], unique_key=keys)
    assert count(db) == 0


def test_concurrent_bulk_enqueues_agree_on_one_action_per_key(db: Db) -> None:
    from asyncactions.database import make_engine

    engine = make_engine(db.url, pool_size=8)
    start = threading.Barrier(8)
    keys = [f"k{i}" for i in range(40)]

    def enqueue(n: int) -> dict[str, int]:
        mine = random.Random(n).sample(keys, len(keys))  # each thread in its own order
        start.wait()
        with engine.begin() as conn:
            actions = init_actions(conn, "p", [{"n": n}] * len(mine) + [{"free": n}],
                                   unique_key=[*mine, None])
        assert actions[-1].unique_key is None and actions[-1].data == {"free": n}
        return {a.unique_key: a.id for a in actions[:-1]}

    try:
        with ThreadPoolExecutor(8) as pool:
            seen = list(pool.map(enqueue, range(8)))
    finally:
        engine.dispose()
    assert all(s == seen[0] for s in seen)
    for key in keys:
        assert live_with_key(db, key) == [(seen[0][key],)]
    assert count(db) == len(keys) + 8


def test_bulk_unique_insert_is_one_statement_and_wakes_only_when_it_inserts(pg: Db) -> None:
    from sqlalchemy import event

    listener = _listener(pg)
    statements: list[str] = []
    with pg.engine.connect() as conn:
        event.listen(conn, "before_cursor_execute",
                     lambda *args: statements.append(args[2]))
        with conn.begin():
            init_actions(conn, "bulk", [{"i": i} for i in range(1000)],
                         unique_key=lambda d: f"i:{d['i'] % 500}")
    assert len(statements) == 1
    assert [n.payload for n in listener.notifies(timeout=10, stop_after=1)] == ["bulk"]
    assert pg.scalar("SELECT count(*) FROM async_action") == 500
    init_actions(pg.engine, "bulk", [{"i": 1}], unique_key=["i:1"])  # inserts nothing
    assert first_notification_after(listener, pg) == "marker"  # nor did the bulk twice
    listener.close()


@pytest.mark.parametrize(("data", "options", "says"), [
    ({"price": {"$decimal": "abc"}}, {}, 'data["price"]: {"$decimal": …} is reserved'),
    ({"when": {"$date": "2026-01-01"}}, {}, "would be read back as a date"),
    (functools.reduce(lambda inner, _: [inner], range(150), []), {},
     "nested more than 100 levels deep"),
    ({"name": "a\x00b"}, {}, "NUL character"),
    ({}, {"delay": timedelta(days=4000)}, "delay: 4000 days, 0:00:00 is outside 0s..3650d"),
    ({}, {"retries": 10**11}, "retries must be from 0 to 1000000"),
])
def test_values_that_would_be_misread_or_not_stored_are_refused_at_enqueue(
        db: Db, data: object, options: dict, says: str) -> None:
    with pytest.raises(AsyncActionsError, match=re.escape(says)):
        init_action(db.engine, "p", data, **options)
    assert count(db) == 0
