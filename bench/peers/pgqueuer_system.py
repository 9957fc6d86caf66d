"""pgqueuer as a System for bench/run.py. It runs in a venv of its own
(bench/.venv-pgqueuer), created on first use; its side of each scenario lives in
pgqueuer_peer.py and talks to the harness in JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from ..pg import ROOT, libpq_url
from ..procs import log
from ..systems import Kind

VENV = ROOT / "bench" / ".venv-pgqueuer"
PYTHON = VENV / "bin" / "python"
REQUIREMENTS = ROOT / "bench" / "peers" / "requirements-pgqueuer.txt"
PEER = ROOT / "bench" / "peers" / "pgqueuer_peer.py"
VERSION = "1.6.0"
BATCH_SIZE = 10  # pgqueuer.run(batch_size=…), its default
# "Tuned": the settings pgqueuer's docs suggest for throughput (issue 17), on uvloop
# (which the peer always uses when installed, as pgqueuer's own CLI does).
TUNED_BATCH_SIZE, TUNED_MAX_CONCURRENT_TASKS = 50, 100


class PeerFailed(RuntimeError):
    pass


def _run(args: list[str], timeout: float = 600.0, **kwargs: Any) -> str:
    try:
        out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             **kwargs)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerFailed(f"{' '.join(args[:3])}…: {exc}") from None
    if out.returncode != 0:
        tail = " | ".join(out.stderr.strip().splitlines()[-5:])
        raise PeerFailed(f"{' '.join(args[:4])}… exited {out.returncode}: {tail}")
    return out.stdout


class PgQueuer:
    """`managers` QueueManagers per worker process: 1 is what `pgq run` runs. `tuned`:
    batch_size 50 and max_concurrent_tasks 100 instead of pgqueuer.run's defaults (10,
    unlimited)."""

    name = "pgqueuer"
    queue_table = "pgqueuer"
    busy_sql = "SELECT EXISTS (SELECT 1 FROM pgqueuer)"  # finished jobs move to pgqueuer_log
    last_finish_sql = ("SELECT extract(epoch FROM max(created)) FROM pgqueuer_log "
                       "WHERE status = 'successful'")
    drain_sql: dict[str, str] = {}
    entrypoints: dict[Kind, str] = {"noop": "noop", "pickup": "pickup"}

    def __init__(self, managers: int = 1, tuned: bool = False) -> None:
        self.managers = managers
        self.batch_size = TUNED_BATCH_SIZE if tuned else BATCH_SIZE
        self.max_concurrent_tasks = TUNED_MAX_CONCURRENT_TASKS if tuned else None
        if managers != 1:
            self.name = f"pgqueuer-{managers}qm"
        if tuned:
            self.name += "-tuned"

    def describe(self) -> dict[str, Any]:
        return {"version": VERSION, "driver": "asyncpg (+uvloop)",
                "worker": {"command": "pgqueuer.run(factory)", "batch_size": self.batch_size,
                           "max_concurrent_tasks": self.max_concurrent_tasks,
                           "queue_managers_per_process": self.managers},
                "enqueue": "Queries.enqueue (lists for the bulk insert)"}

    def prepare(self) -> None:
        """Create bench/.venv-pgqueuer and install the pinned peer, once."""
        if not PYTHON.exists():
            _run([sys.executable, "-m", "venv", str(VENV)])
        try:
            installed = _run([str(PYTHON), "-c", "import importlib.metadata as m; "
                              "print(m.version('pgqueuer'))"]).strip()
        except PeerFailed:
            installed = ""
        if installed != VERSION:
            log(f"installing pgqueuer {VERSION} into {VENV.relative_to(ROOT)}")
            _run([str(PYTHON), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)])

    def install(self, url: str) -> None:
        _run([str(PYTHON), "-m", "pgqueuer", "--pg-dsn", libpq_url(url), "install"])

    def _peer(self, *args: str) -> dict[str, Any]:
        out = _run([str(PYTHON), str(PEER), *args])
        return json.loads(out.strip().splitlines()[-1])

    def bulk_enqueue(self, url: str, n: int) -> float:
        return float(self._peer("enqueue", "--dsn", libpq_url(url), "--n", str(n))["seconds"])

    def worker_command(self, url: str, kind: Kind) -> tuple[list[str], dict[str, str]]:
        return ([str(PYTHON), str(PEER), "worker", "--dsn", libpq_url(url),
                 "--batch-size", str(self.batch_size), "--managers", str(self.managers),
                 *(["--max-concurrent-tasks", str(self.max_concurrent_tasks)]
                   if self.max_concurrent_tasks else [])], {})

    def s2(self, url: str, blocks: int, per_block: int) -> dict[str, float]:
        return self._peer("s2", "--dsn", libpq_url(url), "--blocks", str(blocks),
                          "--per-block", str(per_block))

    def s2_kept(self, url: str, blocks: int, per_block: int) -> dict[str, float]:
        """pgqueuer's S2 is already on one asyncpg connection kept for the whole run,
        conn.transaction() per transaction."""
        return self.s2(url, blocks, per_block)

    def enqueue_paced(self, url: str, ids: Sequence[int], gap: float) -> list[float]:
        return self._peer("paced", "--dsn", libpq_url(url), f"--ids={','.join(map(str, ids))}",
                          "--gap", str(gap))["befores"]
