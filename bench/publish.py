"""publish to 3 subscribers vs one init_action, inside a transaction on a kept
connection, interleaved: `python -m bench.publish [--reps 2000] [--sqlite]`.

Each rep begins a transaction, runs a SELECT 1 (so the BEGIN round trip is paid
before the clock starts), times one call, and commits. The three calls are timed in
turn within each rep; the figures are medians. "init_actions of 3" is one init_action
plus the rows (one statement inserting three). "rules+3 init_action" is what publish
did before it became one statement (a SELECT of the rules, then one INSERT each).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select, text

from asyncactions import init_action, init_actions, migrate, publish
from asyncactions.database import make_engine
from asyncactions.events import add_rule, async_action_rule

from . import pg

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SUBSCRIBERS = ("invoice", "receipt", "warehouse")
DATA = {"order": 42, "lines": [{"sku": "a-1", "qty": 2}], "email": "a@example.com"}


def old_publish(conn: Connection) -> None:
    names = conn.execute(select(async_action_rule.c.processor)
                         .where(async_action_rule.c.event == "order.placed")
                         .order_by(async_action_rule.c.processor)).scalars().all()
    for name in names:
        init_action(conn, name, DATA, _event="order.placed")


def measure(url: str, reps: int) -> dict[str, float]:
    engine = make_engine(url)
    migrate.upgrade(engine)
    for name in SUBSCRIBERS:
        add_rule(engine, "order.placed", name)
    calls: dict[str, Callable[[Connection], Any]] = {
        "init_action": lambda c: init_action(c, "invoice", DATA),
        "publish to 3": lambda c: publish(c, "order.placed", DATA),
        # One statement of three rows: one init_action plus the rows.
        "init_actions of 3": lambda c: init_actions(c, "invoice", [DATA] * 3),
        "rules+3 init_action": old_publish,
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    with engine.connect() as conn:
        for rep in range(reps + 50):
            for name, call in calls.items():
                with conn.begin():
                    conn.execute(text("SELECT 1"))
                    started = time.perf_counter()
                    call(conn)
                    elapsed = time.perf_counter() - started
                if rep >= 50:  # warmed up: statements compiled, caches filled
                    times[name].append(elapsed)
    engine.dispose()
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--sqlite", action="store_true", help="on a SQLite file instead")
    p.add_argument("--admin-url", default=ADMIN_URL)
    a = p.parse_args()
    if a.sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            figures = measure(f"sqlite:///{Path(tmp) / 'bench.db'}", a.reps)
    else:
        with pg.fresh_database(a.admin_url, "publish") as url:
            figures = measure(pg.sqlalchemy_url(url), a.reps)
    base = figures["init_action"]
    for name, ms in figures.items():
        print(f"{name:>20}: {ms:.3f} ms median ({ms / base:.2f}x init_action)")


if __name__ == "__main__":
    main()
