"""SPEC §3 "asyncio": asyncactions.aio, the producer and admin API as coroutines on
AsyncSession, AsyncConnection and AsyncEngine, with the sync API's guarantees."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import asyncactions
from asyncactions import (
    ActionNotFound,
    AsyncActionsError,
    Status,
    Worker,
    aio,
    enqueue,
    processor,
)
from asyncactions.admin import listen_url
from asyncactions.database import make_async_engine
from asyncactions.events import add_rule
from asyncactions.notifier import NOTIFY_CHANNEL

from .conftest import Db, worker_config

T = TypeVar("T")


def run(db: Db, test: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run `test` on an event loop with an AsyncEngine on the backend under test."""

    async def main() -> T:
        engine = make_async_engine(db.url)
        try:
            return await test(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def test_an_action_enqueued_in_a_rolled_back_async_session_never_existed(db: Db) -> None:
    async def test(engine: AsyncEngine) -> None:
        async with AsyncSession(engine) as session:
            async with session.begin():
                await session.execute(text("SELECT 1"))
                kept = await aio.init_action(session, "send_receipt", {"order": 1})
            await session.begin()
            await aio.init_action(session, "send_receipt", {"order": 2})
            await session.rollback()
        assert await aio.get_action(engine, kept.id) == kept

    run(db, test)
    assert db.rows("SELECT processor, data FROM async_action") in (
        [("send_receipt", {"order": 1})], [("send_receipt", '{"order":1}')])


def test_a_rolled_back_async_enqueue_wakes_nobody(pg: Db) -> None:
    """The wake-up is part of the transaction: a listener gets the committed one's and
    never the rolled-back one's (sent first, so it would have arrived first)."""
    with psycopg.connect(listen_url(pg.engine), autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")

        async def test(engine: AsyncEngine) -> None:
            async with AsyncSession(engine) as session:
                await session.begin()
                await aio.init_action(session, "rolled_back")
                await session.rollback()
                async with session.begin():
                    await aio.init_action(session, "committed")

        run(pg, test)
        received = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
    assert received == ["committed"]


def test_every_coroutine_works_on_a_connection_and_an_engine(db: Db) -> None:
    async def test(engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            first = await aio.init_action(conn, "p", {"n": 0}, unique_key="only-one")
            again = await aio.init_action(conn, "p", {"n": 9}, unique_key="only-one")
            many = await aio.init_actions(conn, "p", [{"n": 1}, {"n": 2}])
            fanned = await aio.enqueue_all(conn, "p", each={"n": range(3, 6)})
            await conn.commit()
        assert again == first and fanned == 3
        assert [a.data for a in many] == [{"n": 1}, {"n": 2}]
        canceled = await aio.cancel(engine, first.id)
        assert canceled.status == Status.CANCELED
        retried = await aio.retry(engine, first.id, retries=5)
        assert (retried.status, retried.retries) == (Status.PENDING, 5)
        assert (await aio.get_action(engine, f"ASYNC-{first.id:08d}")).retries == 5

    run(db, test)
    assert db.scalar("SELECT count(*) FROM async_action") == 6


def test_the_coroutines_raise_the_sync_apis_errors(db: Db) -> None:
    async def test(engine: AsyncEngine) -> None:
        with pytest.raises(ActionNotFound, match="no action 404"):
            await aio.get_action(engine, 404)
        done = await aio.init_action(engine, "p")
        await aio.cancel(engine, done.id)
        with pytest.raises(AsyncActionsError, match=r"cannot cancel .* it is canceled"):
            await aio.cancel(engine, done.id)
        with pytest.raises(AsyncActionsError, match="give either delay or eligible_at"):
            await aio.init_action(engine, "p", delay=1, eligible_at=2)  # type: ignore[arg-type]

    run(db, test)


def test_wait_for_waits_without_blocking_the_event_loop(db: Db) -> None:
    """The processor finishes only once another task of the waiting loop has run."""
    loop_ran = threading.Event()

    @processor("needs_the_loop")
    def needs_the_loop(action: asyncactions.Action) -> str:
        return "done" if loop_ran.wait(20) else "the event loop was blocked"

    async def test(engine: AsyncEngine) -> None:
        action = await aio.init_action(engine, "needs_the_loop")
        worker = Worker(config=worker_config(db), concurrency=1)
        threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True).start()
        waiting = asyncio.create_task(aio.wait_for(engine, action.id, timeout=60))
        await asyncio.sleep(0.05)  # wait_for is waiting by now
        loop_ran.set()
        final = await waiting
        assert (final.status, final.result) == (Status.COMPLETED, "done")
        with pytest.raises(TimeoutError, match=r"is still pending after 0\.2s"):
            await aio.wait_for(engine, (await aio.init_action(engine, "other")).id,
                               timeout=0.2)

    run(db, test)


def test_the_wrong_kind_of_session_names_the_fix(db: Db) -> None:
    with Session(db.engine) as session, pytest.raises(
            AsyncActionsError, match=r"aio.init_action takes an AsyncSession.*not a Session; "
                                     r"with a Session call asyncactions.init_action\(...\) "
                                     "without await"):
        asyncio.run(aio.init_action(session, "p"))

    async def test(engine: AsyncEngine) -> None:
        async with AsyncSession(engine) as session:
            with pytest.raises(AsyncActionsError, match=r"got an AsyncSession: in async code "
                                                        r"use the coroutines of asyncactions.aio"):
                asyncactions.init_action(session, "p")  # type: ignore[arg-type]
        with pytest.raises(AsyncActionsError, match=r"the AsyncConnection is not started; use "
                                                    r"it inside `async with engine.connect\(\)"):
            await aio.init_action(engine.connect(), "p")

    run(db, test)
    assert db.scalar("SELECT count(*) FROM async_action") == 0



def test_a_large_bulk_enqueue_from_asyncio_takes_the_copy_path(
        pg: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    """From COPY_FROM actions on, PostgreSQL gets them by COPY, also from asyncio (on
    psycopg's async cursor), in the caller's transaction."""
    copies = []
    real_copy = enqueue._copy_async

    async def counted(*args: Any) -> Any:
        copies.append(args[1])
        return await real_copy(*args)

    monkeypatch.setattr(enqueue, "_copy_async", counted)

    async def test(engine: AsyncEngine) -> None:
        many = [{"n": n} for n in range(enqueue.COPY_FROM)]
        async with AsyncSession(engine) as session:
            async with session.begin():
                actions = await aio.init_actions(session, "p", many)
            await session.begin()
            await aio.init_actions(session, "p", many)
            await session.rollback()
        assert [a.data for a in actions[:2]] == [{"n": 0}, {"n": 1}]
        assert await aio.get_action(engine, actions[-1].id) == actions[-1]

    run(pg, test)
    assert len(copies) == 2 and copies[0].startswith("COPY async_action")
    assert pg.scalar("SELECT count(*) FROM async_action") == enqueue.COPY_FROM


def test_publish_in_an_async_session_is_all_or_none(db: Db) -> None:
    add_rule(db.engine, "order.placed", "send_receipt")
    add_rule(db.engine, "order.placed", "sync_invoice")

    async def test(engine: AsyncEngine) -> list[str]:
        async with AsyncSession(engine) as session:
            await session.begin()
            assert len(await aio.publish(session, "order.placed", {"order": 1})) == 2
            await session.rollback()
            async with session.begin():
                published = await aio.publish(session, "order.placed", {"order": 2})
        return sorted(a.processor for a in published)

    assert run(db, test) == ["send_receipt", "sync_invoice"]
    assert sorted(db.rows("SELECT processor, event FROM async_action")) == [
        ("send_receipt", "order.placed"), ("sync_invoice", "order.placed")]
