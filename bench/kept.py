"""S2 on one kept connection (issue 17): the outbox's cost where no pool checkout
dilutes it, next to raw psycopg sending the very statement asyncactions sends.

Every variant runs on a connection of its own, opened once; the variants take turns in
blocks, so drift on the machine hits them alike. The ratios compare each stack with its
own order-only baseline:

- `sa_enqueue` / `sa_order`: a SQLAlchemy `Connection`, `conn.begin()` per transaction,
  the order insert and `init_action(conn, …)` against the order insert alone;
- `sa_nowait` / `sa_order`: the same with `init_action(conn, …, wait=False)`, whose
  statement rides the commit's round trip;
- `pg_enqueue` / `pg_order`: psycopg, the order insert then the enqueue statement
  asyncactions renders (row and notification in one statement), one round trip each;
- `pg_pipeline` / `pg_order`: the same two statements, the enqueue and the COMMIT sent
  together in one pipeline (the order's id is needed first, so its insert waits).
"""

from __future__ import annotations

import inspect
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import psycopg
from sqlalchemy import create_engine, make_url, text

from asyncactions import init_action

try:
    from asyncactions.enqueue import _insert_for
except ImportError:  # bench.compare runs this harness against older commits too
    from asyncactions.enqueue import _insert_stmt

    def _insert_for(dialect: str, params: dict[str, Any]) -> Any:
        return _insert_stmt(dialect, False, False)

from .pg import ROOT, libpq_url, sqlalchemy_url

ORDER_SQL = "INSERT INTO orders (customer, amount) VALUES (%s, %s) RETURNING id"
WARMUP = 50
SPLIT = 10  # rounds per S2 block
PROCESSOR = "bench_noop"


def interleaved_many(variants: dict[str, Callable[[], None]], blocks: int,
                     per_block: int) -> dict[str, list[float]]:
    """Seconds per block of each variant, the variants taking turns block by block."""
    for _ in range(WARMUP):
        for tx in variants.values():
            tx()
    elapsed: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(blocks):
        for name, tx in variants.items():
            start = time.perf_counter()
            for _ in range(per_block):
                tx()
            elapsed[name].append(time.perf_counter() - start)
    return elapsed


