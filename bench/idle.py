"""The idle cluster: how many statements per second N idle workers send.

    python -m bench.idle [--workers 1,8] [--seconds 60]

For each N, a fresh database, N worker processes (product defaults: listening, 60 s
lease) and nothing to do. The server logs every statement of that database only
(`ALTER DATABASE … SET log_statement = 'all'`; the server's own settings are not
changed) and the statements logged during the window are counted and sorted by kind.
An idle cluster should cost the heartbeats plus one worker's maintenance (the leader's),
not N workers' maintenance. One JSON line per N on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import pg
from bench.procs import log

ROOT = Path(__file__).resolve().parent.parent
SERVER_LOG = Path("/var/log/postgresql")
# What each logged statement is, by its first words (psycopg names its prepared ones).
KINDS = [  # the first that matches
    ("pool ping", re.compile(r"^;$")),
    ("begin/commit", re.compile(r"^(BEGIN|COMMIT|ROLLBACK|SET |LISTEN )")),
    ("heartbeat", re.compile(r"^(UPDATE|INSERT INTO) async_action_worker")),
    ("rescue", re.compile(r"async_action_worker|lease_expires_at <")),
    ("wake", re.compile(r"pg_notify")),
    ("schedules", re.compile(r"async_action_schedule")),
    ("prune", re.compile(r"^DELETE FROM async_action\b")),
    ("claim", re.compile(r"FOR UPDATE SKIP LOCKED")),
]


def server_log() -> Path:
    logs = sorted(SERVER_LOG.glob("postgresql-*-main.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        raise SystemExit(f"no server log under {SERVER_LOG}: run this on the database host")
    return logs[-1]


def statements(text: str, dbname: str) -> list[str]:
    """The statements the server logged for one database, each with its continuation."""
    found: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if re.match(r"\d{4}-\d\d-\d\d ", line):
            if current is not None:
                found.append(" ".join(current))
            current = None
            match = re.search(rf"@{re.escape(dbname)} LOG:  (?:statement|execute [^:]*): (.*)",
                              line)
            if match:
                current = [match[1]]
        elif current is not None:
            current.append(line.strip())
    if current is not None:
        found.append(" ".join(current))
    return found


def kind(statement: str) -> str:
    return next((name for name, pattern in KINDS if pattern.search(statement)), "other")


def measure(admin_url: str, workers: int, seconds: float, settle: float) -> dict[str, object]:
    with pg.fresh_database(admin_url, "idle") as url:
        dbname = url.rsplit("/", 1)[1]
        env = {**os.environ, "ASYNCACTIONS_DATABASE_URL": pg.sqlalchemy_url(url)}
        command = [sys.executable, "-m", "asyncactions", "--config",
                   str(ROOT / "bench" / "asyncactions.toml")]
        subprocess.run([*command, "db", "upgrade"], env=env, check=True, cwd=ROOT,
                       capture_output=True)
        with pg.connect(admin_url) as conn:
            conn.execute(f'ALTER DATABASE "{dbname}" SET log_statement = \'all\'')
        procs = [subprocess.Popen([*command, "worker", "--processors", "bench_noop"], env=env,
                                  cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for _ in range(workers)]
        try:
            deadline = time.monotonic() + 60
            while pg.scalar(url, "SELECT count(*) FROM async_action_worker") < workers:
                if time.monotonic() > deadline:
                    raise SystemExit("the workers did not register within 60 s")
                time.sleep(0.1)
            time.sleep(settle)  # start-up work (recovery, first schedules) is not idle work
            path = server_log()
            start = path.stat().st_size
            time.sleep(seconds)  # the measurement window itself: nothing to wait for
            with path.open("rb") as f:
                f.seek(start)
                text = f.read().decode("utf-8", "replace")
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(60)
        logged = statements(text, dbname)
        kinds = Counter(kind(s) for s in logged)
        return {"scenario": "idle_cluster", "workers": workers, "seconds": seconds,
                "statements_per_s": round(len(logged) / seconds, 2),
                "by_kind_per_s": {k: round(v / seconds, 2) for k, v in kinds.most_common()},
                "postgres": pg.server_settings(admin_url), "machine": pg.machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--workers", default="1,8")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=5.0)
    args = parser.parse_args()
    for n in (int(w) for w in args.workers.split(",")):
        log(f"idle cluster: {n} workers, {args.seconds:.0f} s")
        print(json.dumps(measure(args.database_url, n, args.seconds, args.settle)), flush=True)


if __name__ == "__main__":
    main()
