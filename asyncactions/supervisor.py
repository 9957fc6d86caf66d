"""`worker --processes N`: N worker processes under one supervisor.

Python runs one processor at a time per process (the GIL); several processes use
several cores. The supervisor restarts a child that dies (with backoff, so a crash
loop does not spin), passes SIGTERM/SIGINT on so every child shuts down gracefully
(a second signal stops them at once), and in burst mode exits once every child has
drained and exited.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("asyncactions.supervisor")

MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # a child that ran this long starts its backoff afresh


class Supervisor:
    def __init__(self, commands: Sequence[Sequence[str]], burst: bool) -> None:
        self._commands = [list(c) for c in commands]  # one per child
        self._burst = burst
        self._signals: list[int] = []  # received, not yet passed on

    def run(self) -> int:
        """Returns 0 when every child stopped cleanly, else the first non-zero status."""
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        children = {i: self._spawn(i) for i in range(len(self._commands))}
        started = {i: time.monotonic() for i in children}
        failures = dict.fromkeys(children, 0)
        restart_at: dict[int, float] = {}
        stopping, status = False, 0
        try:
            while children or (restart_at and not stopping):
                while self._signals:
                    signum = self._signals.pop(0)
                    stopping = True
                    restart_at.clear()
                    for child in children.values():
                        child.send_signal(signum)
                for i, child in list(children.items()):
                    code = child.poll()
                    if code is None:
                        continue
                    del children[i]
                    if stopping or (self._burst and code == 0):
                        status = status or code
                        continue
                    if time.monotonic() - started[i] > STABLE_AFTER:
                        failures[i] = 0
                    failures[i] += 1
                    wait = min(2.0 ** (failures[i] - 1), MAX_BACKOFF)
                    log.error("worker process %d (pid %d) exited with status %d; restarting "
                              "it in %gs", i, child.pid, code, wait)
                    restart_at[i] = time.monotonic() + wait
                for i, when in list(restart_at.items()):
                    if time.monotonic() >= when:
                        del restart_at[i]
                        children[i], started[i] = self._spawn(i), time.monotonic()
                time.sleep(0.05)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return status

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(self._commands[index])
        log.info("started worker process %d (pid %d)", index, child.pid)
        return child

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)
