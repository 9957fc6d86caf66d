"""Background fan-out vs bulk enqueue of the same items, interleaved:
`python -m bench.fanout --n 1000000 [--runs 3] [--sqlite]`.

bulk: init_actions(engine, "visit", chunk) over the cross product in chunks of
--bulk-chunk (COPY on PostgreSQL from 1,000 on); the clock runs only during the calls,
not while the items are built.
fan-out: enqueue_all(engine, "visit", each=..., background=True) and one real worker
process (`python -m asyncactions worker --import bench.noop`: no "visit" processor); the time is the
fan-out action's started_at to finished_at (the worker's start-up is not counted). The
worker's RSS is sampled while it streams; its peak is VmHWM.

Each measurement runs on a fresh database (PostgreSQL, or a SQLite file with --sqlite);
bulk and fan-out alternate.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import text

from asyncactions import admin, enqueue_all, init_actions, migrate
from asyncactions.database import make_engine
from asyncactions.enqueue import FANOUT, FANOUT_BATCH, combinations

from . import pg

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ROOT = Path(__file__).resolve().parent.parent
STATIC = {"survey": "q3"}


def each_for(n: int, width: int) -> dict[str, range]:
    """i x j, j of `width` values; one iterable of n with width 1."""
    if width == 1 or n % width:
        return {"i": range(n)}
    return {"i": range(n // width), "j": range(width)}


def bulk(url: str, n: int, width: int, chunk: int) -> dict[str, Any]:
    engine = make_engine(url)
    migrate.upgrade(engine)
    items = combinations(each_for(n, width), STATIC)
    spent = 0.0
    while batch := list(itertools.islice(items, chunk)):
        started = time.perf_counter()
        init_actions(engine, "visit", batch)
        spent += time.perf_counter() - started
    engine.dispose()
    return {"rate": n / spent, "seconds": spent}


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def fan_out(url: str, n: int, width: int) -> dict[str, Any]:
    engine = make_engine(url)
    migrate.upgrade(engine)
    each = each_for(n, width)
    assert enqueue_all(engine, "visit", each=each, static=STATIC, background=True) == n
    with engine.connect() as conn:
        fan_id = conn.execute(text("SELECT id FROM async_action WHERE processor = :p"),
                              {"p": FANOUT}).scalar_one()
    with tempfile.TemporaryDirectory() as cwd:
        (Path(cwd) / "asyncactions.toml").write_text('[worker]\npoll_interval = "50ms"\n')
        worker = subprocess.Popen(
            [sys.executable, "-m", "asyncactions", "worker", "--import", "bench.noop"],
            cwd=cwd,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT), "ASYNCACTIONS_DATABASE_URL": url})
        samples: list[tuple[float, int]] = []  # (fraction done, RSS in kB)
        try:
            deadline = time.monotonic() + 3600
            while True:
                action = admin.get_action(engine, fan_id)
                samples.append((action.data["done"] / n, _status_kb(worker.pid, "VmRSS")))
                if action.status.value in ("completed", "failed", "dead"):
                    break
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"the fan-out did not finish: {action.status}")
                time.sleep(0.25)
            peak = _status_kb(worker.pid, "VmHWM")
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
    engine.dispose()
    if action.status.value != "completed":
        raise RuntimeError(f"the fan-out ended {action.status.value}: {action.errors}")
    seconds = (action.finished_at - action.started_at).total_seconds()
    early = [rss for fraction, rss in samples if fraction >= 0.05]
    return {"rate": n / seconds, "seconds": seconds, "peak_rss_mb": peak / 1024,
            "rss_early_mb": (early[0] if early else peak) / 1024}


@contextmanager
def _database(a: argparse.Namespace) -> Iterator[str]:
    if a.sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{Path(tmp) / 'bench.db'}"
    else:
        with pg.fresh_database(a.admin_url, "fanout") as url:
            yield pg.sqlalchemy_url(url)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--width", type=int, default=1000,
                   help="combinations are i x j with j of this many values; 1: one iterable")
    p.add_argument("--bulk-chunk", type=int, default=FANOUT_BATCH)
    p.add_argument("--admin-url", default=ADMIN_URL)
    p.add_argument("--sqlite", action="store_true", help="on a SQLite file instead")
    a = p.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"bulk": [], "fan-out": []}
    for run in range(a.runs):
        for name in ("bulk", "fan-out"):
            with _database(a) as url:
                got = (bulk(url, a.n, a.width, a.bulk_chunk) if name == "bulk"
                       else fan_out(url, a.n, a.width))
            results[name].append(got)
            print(f"run {run + 1} {name}: " + ", ".join(
                f"{k} {v:,.1f}" for k, v in got.items()), flush=True)
    bulk_rate = statistics.median(r["rate"] for r in results["bulk"])
    fan_rate = statistics.median(r["rate"] for r in results["fan-out"])
    print(f"bulk enqueue (init_actions, chunks of {a.bulk_chunk:,}): {bulk_rate:,.0f}/s")
    print(f"background fan-out of {a.n:,}: {fan_rate:,.0f}/s ({fan_rate / bulk_rate:.2f}x "
          f"bulk), worker peak RSS {max(r['peak_rss_mb'] for r in results['fan-out']):.0f} MB "
          f"(RSS when 5% or more was done: "
          f"{statistics.median(r['rss_early_mb'] for r in results['fan-out']):.0f} MB)")


if __name__ == "__main__":
    main()
