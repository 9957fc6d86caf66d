"""S1, S2 and S3 of issue 4, written once against the System interface. Each function is
one run on a fresh database and returns that run's figures."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from . import pg
from .procs import Workers, machine_cpu, wait_until
from .systems import ORDERS_DDL, System

DRAIN_POLL = 0.05  # seconds between "anything left?" probes while draining
DRAIN_TIMEOUT = 900.0


def s1(system: System, admin_url: str, n: int, workers: int,
       analyze: bool = False) -> dict[str, Any]:
    """Bulk-enqueue n no-op actions (timed), then start `workers` worker processes and
    time from opening their gate until nothing is left unfinished in the table."""
    with pg.fresh_database(admin_url, "s1") as url:
        system.install(url)
        pg.checkpoint(url)
        enqueue_s = system.bulk_enqueue(url, n)
        if analyze:
            pg.analyze(url, system.queue_table)
        command, env = system.worker_command(url, "noop")
        with pg.connect(url) as conn, Workers(command, workers, env=env, gated=True) as procs:
            pg.checkpoint(url)
            wal_before = pg.wal_counters(url)
            cpu_before = machine_cpu()
            procs.open_gate()
            start, start_wall = time.monotonic(), time.time()
            end = wait_until(lambda: not pg.scalar(conn, system.busy_sql), DRAIN_TIMEOUT,
                             DRAIN_POLL, procs, "the drain")
            cpu_after = machine_cpu()
            worker_cpu = procs.cpu_seconds()
            drain_s = _drain_seconds(end - start, start_wall, pg.scalar(conn,
                                                                        system.last_finish_sql))
        time.sleep(0.5)  # exited backends have flushed their statistics
        wal_after = pg.wal_counters(url)
        diagnostics = {key: pg.scalar(url, sql) for key, sql in system.drain_sql.items()}
    busy, total = (a - b for a, b in zip(cpu_after, cpu_before, strict=True))
    return {
        "enqueue_s": enqueue_s, "enqueue_per_s": n / enqueue_s,
        "drain_s": drain_s, "drain_per_s": n / drain_s,
        # Diagnostics: where the time goes.
        **{key: float(value) for key, value in diagnostics.items()},
        "worker_cpu_s": worker_cpu,
        "machine_cpu_busy_pct": 100 * busy / total if total else None,
        # The whole machine's CPU (workers, server, harness) per action: what bounds a
        # drain once every core is busy, as with two processes on two cores.
        "machine_cpu_us_per_action": busy / os.sysconf("SC_CLK_TCK") / n * 1e6,
        "wal_syncs_per_action": (wal_after["wal_sync"] - wal_before["wal_sync"]) / n,
        "wal_bytes_per_action": (wal_after["wal_bytes"] - wal_before["wal_bytes"]) / n,
    }


def _drain_seconds(polled: float, start_wall: float, last_finish: Any) -> float:
    """The gate's opening to the last completion the database recorded: exact, where
    polling is only as good as its interval. If the server's clock is not ours (another
    host), the polled figure is the one to trust."""
    exact = float(last_finish) - start_wall if last_finish is not None else None
    return exact if exact is not None and -DRAIN_POLL <= polled - exact <= 1.0 else polled


def s2(system: System, admin_url: str, blocks: int, per_block: int,
       kept: bool = False) -> dict[str, Any]:
    """Outbox cost: tx/s of "insert an order" with and without one enqueue in the same
    transaction, interleaved in blocks (`kept`: on one connection kept open)."""
    with pg.fresh_database(admin_url, "s2") as url:
        system.install(url)
        with pg.connect(url) as conn:
            conn.execute(ORDERS_DDL)
        pg.checkpoint(url)
        return (system.s2_kept if kept else system.s2)(url, blocks, per_block)


def s3(system: System, admin_url: str, count: int, gap: float) -> dict[str, Any]:
    """Pickup latency of one idle worker: from just before each enqueue call to the
    processor's start, `count` single enqueues `gap` seconds apart."""
    with pg.fresh_database(admin_url, "s3") as url, tempfile.TemporaryDirectory() as tmp:
        system.install(url)
        pickups = Path(tmp) / "pickups.txt"
        pickups.touch()
        command, env = system.worker_command(url, "pickup")
        with Workers(command, 1, env={**env, "BENCH_PICKUP_FILE": str(pickups)}) as procs:
            warmup = [-3, -2, -1]  # the worker is up, connected and listening
            system.enqueue_paced(url, warmup, 0.05)
            wait_until(lambda: _lines(pickups) >= len(warmup), 120, 0.05, procs,
                       "the warm-up actions")
            time.sleep(1.0)  # idle, as the scenario says
            befores = system.enqueue_paced(url, range(count), gap)
            wait_until(lambda: _lines(pickups) >= len(warmup) + count, 60, 0.05, procs,
                       "the pickups")
        starts = {int(i): float(t) for i, t in
                  (line.split() for line in pickups.read_text().splitlines())}
    latencies = sorted((starts[i] - before) * 1000 for i, before in enumerate(befores))
    return {"p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
            "p99_ms": percentile(latencies, 99), "max_ms": latencies[-1],
            "mean_ms": statistics.fmean(latencies)}


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def percentile(sorted_values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_values) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)