def s2_kept(url: str, blocks: int, per_block: int, nowait: bool | None = None,
            delay_ms: float | None = None) -> dict[str, float]:
    """The variants above; with `delay_ms` (0 too), every connection goes through
    bench/latency_proxy.py, which holds each chunk that long each way (a server on
    another host), and the measured round trip is reported as `round_trip_ms`."""
    if nowait is None:  # bench.compare runs this harness against older commits too
        nowait = "wait" in inspect.signature(init_action).parameters
    if delay_ms is None:
        return _s2_kept(url, blocks, per_block, nowait)
    proxy = subprocess.Popen([sys.executable, "-m", "bench.latency_proxy", "--port", "0",
                              "--to", f"{make_url(url).host}:{make_url(url).port or 5432}",
                              "--delay-ms", str(delay_ms)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        port = int(proxy.stdout.readline())  # type: ignore[union-attr]
        proxied = make_url(libpq_url(url)).set(host="127.0.0.1", port=port)
        out = _s2_kept(proxied.render_as_string(hide_password=False), blocks, per_block,
                       nowait)
        with psycopg.connect(libpq_url(proxied.render_as_string(hide_password=False)),
                             autocommit=True) as conn:
            start = time.perf_counter()
            for _ in range(100):
                conn.execute("SELECT 1").fetchall()
            out["round_trip_ms"] = (time.perf_counter() - start) * 10
        out["proxy_delay_ms"] = delay_ms
        return out
    finally:
        proxy.terminate()
        proxy.wait()


def _s2_kept(url: str, blocks: int, per_block: int, nowait: bool) -> dict[str, float]:
    engine = create_engine(sqlalchemy_url(url))
    sa = engine.connect()
    order = text("INSERT INTO orders (customer, amount) VALUES (:customer, :amount) "
                 "RETURNING id")
    pg_conns = [psycopg.connect(libpq_url(url)) for _ in range(3)]
    enqueue_sql, _ = _insert_for("postgresql", _params(0)).render(engine.dialect, _params(0))

    def sa_tx(with_enqueue: bool, wait: bool = True) -> Callable[[], None]:
        def tx() -> None:
            with sa.begin():
                order_id = sa.execute(order, {"customer": "c42",
                                              "amount": Decimal("19.90")}).scalar_one()
                if with_enqueue:
                    init_action(sa, PROCESSOR, {"order_id": order_id},
                                **({} if wait else {"wait": False}))
        return tx

    def pg_tx(conn: psycopg.Connection[Any], mode: str) -> Callable[[], None]:
        cur, enqueue_cur = conn.cursor(), conn.cursor()

        def tx() -> None:
            order_id = cur.execute(ORDER_SQL, ("c42", Decimal("19.90"))).fetchone()[0]
            if mode == "enqueue":
                cur.execute(enqueue_sql, _args(engine, order_id)).fetchall()
                conn.commit()
            elif mode == "pipeline":
                with conn.pipeline():
                    enqueue_cur.execute(enqueue_sql, _args(engine, order_id))
                    cur.execute("COMMIT")
                enqueue_cur.fetchall()
            else:
                conn.commit()
        return tx

    variants = {"sa_order": sa_tx(False), "sa_enqueue": sa_tx(True),
                **({"sa_nowait": sa_tx(True, wait=False)} if nowait else {}),
                "pg_order": pg_tx(pg_conns[0], "order"),
                "pg_enqueue": pg_tx(pg_conns[1], "enqueue"),
                "pg_pipeline": pg_tx(pg_conns[2], "pipeline")}
    # Finer turns than S2's blocks (same number of transactions): the machine is shared,
    # and a burst of other work then spoils one round, which the medians below leave out.
    rounds, per_round = blocks * SPLIT, max(per_block // SPLIT, 1)
    try:
        times = interleaved_many(variants, rounds, per_round)
    finally:
        sa.close()
        engine.dispose()
        for conn in pg_conns:
            conn.close()
    rates = {name: rounds * per_round / sum(seconds) for name, seconds in times.items()}
    out = {f"tx_per_s_{name}": rate for name, rate in rates.items()}
    pairs = [(name, base) for name, base in (
        ("sa_enqueue", "sa_order"), ("sa_nowait", "sa_order"), ("pg_enqueue", "pg_order"),
        ("pg_pipeline", "pg_order")) if name in times]
    for name, base in pairs:
        # The median over rounds of each round's own ratio: robust to bursts of other
        # work on the machine, which a ratio of totals is not.
        out[f"ratio_{name}"] = statistics.median(
            b / t for b, t in zip(times[base], times[name], strict=True))
        # What the enqueue adds to a transaction, in ms (the ratios also depend on how
        # fast each stack's own order-only transaction is).
        out[f"added_ms_{name}"] = 1000 * statistics.median(
            (t - b) / per_round for b, t in zip(times[base], times[name], strict=True))
    out["ratio"] = out["ratio_sa_enqueue"]
    # Item 2 of issue 17: init_action within 0.03 of its own statement's ratio.
    out["gap_sa_vs_pg_enqueue"] = out["ratio_pg_enqueue"] - out["ratio_sa_enqueue"]
    return out


def _params(order_id: int) -> dict[str, Any]:
    return {"processor": PROCESSOR, "data": json.dumps({"order_id": order_id}),
            "related_id": None, "unique_key": None, "ordering_key": None,
            "trace_context": None, "event": None, "retries": None, "priority": 0,
            "delay": 0.0, "eligible_at": None}


def _args(engine: Any, order_id: int) -> Any:
    params = _params(order_id)
    return _insert_for("postgresql", params).render(engine.dialect, params)[1]
