"""Worker processes under measurement: real subprocesses started from the systems' own
command lines, held at a gate until all are ready, then stopped by pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from .pg import ROOT

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    """Progress for people: stderr, so stdout stays one JSON line per result."""
    print(message, file=sys.stderr, flush=True)


class WorkerFailed(RuntimeError):
    pass


class Workers:
    """`count` copies of `command`. With `gated`, each one announces itself and waits
    (see bench/noop.py) until `open_gate()`, so start-up is not timed."""

    def __init__(self, command: list[str], count: int = 1, *, env: dict[str, str] | None = None,
                 gated: bool = False) -> None:
        self.command = command
        self.count = count
        self.extra_env = env or {}
        self._dir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
        self.gate = self._dir / "gate" if gated else None
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Workers:
        self.start()
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def start(self, ready_timeout: float = 120.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.extra_env}
        if self.gate:
            env["BENCH_GATE"] = str(self.gate)
        for i in range(self.count):
            log = (self._dir / f"worker{i}.log").open("wb")
            self.procs.append(subprocess.Popen(self.command, cwd=ROOT, env=env,
                                               stdout=subprocess.DEVNULL, stderr=log))
        if self.gate:
            wait_until(lambda: len(list(self._dir.glob("gate.ready.*"))) >= self.count,
                       ready_timeout, 0.01, self, "workers to start")

    def open_gate(self) -> None:
        assert self.gate is not None
        self.gate.touch()

    def check_alive(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                raise WorkerFailed(f"worker {i} exited with {proc.returncode}: "
                                   f"{self.log_tail(i)}")

    def log_tail(self, i: int, lines: int = 5) -> str:
        text = (self._dir / f"worker{i}.log").read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def cpu_seconds(self) -> float:
        """User + system CPU time of the worker processes so far (Linux /proc)."""
        total = 0
        for proc in self.procs:
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / CLOCK_TICKS

    def memory_mb(self, field: str = "VmRSS") -> float:
        """Summed VmRSS (now) or VmHWM (peak) of the worker processes, in MB."""
        total_kb = 0
        for proc in self.procs:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith(field + ":"):
                        total_kb += int(line.split()[1])
            except OSError:
                continue
        return total_kb / 1024

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM each worker (graceful shutdown), SIGKILL what is left after `timeout`."""
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


def wait_until(done: Callable[[], bool], timeout: float, interval: float,
               workers: Workers | None = None, what: str = "the condition") -> float:
    """Poll `done` every `interval` seconds; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if done():
            return time.monotonic()
        if workers is not None:
            workers.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting {timeout:.0f}s for {what}")
        time.sleep(interval)


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine: workers, PostgreSQL and the harness."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_for_quiet(max_busy_pct: float, timeout: float) -> float:
    """Wait (up to `timeout` s) for a second in which the machine's CPUs were at most
    `max_busy_pct` busy: anything else running skews every figure. Returns the last
    busy % seen, to be reported beside the figures."""
    deadline = time.monotonic() + timeout
    while True:
        busy_0, total_0 = machine_cpu()
        time.sleep(1.0)
        busy_1, total_1 = machine_cpu()
        busy = 100 * (busy_1 - busy_0) / max(total_1 - total_0, 1)
        if busy <= max_busy_pct or time.monotonic() > deadline:
            return busy
