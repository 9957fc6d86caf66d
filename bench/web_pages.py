"""Dashboard and API page times with 1,000,000 actions on PostgreSQL (issue 13).

    .venv/bin/python -m bench.web_pages [--rows 1000000] [--runs 7]

Fills a throwaway database with a month of history (one insert ... select), starts a
real `asyncactions web`, and prints, per page, the median and max of --runs requests
after one warm-up. The database is dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import httpx

from asyncactions import migrate
from asyncactions.database import make_engine

from .pg import fresh_database, sqlalchemy_url

TOKEN = "bench-token"

# A month of work of 8 processors: ~2% failed, ~1% canceled, 5,000 pending (a backlog
# of 1,000 eligible now), 20 running, the rest completed; every action has an order id.
FILL = """
INSERT INTO async_action (processor, status, data, related_id, priority, retries, attempts,
                          error, errors, result, next_eligible_at, created_at, started_at,
                          finished_at, claimed_by, lease_expires_at)
SELECT 'processor_' || (g %% 8),
       s.status,
       jsonb_build_object('order_id', g),
       'order:' || g,
       0, 3, CASE WHEN s.status = 'pending' THEN 0 ELSE 1 END,
       CASE WHEN s.status = 'failed' THEN 'TimeoutError: ERP did not answer' END,
       CASE WHEN s.status = 'failed' THEN jsonb_build_array(jsonb_build_object(
           'attempt', 1, 'at', now(), 'error', 'TimeoutError: ERP did not answer',
           'traceback', 'Traceback ...', 'worker', 'w1')) ELSE '[]'::jsonb END,
       CASE WHEN s.status = 'completed' THEN jsonb_build_object('ok', true) END,
       CASE WHEN g > %(rows)s - 1000 THEN now() - interval '10 minutes'
            WHEN s.status = 'pending' THEN now() + interval '1 hour' ELSE t.created END,
       t.created,
       CASE WHEN s.status NOT IN ('pending') THEN t.created + interval '1 second' END,
       CASE WHEN s.status IN ('completed', 'failed', 'canceled')
            THEN t.created + interval '2 seconds' END,
       CASE WHEN s.status = 'running' THEN 'w1' END,
       CASE WHEN s.status = 'running' THEN now() + interval '1 minute' END
FROM generate_series(1, %(rows)s) AS g,
     LATERAL (SELECT now() - interval '30 days' * (1 - g::float / %(rows)s) AS created) AS t,
     LATERAL (SELECT CASE WHEN g > %(rows)s - 5000 THEN 'pending'
                          WHEN g > %(rows)s - 5020 THEN 'running'
                          WHEN g %% 50 = 7 THEN 'failed'
                          WHEN g %% 100 = 3 THEN 'canceled'
                          ELSE 'completed' END AS status) AS s
"""


def pages(rows: int) -> list[str]:
    middle = rows // 2
    return [
        "/", "/?window=24h", "/partials/overview",
        "/actions", "/actions?status=failed", "/actions?processor=processor_3",
        "/actions?status=failed&processor=processor_3", f"/actions?related_id=order:{middle}",
        "/actions?processor=no_such_processor",  # worst case: no match, the whole table
        f"/actions?before={middle}", "/actions?since=1h",
        f"/actions/{middle}", "/actions/bulk?op=retry&status=failed&processor=processor_3",
        "/processors", "/workers", "/schedules",
        "/api/v1/actions", "/api/v1/actions?status=failed&limit=100",
        f"/api/v1/actions/{middle}", "/api/v1/stats?since=1h", "/api/v1/stats?since=24h",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--port", type=int, default=18080)
    args = parser.parse_args()
    with fresh_database(args.database_url, "web") as url:
        engine = make_engine(sqlalchemy_url(url))
        migrate.upgrade(engine)
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.exec_driver_sql(FILL, {"rows": args.rows})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE async_action")
        engine.dispose()
        print(f"filled {args.rows:,} actions in {time.perf_counter() - started:.0f}s",
              file=sys.stderr)
        env = {**os.environ, "ASYNCACTIONS_DATABASE_URL": sqlalchemy_url(url),
               "ASYNCACTIONS_WEB_TOKEN": TOKEN}
        server = subprocess.Popen([sys.executable, "-m", "asyncactions", "web", "--port",
                                   str(args.port)], env=env, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{args.port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{base}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
            with httpx.Client(base_url=base, timeout=60,
                              headers={"Authorization": f"Bearer {TOKEN}"}) as client:
                for page in pages(args.rows):
                    client.get(page).raise_for_status()  # warm-up: plans and caches
                    times = []
                    for _ in range(args.runs):
                        start = time.perf_counter()
                        client.get(page).raise_for_status()
                        times.append((time.perf_counter() - start) * 1000)
                    print(json.dumps({"page": page, "rows": args.rows,
                                      "median_ms": round(statistics.median(times), 1),
                                      "max_ms": round(max(times), 1)}), flush=True)
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
