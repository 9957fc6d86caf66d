"""The scale check of issue 4, for asyncactions: does the claim stay fast once the table
keeps millions of finished rows, and does a worker's memory stay flat over a long drain?"""

from __future__ import annotations

import statistics
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import create_engine, event

from asyncactions import queries

from . import pg
from .procs import Workers, log, wait_until
from .scenarios import DRAIN_TIMEOUT, percentile
from .systems import AsyncActions

PENDING = 1_000
CLAIM_BATCH = 10
CLAIM_REPS = 300

# Finished rows as a busy week leaves them: completed, with payloads and timestamps.
INSERT_FINISHED = """
INSERT INTO async_action (processor, status, data, retries, attempts, next_eligible_at,
                          created_at, started_at, finished_at)
SELECT 'bench_noop', 'completed', jsonb_build_object('i', g), 3, 1, t, t, t,
       t + interval '5 milliseconds'
FROM generate_series(1, %(rows)s) AS g,
     LATERAL (SELECT now() - interval '7 days' + g * interval '250 milliseconds') AS x(t)
"""


def claim_latency(system: AsyncActions, admin_url: str, rows: int) -> dict[str, Any]:
    """Median latency of queries.claim (10 of PENDING pending rows, rolled back) on a
    table with only those rows, then with `rows` finished rows added."""
    with pg.fresh_database(admin_url, "scale") as url:
        system.install(url)
        system.bulk_enqueue(url, PENDING)
        pg.analyze(url, system.queue_table)
        before = _claim_times(url)
        start = time.perf_counter()
        with pg.connect(url) as conn:
            conn.execute(INSERT_FINISHED, {"rows": rows})
        insert_s = time.perf_counter() - start
        # autovacuum would get here on its own in a real deployment (it may be off
        # on a benchmark server); do its work before measuring.
        pg.analyze(url, system.queue_table)
        after = _claim_times(url)
        plan = _claim_plan(url)
    return {"claim_ms_empty": statistics.median(before),
            "claim_ms_full": statistics.median(after),
            "claim_p95_ms_empty": percentile(before, 95),
            "claim_p95_ms_full": percentile(after, 95),
            "ratio": statistics.median(after) / statistics.median(before),
            "finished_rows": rows, "insert_s": insert_s,
            "plan_uses_claim_index": "async_action_claim_idx" in plan}


def _claim_times(url: str) -> list[float]:
    engine = create_engine(pg.sqlalchemy_url(url))
    times = []
    try:
        with engine.connect() as conn:
            for rep in range(CLAIM_REPS + 20):
                tx = conn.begin()
                start = time.perf_counter()
                claimed = queries.claim(conn, "bench:scale", ["bench_noop"], CLAIM_BATCH,
                                        timedelta(seconds=60))
                elapsed = time.perf_counter() - start
                tx.rollback()
                assert len(claimed) == CLAIM_BATCH, claimed
                if rep >= 20:  # the first ones warm caches and prepare statements
                    times.append(elapsed * 1000)
    finally:
        engine.dispose()
    return sorted(times)


def _claim_plan(url: str) -> str:
    """EXPLAIN of the statement queries.claim sends, captured as it is sent (so this
    follows the claim whatever shape its SQL takes)."""
    engine = create_engine(pg.sqlalchemy_url(url))
    sent: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    try:
        with engine.connect() as conn:
            tx = conn.begin()
            queries.claim(conn, "bench:plan", ["bench_noop"], CLAIM_BATCH, timedelta(seconds=60))
            tx.rollback()
            statement, parameters = sent[-1]
            event.remove(engine, "before_cursor_execute", capture)
            tx = conn.begin()
            plan = conn.exec_driver_sql("EXPLAIN " + statement, parameters).all()
            tx.rollback()
            return "\n".join(row[0] for row in plan)
    finally:
        engine.dispose()


def worker_rss(system: AsyncActions, admin_url: str, n: int) -> dict[str, Any]:
    """Peak RSS of one worker process draining n no-op actions. The table is analyzed
    first: this check is about memory, and without statistics the claim's plan (a sort of
    every pending row) would make a 200,000-action drain take an hour."""
    with pg.fresh_database(admin_url, "rss") as url:
        system.install(url)
        enqueue_s = system.bulk_enqueue(url, n)
        pg.analyze(url, system.queue_table)
        command, env = system.worker_command(url, "noop")
        samples: list[float] = []

        with pg.connect(url) as conn, Workers(command, 1, env=env, gated=True) as procs:
            def drained() -> bool:
                samples.append(procs.memory_mb("VmRSS"))
                if len(samples) % 40 == 0:  # every 10 s
                    left = pg.scalar(conn, "SELECT count(*) FROM async_action "
                                     "WHERE status <> 'completed'")
                    log(f"[scale rss] {left:,} left, worker RSS {samples[-1]:.0f} MB")
                return not pg.scalar(conn, system.busy_sql)

            rss_ready = procs.memory_mb("VmRSS")
            procs.open_gate()
            start = time.monotonic()
            end = wait_until(drained, DRAIN_TIMEOUT, 0.25, procs, "the drain")
            peak = procs.memory_mb("VmHWM")
    return {"n": n, "peak_rss_mb": peak, "rss_mb_ready": rss_ready,
            "rss_mb_end": samples[-1], "rss_mb_midway": samples[len(samples) // 2],
            "drain_s": end - start, "drain_per_s": n / (end - start),
            "enqueue_per_s": n / enqueue_s}
