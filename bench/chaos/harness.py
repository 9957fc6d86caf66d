"""What every chaos scenario stands on: a PostgreSQL cluster of its own (restarted,
reconfigured and killed at will without touching anyone else's), real worker processes,
and an execution ledger: one line per attempt started, written by the processor itself,
so an action that ran twice is seen even when it completed once.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[2]

# The processors every scenario runs. `chaos` notes its attempt in the ledger first
# (an O_APPEND write of one line is atomic), then works for a moment.
PROCESSORS = textwrap.dedent("""
    import os, time
    from datetime import timedelta
    from asyncactions import processor

    LEDGER = os.environ["CHAOS_LEDGER"]

    def note(action):
        fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{action.id} {action.attempts} {os.getpid()} {time.time()}\\n".encode())
        os.close(fd)

    @processor("chaos", retries=20, retry_interval=timedelta(0))
    def chaos(action):
        note(action)
        time.sleep(float(os.environ.get("CHAOS_WORK", "0.002")))

    @processor("storm", retries=100000, retry_interval=timedelta(0))
    def storm(action):
        raise RuntimeError("always fails")

    @processor("healthy", retries=20, retry_interval=timedelta(0))
    def healthy(action):
        note(action)

    @processor("tick", retries=20, retry_interval=timedelta(0))
    def tick(action):
        note(action)

    @processor("slow", retries=5, retry_interval=timedelta(0))
    def slow(action):
        note(action)
        time.sleep(action.data["seconds"])
        return {"pid": os.getpid()}

    @processor("book", transactional=True, retries=5, retry_interval=timedelta(0))
    def book(action, session):
        # Locks the account's row until the attempt commits; only the first attempt lingers.
        from sqlalchemy import text
        note(action)
        session.execute(text("UPDATE chaos_account SET bookings = bookings + 1"))
        time.sleep(action.data["seconds"] if action.attempts == 1 else 0)
        return {"pid": os.getpid()}
""")


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_until(condition: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g}s for {what}")
        time.sleep(interval)


def _as_postgres(command: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """initdb and pg_ctl refuse to run as root."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    return subprocess.run(command, check=True, capture_output=True, timeout=120, **kw)


def _bindir() -> Path:
    found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
    bindir = Path(found.stdout.strip() or "/usr/lib/postgresql/15/bin")
    if not (bindir / "initdb").exists():
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    return bindir


@dataclass
class Cluster:
    """A throwaway PostgreSQL server on a loopback port (and any extra address)."""

    base: Path
    port: int
    bindir: Path = field(default_factory=_bindir)

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    def url(self, host: str = "127.0.0.1") -> str:
        return f"postgresql+psycopg://postgres@{host}:{self.port}/postgres"

    def pg_ctl(self, *args: str) -> None:
        _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l",
                      str(self.base / "log"), "-w", *args])

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres",
                             autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else []

    def scalar(self, statement: str) -> Any:
        return self.sql(statement)[0][0]


@dataclass
class Host:
    """A test host of the suite's own: a network namespace joined to this machine by a
    veth pair, its link cut and restored at will. Traffic goes only over that pair."""

    name: str
    address: str  # the namespace's side
    gateway: str  # this machine's side: where the database listens for the host

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        subprocess.run(["ip", "link", "set", f"{self.name}h", "down"], check=True)

    def restore(self) -> None:
        subprocess.run(["ip", "link", "set", f"{self.name}h", "up"], check=True)


