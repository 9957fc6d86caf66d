"""pgqueuer's side of the benchmark. Runs inside bench/.venv-pgqueuer (only the standard
library, pgqueuer and asyncpg), so nothing here may import asyncactions or SQLAlchemy.

    python bench/peers/pgqueuer_peer.py enqueue|s2|paced --dsn URL ...  (prints one JSON line)
    python bench/peers/pgqueuer_peer.py worker --dsn URL [--batch-size 10] [--managers 1]
                                               [--max-concurrent-tasks N]

The worker is what `pgq run` does, through pgqueuer.run() (its documented Python entry
point): `pgq run` itself fails at start with typer 0.29 ('str' object has no attribute
'name' while setting up logging). `--managers 5` runs five QueueManagers in the one
process, each on its own connection, as pgqueuer's tools/benchmark.py does by default.

Used the way pgqueuer's README and its own tools/benchmark.py use it: asyncpg, a
QueueManager with async entrypoints, Queries.enqueue with lists for a bulk insert.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pgqueuer
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager

S2_WARMUP = 50
INSERT_ORDER = "INSERT INTO orders (customer, amount) VALUES ($1, $2) RETURNING id"


def _run(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop  # pgqueuer's own CLI runs on uvloop when it is installed
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


# --- the worker -------------------------------------------------------------------------

async def _wait_for_gate() -> None:
    """Same gate as bench/noop.py: start-up happens before the drain clock starts."""
    gate = os.environ.get("BENCH_GATE")
    if gate:
        Path(f"{gate}.ready.{os.getpid()}").touch()
        while not os.path.exists(gate):
            await asyncio.sleep(0.001)


@asynccontextmanager
async def create_worker() -> AsyncIterator[QueueManager]:
    await _wait_for_gate()
    conn = await asyncpg.connect(os.environ["BENCH_DSN"])
    qm = QueueManager(Queries(AsyncpgDriver(conn)))
    pickup_file = os.environ.get("BENCH_PICKUP_FILE")
    fd = os.open(pickup_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if pickup_file else None

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        pass

    @qm.entrypoint("pickup")
    async def pickup(job: Job) -> None:
        started = time.monotonic()
        if fd is not None and job.payload is not None:
            os.write(fd, f"{json.loads(job.payload)['i']} {started!r}\n".encode())

    try:
        yield qm
    finally:
        await conn.close()


async def worker(batch_size: int, managers: int, max_concurrent_tasks: int | None) -> None:
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, shutdown.set)
    await asyncio.gather(*(pgqueuer.run(create_worker, batch_size=batch_size,
                                        max_concurrent_tasks=max_concurrent_tasks,
                                        shutdown=shutdown)
                           for _ in range(managers)))


# --- the producer's side ------------------------------------------------------------------

async def _queries(dsn: str) -> tuple[asyncpg.Connection, Queries]:
    conn = await asyncpg.connect(dsn)
    return conn, Queries(AsyncpgDriver(conn))


async def enqueue(dsn: str, n: int) -> dict[str, Any]:
    conn, queries = await _queries(dsn)
    data = [{"i": i} for i in range(n)]
    start = time.perf_counter()
    await queries.enqueue(["noop"] * n, [json.dumps(d).encode() for d in data], [0] * n)
    elapsed = time.perf_counter() - start
    await conn.close()
    return {"seconds": elapsed}


async def s2(dsn: str, blocks: int, per_block: int) -> dict[str, Any]:
    conn, queries = await _queries(dsn)

    async def tx(with_enqueue: bool) -> None:
        async with conn.transaction():
            order_id = await conn.fetchval(INSERT_ORDER, "c42", Decimal("19.90"))
            if with_enqueue:
                await queries.enqueue("noop", json.dumps({"order_id": order_id}).encode())

    result = await _interleaved(tx, blocks, per_block)
    await conn.close()
    return result


async def _interleaved(tx: Callable[[bool], Awaitable[None]], blocks: int,
                       per_block: int) -> dict[str, float]:
    """Mirror of bench.systems.interleaved (this venv cannot import it)."""
    for _ in range(S2_WARMUP):
        await tx(False)
        await tx(True)
    elapsed = {False: 0.0, True: 0.0}
    for _ in range(blocks):
        for with_enqueue in (False, True):
            start = time.perf_counter()
            for _ in range(per_block):
                await tx(with_enqueue)
            elapsed[with_enqueue] += time.perf_counter() - start
    total = blocks * per_block
    without, with_ = total / elapsed[False], total / elapsed[True]
    return {"tx_per_s_without": without, "tx_per_s_with": with_, "ratio": with_ / without}


async def paced(dsn: str, ids: list[int], gap: float) -> dict[str, Any]:
    conn, queries = await _queries(dsn)
    befores = []
    start = time.monotonic()
    for k, i in enumerate(ids):
        await asyncio.sleep(max(start + k * gap - time.monotonic(), 0.0))
        payload = json.dumps({"i": i}).encode()
        befores.append(time.monotonic())
        await queries.enqueue("pickup", payload)
    await conn.close()
    return {"befores": befores}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["enqueue", "s2", "paced", "worker"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--per-block", type=int, default=300)
    parser.add_argument("--ids", default="")
    parser.add_argument("--gap", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--managers", type=int, default=1)
    parser.add_argument("--max-concurrent-tasks", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "worker":
        os.environ["BENCH_DSN"] = args.dsn
        _run(worker(args.batch_size, args.managers, args.max_concurrent_tasks))
        return
    if args.command == "enqueue":
        result = _run(enqueue(args.dsn, args.n))
    elif args.command == "s2":
        result = _run(s2(args.dsn, args.blocks, args.per_block))
    else:
        ids = [int(x) for x in args.ids.split(",") if x]
        result = _run(paced(args.dsn, ids, args.gap))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
