"""The flow-control claim check of issue 14: on a table keeping 2,000,000 finished rows
and 1,000 pending actions, how long a claim of 10 takes for a plain processor (today's
claim), for one with a concurrency cap and a rate limit (its lock and counts included),
and once every pending action has an ordering key (100 keys, 10 actions each: one
claimable per key, the claim checks each key it meets).

    python -m bench.flow [--rows 2000000] [--database-url URL]

One JSON line on stdout: the median client-side milliseconds of each, and their ratios
to the plain claim. Claims are rolled back, so every one sees the same table."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import timedelta

from sqlalchemy import Connection, create_engine, text

from asyncactions import queries
from asyncactions.claiming import set_claim_session

from . import pg
from .scale import INSERT_FINISHED, PENDING
from .systems import AsyncActions

CLAIM = 10
ROUNDS = 10
PER_ROUND = 30
LEASE = timedelta(seconds=60)
CAPPED = queries.Flow(concurrency=50, rate_count=1000, rate_seconds=1.0)


def measure(admin_url: str, rows: int) -> dict[str, float]:
    system = AsyncActions(concurrency=10)
    with pg.fresh_database(admin_url, "flow_claim") as url:
        system.install(url)
        system.bulk_enqueue(url, PENDING)
        with pg.connect(url) as conn:
            conn.execute(INSERT_FINISHED, {"rows": rows})
        pg.analyze(url, system.queue_table)
        engine = create_engine(pg.sqlalchemy_url(url))
        with engine.connect() as conn:
            set_claim_session(conn)
            conn.commit()
            times = _rounds(conn, {"plain": None, "capped": CAPPED})
            # The same pending actions, now keyed: 100 keys of 10, one claimable each.
            conn.execute(text("UPDATE async_action SET ordering_key = 'k' || (id % 100) "
                              "WHERE status = 'pending'"))
            conn.commit()
            pg.analyze(url, system.queue_table)
            times.update(_rounds(conn, {"keyed": None}))
        engine.dispose()
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"rows": rows, "pending": PENDING,
            **{f"claim_ms_{k}": v for k, v in medians.items()},
            "capped_ratio": medians["capped"] / medians["plain"],
            "keyed_ratio": medians["keyed"] / medians["plain"]}


def _rounds(conn: Connection, kinds: dict[str, queries.Flow | None]) -> dict[str, list[float]]:
    """Client-side milliseconds of each kind of claim, in alternating rounds (the first
    warms caches and plans); every claim is rolled back."""
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for round_ in range(ROUNDS + 1):
        for kind, flow in kinds.items():
            for _ in range(PER_ROUND):
                with conn.begin() as tx:
                    start = time.perf_counter()
                    if flow is not None:
                        queries.lock_processor(conn, "bench_noop", LEASE)
                    claimed, _ = queries.claim(conn, "bench:flow", [("bench_noop", 3)],
                                               CLAIM, LEASE, flow)
                    elapsed = time.perf_counter() - start
                    tx.rollback()
                if len(claimed) != CLAIM:
                    raise RuntimeError(f"{kind}: claimed {len(claimed)}")
                if round_:
                    times[kind].append(elapsed * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    print(json.dumps(measure(args.database_url, args.rows)))


if __name__ == "__main__":
    main()