@contextmanager
def host() -> Iterator[Host]:
    tag = os.urandom(2).hex()
    name, net = f"aa{tag}", f"10.{200 + int(tag[0], 16) % 50}.{int(tag[1:], 16) % 250}"
    h = Host(name, f"{net}.2", f"{net}.1")

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", name)
    try:
        ip("link", "add", f"{name}h", "type", "veth", "peer", "name", f"{name}n")
        ip("link", "set", f"{name}n", "netns", name)
        ip("addr", "add", f"{h.gateway}/24", "dev", f"{name}h")
        ip("link", "set", f"{name}h", "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{h.address}/24", "dev", f"{name}n")
        ip("netns", "exec", name, "ip", "link", "set", f"{name}n", "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield h
    finally:
        with suppress(subprocess.CalledProcessError):
            ip("link", "del", f"{name}h")
        with suppress(subprocess.CalledProcessError):
            ip("netns", "del", name)


@contextmanager
def cluster(*settings: str, listen: str = "127.0.0.1") -> Iterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="asyncactions-chaos-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = Cluster(base, port)
    _as_postgres([str(c.bindir / "initdb"), "-D", str(c.datadir), "-U", "postgres",
                  "--auth=trust", "--no-sync"])
    with (c.datadir / "postgresql.conf").open("a") as conf:
        conf.write("\n".join([f"port = {port}", f"listen_addresses = '{listen}'",
                              f"unix_socket_directories = '{base}'", "logging_collector = off",
                              "fsync = on", *settings]) + "\n")
    if listen != "127.0.0.1":  # test hosts connect over their veth pairs
        with (c.datadir / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 10.0.0.0/8 trust\n")
    c.pg_ctl("start")
    try:
        yield c
    finally:
        with suppress(subprocess.CalledProcessError):
            c.pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


class Run:
    """One scenario's workspace: its config, processors, ledger and worker processes."""

    def __init__(self, url: str, *, lease: str = "3s", concurrency: int = 8,
                 extra_config: str = "", work: float = 0.002,
                 worker_url: str | None = None) -> None:
        self.url = url  # the harness's own (a superuser's: it always gets a connection)
        self.dir = Path(tempfile.mkdtemp(prefix="chaos-run-"))
        os.chmod(self.dir, 0o755)
        self.ledger = self.dir / "ledger"
        self.concurrency = concurrency
        (self.dir / "chaos_processors.py").write_text(PROCESSORS)
        (self.dir / "asyncactions.toml").write_text(textwrap.dedent(f"""
            imports = ["chaos_processors"]
            [worker]
            concurrency = {concurrency}
            poll_interval = "100ms"
            lease = "{lease}"
            shutdown_grace = "5s"
        """) + extra_config)
        self.env = {**os.environ, "ASYNCACTIONS_DATABASE_URL": worker_url or url,
                    "CHAOS_LEDGER": str(self.ledger), "CHAOS_WORK": str(work),
                    "PYTHONPATH": f"{self.dir}:{ROOT}"}
        self.workers: list[subprocess.Popen[bytes]] = []
        self.cli("--database-url", url, "db", "upgrade")

    def command(self, *args: str) -> list[str]:
        options = ["--config", str(self.dir / "asyncactions.toml")]
        if args[:1] == ("--database-url",):
            options, args = [*options, *args[:2]], args[2:]
        return [sys.executable, "-m", "asyncactions", *options, *args]

    def cli(self, *args: str) -> str:
        done = subprocess.run(self.command(*args), cwd=self.dir, env=self.env,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"asyncactions {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def start_worker(self, *args: str, prefix: list[str] | None = None,
                     url: str | None = None) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        env = self.env if url is None else {**self.env, "ASYNCACTIONS_DATABASE_URL": url}
        with (self.dir / f"worker{n}.log").open("wb") as out:
            proc = subprocess.Popen([*(prefix or []), *self.command("worker", *args)],
                                    cwd=self.dir, env=env, stdout=subprocess.DEVNULL,
                                    stderr=out)
        self.workers.append(proc)
        return proc

    def live_workers(self) -> list[subprocess.Popen[bytes]]:
        return [w for w in self.workers if w.poll() is None]

    def survivors(self, procs: list[subprocess.Popen[bytes]]) -> bool:
        """Whether all of `procs` still run; the log of each that does not."""
        for proc in procs:
            if proc.poll() is not None:
                i = self.workers.index(proc)
                text = (self.dir / f"worker{i}.log").read_text()
                log(f"worker {i} exited {proc.returncode}:\n{text[-3000:]}")
        return all(proc.poll() is None for proc in procs)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def stop_all(self) -> None:
        for proc in self.live_workers():
            proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def close(self) -> None:
        self.stop_all()
        shutil.rmtree(self.dir, ignore_errors=True)

    def enqueue(self, processor: str, n: int) -> None:
        from asyncactions import init_actions
        from asyncactions.database import make_engine

        engine = make_engine(self.url)
        try:
            for start in range(0, n, 5000):
                init_actions(engine, processor, [{"i": i} for i in
                                                 range(start, min(n, start + 5000))])
        finally:
            engine.dispose()

    def statuses(self) -> dict[str, int]:
        return dict(self.query("SELECT status, count(*) FROM async_action GROUP BY status"))

    def query(self, sql: str, params: Any = None, timeout: float = 60) -> list[Any]:
        """Rows of one query, retried while the server refuses or restarts."""
        def attempt() -> list[Any] | None:
            try:
                with psycopg.connect(self.url.replace("+psycopg", ""), autocommit=True,
                                     connect_timeout=5) as conn:
                    return [tuple(r) for r in conn.execute(sql, params).fetchall()] or [()]
            except psycopg.OperationalError:
                return None
        rows = wait_until(attempt, timeout, f"the database to answer {sql[:40]!r}")
        return [] if rows == [()] else rows

    def ledger_runs(self, processor_ids: set[int] | None = None) -> Counter[int]:
        lines = self.ledger.read_text().splitlines() if self.ledger.exists() else []
        runs = Counter(int(line.split()[0]) for line in lines)
        if processor_ids is not None:
            runs = Counter({k: v for k, v in runs.items() if k in processor_ids})
        return runs

    def drained(self, n: int, timeout: float) -> dict[str, int]:
        """Wait until every action is final; the statuses. With no worker left alive
        nothing will end: that fails at once, with their logs, not after the timeout."""
        def final() -> dict[str, int] | None:
            counts = self.statuses()
            done = sum(counts.get(s, 0) for s in ("completed", "failed", "canceled"))
            if done >= n:
                return counts
            if self.workers and not self.live_workers():
                self.survivors(self.workers)  # logs each one's exit and its log's tail
                raise RuntimeError(f"every worker exited with {n - done} actions not final")
            return None
        return wait_until(final, timeout, f"{n} actions to end")


def verdict(run: Run, n: int, in_flight_bound: int, **figures: Any) -> dict[str, Any]:
    """The checks every scenario ends with, as figures: every action final, none lost,
    none running, each ran at least once, and runs beyond one per action within what
    was in flight at the faults."""
    counts = run.statuses()
    runs = run.ledger_runs()
    extra = sum(c - 1 for c in runs.values())
    result = {
        "actions": n,
        "completed": counts.get("completed", 0),
        "lost": n - sum(counts.values()),
        "stuck_running": counts.get("running", 0),
        "not_final": counts.get("pending", 0) + counts.get("running", 0),
        "never_ran": n - len(runs),
        "extra_runs": extra,
        "extra_runs_bound": in_flight_bound,
        **figures,
    }
    result["ok"] = (result["completed"] == n and result["lost"] == 0
                    and result["not_final"] == 0 and result["never_ran"] == 0
                    and extra <= in_flight_bound)
    return result


def random_gap(low: float, high: float, rng: random.Random) -> float:
    return rng.uniform(low, high)
