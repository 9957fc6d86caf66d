"""The systems under test behind one small interface, so that every scenario runs the
same way against asyncactions and against its peers (bench/peers/)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any, Literal, Protocol

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from asyncactions import aio, init_action, init_actions, migrate

from .pg import ROOT, libpq_url, sqlalchemy_url

Kind = Literal["noop", "pickup"]
# S2's business table, the same for every system.
ORDERS_DDL = ("CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, "
              "amount numeric(12, 2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
S2_WARMUP = 50


class System(Protocol):
    name: str
    queue_table: str
    # SQL that is true while any action is not yet finished (kept cheap: it is polled).
    busy_sql: str
    # SQL for the time (epoch seconds, the database's clock) the last action finished.
    last_finish_sql: str
    # Diagnostics read from the table after S1's drain: {figure: SQL for a number}.
    drain_sql: dict[str, str]

    def describe(self) -> dict[str, Any]: ...
    def prepare(self) -> None: ...
    def install(self, url: str) -> None: ...
    def bulk_enqueue(self, url: str, n: int) -> float: ...
    def worker_command(self, url: str, kind: Kind) -> tuple[list[str], dict[str, str]]: ...
    def s2(self, url: str, blocks: int, per_block: int) -> dict[str, float]: ...
    def s2_kept(self, url: str, blocks: int, per_block: int) -> dict[str, float]: ...
    def enqueue_paced(self, url: str, ids: Sequence[int], gap: float) -> list[float]: ...


def interleaved(tx: Callable[[bool], None], blocks: int, per_block: int) -> dict[str, float]:
    """S2's loop: alternate blocks of transactions without and with the enqueue, so
    drift on the machine (checkpoints, cache) hits both alike; returns tx/s of each."""
    for _ in range(S2_WARMUP):
        tx(False)
        tx(True)
    elapsed = {False: 0.0, True: 0.0}
    for _ in range(blocks):
        for with_enqueue in (False, True):
            start = time.perf_counter()
            for _ in range(per_block):
                tx(with_enqueue)
            elapsed[with_enqueue] += time.perf_counter() - start
    total = blocks * per_block
    without, with_ = total / elapsed[False], total / elapsed[True]
    return {"tx_per_s_without": without, "tx_per_s_with": with_, "ratio": with_ / without}


def sleep_until(deadline: float) -> None:
    time.sleep(max(deadline - time.monotonic(), 0.0))


class AsyncActions:
    """asyncactions through its public API and its own `asyncactions worker` command."""

    name = "asyncactions"
    queue_table = "async_action"
    busy_sql = ("SELECT EXISTS (SELECT 1 FROM async_action "
                "WHERE status IN ('pending', 'running'))")
    last_finish_sql = "SELECT extract(epoch FROM max(finished_at)) FROM async_action"
    drain_sql = {
        # First claim to last completion, by the database's clock.
        "db_span_s": "SELECT extract(epoch FROM max(finished_at) - min(started_at)) "
                     "FROM async_action",
        # now() is per transaction: distinct finished_at count the completion
        # transactions, so N / that = actions per completion batch. (Claims stamp
        # started_at per row with clock_timestamp(), so it cannot count the claims.)
        "completion_transactions": "SELECT count(DISTINCT finished_at) FROM async_action",
    }
    processors: dict[Kind, str] = {"noop": "bench_noop", "pickup": "bench_pickup"}

    def __init__(self, concurrency: int, s2kept_delay_ms: float | None = None) -> None:
        self.concurrency = concurrency
        self.s2kept_delay_ms = s2kept_delay_ms  # see bench/latency_proxy.py

    def describe(self) -> dict[str, Any]:
        return {"version": version("asyncactions"),
                "worker": {"concurrency": self.concurrency, "config": "bench/asyncactions.toml"
                           " (product defaults: poll_interval 1s, lease 60s)"},
                "enqueue": "init_actions / init_action on a SQLAlchemy Engine or Connection "
                           "(psycopg 3)"}

    def prepare(self) -> None:
        pass

    def _engine(self, url: str) -> Engine:
        engine = create_engine(sqlalchemy_url(url))
        with engine.connect() as conn:  # connect before anything is timed
            conn.execute(text("SELECT 1"))
        return engine

    def install(self, url: str) -> None:
        engine = create_engine(sqlalchemy_url(url))
        try:
            migrate.upgrade(engine)
        finally:
            engine.dispose()

    def bulk_enqueue(self, url: str, n: int, chunk: int = 20_000) -> float:
        """Seconds to enqueue n actions, init_actions of `chunk` at a time."""
        engine = self._engine(url)
        try:
            elapsed = 0.0
            for first in range(0, n, chunk):
                data = [{"i": i} for i in range(first, min(first + chunk, n))]
                start = time.perf_counter()
                init_actions(engine, self.processors["noop"], data)
                elapsed += time.perf_counter() - start
            return elapsed
        finally:
            engine.dispose()

    def worker_command(self, url: str, kind: Kind) -> tuple[list[str], dict[str, str]]:
        return ([sys.executable, "-m", "asyncactions", "--config",
                 str(ROOT / "bench" / "asyncactions.toml"), "--database-url", libpq_url(url),
                 "worker", "--processors", self.processors[kind],
                 "--concurrency", str(self.concurrency)], {})

    def s2(self, url: str, blocks: int, per_block: int) -> dict[str, float]:
        engine = self._engine(url)
        insert = text("INSERT INTO orders (customer, amount) VALUES (:customer, :amount) "
                      "RETURNING id")

        def tx(with_enqueue: bool) -> None:
            with engine.begin() as conn:
                order_id = conn.execute(insert, {"customer": "c42", "amount": 19.9}).scalar_one()
                if with_enqueue:
                    init_action(conn, self.processors["noop"], {"order_id": order_id})

        try:
            return interleaved(tx, blocks, per_block)
        finally:
            engine.dispose()

    def s2_kept(self, url: str, blocks: int, per_block: int) -> dict[str, float]:
        from . import kept  # psycopg-level reference code, only for this scenario

        return kept.s2_kept(url, blocks, per_block, delay_ms=self.s2kept_delay_ms)

    def enqueue_paced(self, url: str, ids: Sequence[int], gap: float) -> list[float]:
        engine = self._engine(url)
        try:
            befores = []
            start = time.monotonic()
            for k, i in enumerate(ids):
                sleep_until(start + k * gap)
                befores.append(time.monotonic())
                init_action(engine, self.processors["pickup"], {"i": i})
            return befores
        finally:
            engine.dispose()


class AsyncActionsAio(AsyncActions):
    """asyncactions from asyncio: asyncactions.aio on SQLAlchemy's AsyncEngine and
    AsyncSession (psycopg async), and `async def` processors on the worker's loop."""

    name = "asyncactions-aio"
    processors: dict[Kind, str] = {"noop": "bench_noop_async", "pickup": "bench_pickup_async"}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(),
                "enqueue": "asyncactions.aio.init_actions / init_action on a SQLAlchemy "
                           "AsyncEngine or AsyncSession (psycopg async)",
                "processors": "async def"}

    def _run(self, url: str, main: Callable[[AsyncEngine], Any]) -> Any:
        async def run() -> Any:
            engine = create_async_engine(sqlalchemy_url(url))
            try:
                async with engine.connect() as conn:  # connect before anything is timed
                    await conn.execute(text("SELECT 1"))
                return await main(engine)
            finally:
                await engine.dispose()

        return asyncio.run(run())

    def bulk_enqueue(self, url: str, n: int, chunk: int = 20_000) -> float:
        async def main(engine: AsyncEngine) -> float:
            elapsed = 0.0
            for first in range(0, n, chunk):
                data = [{"i": i} for i in range(first, min(first + chunk, n))]
                start = time.perf_counter()
                await aio.init_actions(engine, self.processors["noop"], data)
                elapsed += time.perf_counter() - start
            return elapsed

        return self._run(url, main)

    def s2(self, url: str, blocks: int, per_block: int) -> dict[str, float]:
        """The same interleaved loop, each transaction an AsyncSession's on one event
        loop (run_until_complete per transaction: the same cost both ways)."""
        insert = text("INSERT INTO orders (customer, amount) VALUES (:customer, :amount) "
                      "RETURNING id")
        loop = asyncio.new_event_loop()
        engine = create_async_engine(sqlalchemy_url(url))

        async def tx(with_enqueue: bool) -> None:
            async with AsyncSession(engine) as session, session.begin():
                order_id = (await session.execute(insert, {"customer": "c42",
                                                           "amount": 19.9})).scalar_one()
                if with_enqueue:
                    await aio.init_action(session, self.processors["noop"],
                                          {"order_id": order_id})

        try:
            return interleaved(lambda flag: loop.run_until_complete(tx(flag)), blocks,
                               per_block)
        finally:
            loop.run_until_complete(engine.dispose())
            loop.close()

    def enqueue_paced(self, url: str, ids: Sequence[int], gap: float) -> list[float]:
        async def main(engine: AsyncEngine) -> list[float]:
            befores = []
            start = time.monotonic()
            for k, i in enumerate(ids):
                await asyncio.sleep(max(start + k * gap - time.monotonic(), 0.0))
                befores.append(time.monotonic())
                await aio.init_action(engine, self.processors["pickup"], {"i": i})
            return befores

        return self._run(url, main)
