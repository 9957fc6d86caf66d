"""The scale check of issue 4, for asyncactions: does the claim stay fast once the table
keeps millions of finished rows, and does a worker's memory stay flat over a long drain?"""

from __future__ import annotations

import json
import statistics
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import create_engine

from asyncactions import init_actions, queries
from asyncactions.claiming import set_claim_session

from . import pg
from .procs import Workers, log, wait_until
from .scenarios import DRAIN_POLL, DRAIN_TIMEOUT, _drain_seconds, percentile
from .systems import AsyncActions, AsyncActionsAio

PENDING = 1_000
CLAIM_BATCH = 10
ROUNDS = 10
CLAIMS_PER_ROUND = 30
LEASE = timedelta(seconds=60)

# Finished rows as a busy week leaves them: completed, with payloads and timestamps.
INSERT_FINISHED = """
INSERT INTO async_action (processor, status, data, retries, attempts, next_eligible_at,
                          created_at, started_at, finished_at)
SELECT 'bench_noop', 'completed', jsonb_build_object('i', g), 3, 1, t, t, t,
       t + interval '5 milliseconds'
FROM generate_series(1, %(rows)s) AS g,
     LATERAL (SELECT now() - interval '7 days' + g * interval '250 milliseconds') AS x(t)
"""


class ClaimProbe:
    """Claims CLAIM_BATCH of the pending actions in one database and rolls back, timing
    the call as a worker sees it (queries.claim) and as the server runs it (EXPLAIN
    ANALYZE of the very statement queries.claim sent)."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(pg.sqlalchemy_url(url))
        self.conn = self.engine.connect()
        set_claim_session(self.conn)  # the worker's claim session, as the worker sets it
        self.conn.commit()
        self.client_ms: list[float] = []
        self.server_ms: list[float] = []
        # The very statement and arguments queries.claim sends, for EXPLAIN.
        self._claim_sql = queries.claim_statement("postgresql", (("bench_noop", 3),)).render(
            self.conn.dialect, queries.claim_params([("bench_noop", 3)], CLAIM_BATCH,
                                                    "bench:scale", LEASE))

    def claim(self, record: bool = True) -> None:
        with self.conn.begin() as tx:
            start = time.perf_counter()
            claimed, _ = queries.claim(self.conn, "bench:scale", [("bench_noop", 3)], CLAIM_BATCH,
                                       LEASE)
            elapsed = time.perf_counter() - start
            tx.rollback()
        if len(claimed) != CLAIM_BATCH:
            raise RuntimeError(f"claimed {len(claimed)} actions, expected {CLAIM_BATCH}")
        if record:
            self.client_ms.append(elapsed * 1000)

    def explain(self, analyze: bool = True) -> dict[str, Any]:
        statement, parameters = self._claim_sql
        options = "ANALYZE, FORMAT JSON" if analyze else "FORMAT JSON"
        with self.conn.begin() as tx:
            (plan,) = self.conn.exec_driver_sql(f"EXPLAIN ({options}) {statement}",
                                                parameters).one()
            tx.rollback()
        result: dict[str, Any] = plan[0]
        if analyze:
            self.server_ms.append(result["Execution Time"])
        return result

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()


def claim_latency(system: AsyncActions, admin_url: str, rows: int) -> dict[str, Any]:
    """Claim latency on a table holding PENDING pending actions, and on one holding the
    same plus `rows` finished ones; measured in alternating rounds so that whatever else
    the machine does hits both alike."""
    with pg.fresh_database(admin_url, "claim_empty") as empty, \
            pg.fresh_database(admin_url, "claim_full") as full:
        for url in (empty, full):
            system.install(url)
            system.bulk_enqueue(url, PENDING)
        start = time.perf_counter()
        with pg.connect(full) as conn:
            conn.execute(INSERT_FINISHED, {"rows": rows})
        insert_s = time.perf_counter() - start
        for url in (empty, full):
            # autovacuum would get here on its own in a real deployment (it may be off
            # on a benchmark server); do its work before measuring.
            pg.analyze(url, system.queue_table)
        probes = [ClaimProbe(empty), ClaimProbe(full)]
        try:
            for probe in probes:  # warm caches and prepared statements
                for _ in range(20):
                    probe.claim(record=False)
            for _ in range(ROUNDS):
                for probe in probes:
                    for _ in range(CLAIMS_PER_ROUND):
                        probe.claim()
                    for _ in range(CLAIMS_PER_ROUND // 3):
                        probe.explain()
            plan = json.dumps(probes[1].explain(analyze=False))
        finally:
            for probe in probes:
                probe.close()
    (client_empty, client_full), (server_empty, server_full) = (
        [statistics.median(p.client_ms) for p in probes],
        [statistics.median(p.server_ms) for p in probes])
    return {"claim_ms_empty": client_empty, "claim_ms_full": client_full,
            "ratio": client_full / client_empty,
            "claim_p95_ms_empty": percentile(sorted(probes[0].client_ms), 95),
            "claim_p95_ms_full": percentile(sorted(probes[1].client_ms), 95),
            "server_ms_empty": server_empty, "server_ms_full": server_full,
            "server_ratio": server_full / server_empty,
            "insert_s": insert_s,
            "plan_uses_claim_index": "async_action_claim_idx" in plan}


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


def sleepers(system: AsyncActionsAio, admin_url: str, n: int,
             concurrency: int) -> dict[str, Any]:
    """Concurrency that threads cannot give: one worker process with `concurrency` slots
    drains n actions whose async processor awaits asyncio.sleep(1). Ideal: n / concurrency
    seconds. Timed like S1's drain (gate to last completion); the worker's peak RSS."""
    with pg.fresh_database(admin_url, "sleep") as url:
        system.install(url)
        engine = create_engine(pg.sqlalchemy_url(url))
        try:
            with engine.begin() as conn:
                init_actions(conn, "bench_sleep_async", [{"i": i} for i in range(n)])
        finally:
            engine.dispose()
        command, env = system.worker_command(url, "noop")
        command = [*command[:command.index("--processors")], "--processors",
                   "bench_sleep_async", "--concurrency", str(concurrency)]
        with pg.connect(url) as conn, Workers(command, 1, env=env, gated=True) as procs:
            procs.open_gate()
            start, start_wall = time.monotonic(), time.time()
            end = wait_until(lambda: not pg.scalar(conn, system.busy_sql), DRAIN_TIMEOUT,
                             DRAIN_POLL, procs, "the drain")
            peak = procs.memory_mb("VmHWM")
            drain_s = _drain_seconds(end - start, start_wall,
                                     pg.scalar(conn, system.last_finish_sql))
            threads = round(procs.memory_mb("Threads") * 1024)  # a count, not kB
    return {"n": n, "drain_s": drain_s, "ideal_s": n / concurrency,
            "peak_rss_mb": peak, "worker_threads": threads}
