"""init_action(wait=False): the row and its notification ride the transaction's COMMIT
(or the connection's next statement) in one psycopg pipeline (issue 17, item 3)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from sqlalchemy import Connection, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from asyncactions import AsyncActionsError, admin, aio, init_action, init_actions
from asyncactions.database import make_async_engine, make_engine
from asyncactions.pipelined import QueuedAction

from .conftest import Db
from .test_enqueue import _listener, count, first_notification_after


def last_id_drawn(pg: Db) -> int:
    """The id sequence's state, read from another connection: nextval is not
    transactional, so an INSERT sent by any connection shows here at once."""
    return int(pg.scalar("SELECT last_value FROM async_action_id_seq"))


@contextmanager
def frontend_syncs(conn: Connection) -> Iterator[list[int]]:
    """Counts the messages the client waits on `conn` for (libpq's protocol trace): Sync
    (extended protocol) and Query (simple protocol), one per round trip."""
    pgconn = conn.connection.dbapi_connection.pgconn  # type: ignore[union-attr]
    seen: list[int] = []
    with tempfile.TemporaryFile("w+") as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield seen
        finally:
            pgconn.untrace()
            trace.seek(0)
            seen.append(sum(1 for line in trace if line.split("\t")[0] == "F"
                            and line.split("\t")[2].strip() in ("Sync", "Query")))


def test_the_row_is_sent_with_the_commit_and_the_id_is_the_stored_one(pg: Db) -> None:
    with pg.engine.connect() as conn:
        with conn.begin():
            conn.execute(text("SELECT 1"))  # the transaction is open on the server
            drawn = last_id_drawn(pg)
            action = init_action(conn, "p", {"order_id": 7}, related_id="order:7", wait=False)
            assert isinstance(action, QueuedAction)
            assert last_id_drawn(pg) == drawn  # nothing sent yet
            with pytest.raises(AsyncActionsError, match="known once its transaction"):
                action.id  # noqa: B018
            assert action.data == {"order_id": 7} and action.processor == "p"
        stored = admin.get_action(pg.engine, action.id)
    assert stored.data == {"order_id": 7} and stored.related_id == "order:7"
    assert (stored.created_at, stored.next_eligible_at) == (action.created_at,
                                                            action.next_eligible_at)
    assert str(action) == str(stored)


def test_row_and_commit_take_one_round_trip(pg: Db) -> None:
    with pg.engine.connect() as conn:
        conn.execute(text("SELECT 1"))  # BEGIN has been sent: only the enqueue is left
        with frontend_syncs(conn) as syncs:
            action = init_action(conn, "p", {"x": 1}, wait=False)
            conn.commit()
    assert syncs == [1]
    assert admin.get_action(pg.engine, action.id).data == {"x": 1}


def test_rollback_records_nothing_and_wakes_nobody(pg: Db) -> None:
    listener = _listener(pg)
    with pg.engine.connect() as conn:
        trans = conn.begin()
        action = init_action(conn, "rolled_back", {}, wait=False)
        trans.rollback()
        with conn.begin():  # the same connection's next transaction sends nothing of it
            conn.execute(text("SELECT 1"))
    with Session(pg.engine) as session:
        session.begin()
        init_action(session, "rolled_back_too", {}, wait=False)
        session.rollback()
    assert count(pg) == 0
    with pytest.raises(AsyncActionsError, match="rolled back"):
        action.id  # noqa: B018
    # Notifications arrive in commit order: a rolled-back one would come first.
    assert first_notification_after(listener, pg) == "marker"
    listener.close()


def test_a_session_commit_sends_it_and_the_notification(pg: Db) -> None:
    listener = _listener(pg)
    with Session(pg.engine) as session, session.begin():
        action = init_action(session, "committed", {"a": 1}, wait=False)
    assert admin.get_action(pg.engine, action.id).processor == "committed"
    assert next(iter(listener.notifies(timeout=10, stop_after=1))).payload == "committed"
    listener.close()


def test_the_next_statement_sends_it_first_so_ids_follow_the_calls(pg: Db) -> None:
    with pg.engine.connect() as conn, conn.begin():
        first = init_action(conn, "p", 1, wait=False)
        second = init_action(conn, "p", 2, wait=False)
        # The caller's own query sees the rows, and a plain enqueue after them gets a
        # larger id, as a bulk one does.
        assert conn.execute(text("SELECT count(*) FROM async_action")).scalar() == 2
        assert (first.id, second.id) == (1, 2)
        third = init_action(conn, "p", 3, wait=False)
        fourth = init_action(conn, "p", 4)
        fifth, sixth = init_actions(conn, "p", [5, 6])
    assert [first.id, second.id, third.id, fourth.id, fifth.id, sixth.id] == [1, 2, 3, 4, 5, 6]
    assert [r[0] for r in pg.rows("SELECT data FROM async_action ORDER BY id")] == [
        1, 2, 3, 4, 5, 6]


def test_a_rolled_back_savepoint_takes_its_queued_actions_with_it(pg: Db) -> None:
    with Session(pg.engine) as session, session.begin():
        kept = init_action(session, "kept", wait=False)
        nested = session.begin_nested()
        init_action(session, "dropped", wait=False)
        nested.rollback()
        also_kept = init_action(session, "also_kept", wait=False)
    assert [r[0] for r in pg.rows("SELECT processor FROM async_action ORDER BY id")] == [
        "kept", "also_kept"]
    assert (kept.id, also_kept.id) == tuple(r[0] for r in pg.rows(
        "SELECT id FROM async_action ORDER BY id"))


def test_a_row_the_server_refuses_fails_the_commit_and_nothing_stays(pg: Db) -> None:
    with pg.engine.begin() as conn:
        conn.execute(text("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                          "$$BEGIN RAISE EXCEPTION 'refused by the test'; END$$"))
        conn.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON async_action FOR EACH ROW "
                          "WHEN (NEW.processor = 'refused') EXECUTE FUNCTION refuse()"))
    try:
        with pg.engine.connect() as conn:
            with pytest.raises(sa_exc.DBAPIError, match="refused by the test"):  # noqa: SIM117
                with conn.begin():
                    conn.execute(text("CREATE TEMP TABLE t (x int)"))
                    action = init_action(conn, "refused", wait=False)
            with pytest.raises(AsyncActionsError, match="rolled back"):
                action.id  # noqa: B018
            # The connection is usable, and the transaction left nothing behind.
            with conn.begin():
                init_action(conn, "after", wait=False)
            assert conn.execute(text("SELECT to_regclass('t')")).scalar() is None
    finally:
        with pg.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse ON async_action"))
            conn.execute(text("DROP FUNCTION refuse()"))
    assert [r[0] for r in pg.rows("SELECT processor FROM async_action")] == ["after"]


def test_where_nothing_can_wait_it_is_the_plain_enqueue(db: Db) -> None:
    # SQLite (no round trips to save) and an Engine (a transaction of its own).
    on_engine = init_action(db.engine, "p", 1, wait=False)
    with db.engine.connect() as conn, conn.begin():
        on_conn = init_action(conn, "p", 2, wait=False)
        queued = isinstance(on_conn, QueuedAction)
    assert not isinstance(on_engine, QueuedAction)
    assert queued is (db.name == "postgresql")
    assert (on_engine.id, on_conn.id) == (1, 2)


def test_asyncio_waits_as_before(pg: Db) -> None:
    async def main() -> int:
        engine = make_async_engine(pg.url)
        try:
            async with AsyncSession(engine) as session, session.begin():
                action = await aio.init_action(session, "p", {"a": 1}, wait=False)
                return action.id  # the plain enqueue: known at once
        finally:
            await engine.dispose()

    assert admin.get_action(pg.engine, asyncio.run(main())).data == {"a": 1}


def test_a_unique_key_cannot_wait(db: Db) -> None:
    with db.engine.connect() as conn, pytest.raises(AsyncActionsError, match="unique_key"):
        init_action(conn, "p", unique_key="k", wait=False)


def test_awkward_data_arrives_exactly_as_given(pg: Db) -> None:
    # The values travel bound as literals: quotes, backslashes, semicolons, comments,
    # dollar quotes and non-ASCII must all arrive as they were.
    data = {"s": "it's \\ \"q\" ; COMMIT; -- $$ $1 %s %(x)s \u00fc\u4e2d", "n": [1.5, None, True]}
    with pg.engine.connect() as conn, conn.begin():
        action = init_action(conn, "p", data, related_id="o'clock", priority=-3, wait=False)
    stored = admin.get_action(pg.engine, action.id)
    assert (stored.data, stored.related_id, stored.priority) == (data, "o'clock", -3)


def test_it_prepares_again_after_deallocate_all(pg: Db) -> None:
    with pg.engine.connect() as conn:
        for i in range(2):
            with conn.begin():
                init_action(conn, "p", i, wait=False)
            conn.execute(text("DEALLOCATE ALL"))
            conn.commit()
    assert [r[0] for r in pg.rows("SELECT data FROM async_action ORDER BY id")] == [0, 1]


def test_behind_a_transaction_pooler_it_is_the_plain_enqueue(pg: Db) -> None:
    # ?prepare_threshold=none: PgBouncer in transaction mode, where a prepared statement
    # is missing on the next server connection.
    engine = make_engine(f"{pg.url}?prepare_threshold=none")
    try:
        with engine.connect() as conn, conn.begin():
            action = init_action(conn, "p", 1, wait=False)
            assert not isinstance(action, QueuedAction)
    finally:
        engine.dispose()
    assert admin.get_action(pg.engine, action.id).data == 1
