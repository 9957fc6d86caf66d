"""asyncio: the producer and admin API as coroutines, for SQLAlchemy's asyncio.

    async with AsyncSession(engine) as session, session.begin():
        session.add(order)
        await asyncactions.aio.init_action(session, "send_receipt", {"order": order.id})

Each coroutine runs the sync function of the same name on the sync facade SQLAlchemy
keeps behind every AsyncSession, AsyncConnection and AsyncEngine, in a greenlet: the
driver's awaits happen on the caller's event loop, and the statements, checks, encoding
and outbox guarantee are the sync API's own, not a copy. `wait_for` alone has a loop of
its own, so that waiting never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Concatenate, ParamSpec, TypeVar

import psycopg
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.util import greenlet_spawn

from . import admin, enqueue, events
from .action import Action
from .database import Database, NotADatabase
from .notifier import OUTCOME_CHANNEL

__all__ = ["cancel", "enqueue_all", "get_action", "init_action", "init_actions", "publish",
           "retry", "wait_for"]

AsyncDatabase = AsyncSession | AsyncConnection | AsyncEngine
P = ParamSpec("P")
R = TypeVar("R")


def _facade(db: AsyncDatabase, name: str) -> Database:
    """The sync Session, Connection or Engine behind `db`."""
    if isinstance(db, AsyncSession):
        return db.sync_session
    if isinstance(db, AsyncConnection):
        if db.sync_connection is None:
            raise NotADatabase(f"asyncactions.aio.{name}: the AsyncConnection is not "
                               "started; use it inside `async with engine.connect() as conn`")
        return db.sync_connection
    if isinstance(db, AsyncEngine):
        return db.sync_engine
    kind = type(db).__name__
    if kind in ("Session", "Connection", "Engine"):
        raise NotADatabase(f"asyncactions.aio.{name} takes an AsyncSession, AsyncConnection "
                           f"or AsyncEngine, not a {kind}; with a {kind} call "
                           f"asyncactions.{name}(...) without await")
    raise NotADatabase(f"asyncactions.aio.{name}: db must be a SQLAlchemy AsyncSession, "
                       f"AsyncConnection or AsyncEngine, not {kind}")


def _coroutine_of(fn: Callable[Concatenate[Database, P], R]
                  ) -> Callable[Concatenate[AsyncDatabase, P], Awaitable[R]]:
    """The coroutine version of a sync function whose first argument is the database."""

    @functools.wraps(fn)
    async def run(db: AsyncDatabase, *args: P.args, **kwargs: P.kwargs) -> R:
        return await greenlet_spawn(fn, _facade(db, fn.__name__), *args, **kwargs)

    return run


init_action = _coroutine_of(enqueue.init_action)
init_actions = _coroutine_of(enqueue.init_actions)
enqueue_all = _coroutine_of(enqueue.enqueue_all)
publish = _coroutine_of(events.publish)
get_action = _coroutine_of(admin.get_action)
cancel = _coroutine_of(admin.cancel)
retry = _coroutine_of(admin.retry)


async def wait_for(db: AsyncDatabase, action_id: int | str, timeout: float = 60) -> Action:
    """Wait until the action is completed, failed or canceled; TimeoutError after
    `timeout` seconds. On PostgreSQL it wakes when workers write outcomes (LISTEN on a
    psycopg async connection), on SQLite it polls with a growing pause; the event loop
    runs on meanwhile."""
    waiting = admin.Waiting(admin.parse_id(action_id), timeout)
    engine = await greenlet_spawn(admin.engine_of, _facade(db, "wait_for"))
    async with _outcome_listener(engine) as notified:
        while True:
            action = await get_action(db, waiting.action_id)
            pause = waiting.pause(action, listening=notified is not None)
            if pause is None:
                return action
            if notified is None:
                await asyncio.sleep(pause)
            else:
                await notified(pause)


@asynccontextmanager
async def _outcome_listener(engine: Engine
                            ) -> AsyncIterator[Callable[[float], Awaitable[None]] | None]:
    if engine.dialect.name != "postgresql":
        yield None
        return
    async with await psycopg.AsyncConnection.connect(admin.listen_url(engine),
                                                     autocommit=True) as listener:
        await listener.execute(f"LISTEN {OUTCOME_CHANNEL}")

        async def wait(seconds: float) -> None:
            async for _ in listener.notifies(timeout=seconds, stop_after=1):
                pass

        yield wait

