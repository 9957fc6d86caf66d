"""Run attempts on a pool of threads, with per-attempt timeouts.

A Python thread cannot be killed, so an attempt that outlives its timeout is
abandoned: it is recorded as timed out at once, its thread is replaced so the
worker keeps its full concurrency, and whatever the thread returns later is
dropped. Threads are daemons, so a hung processor never keeps the process alive.

No thread of the pool can die: the executor turns whatever a processor does into
outcomes, and anything that still escapes is logged and the thread goes on.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from .executor import Attempt, Done, Executor

log = logging.getLogger("asyncactions.runner")


class Runner:
    def __init__(self, size: int, executor: Executor, report: Callable[[Done], None]) -> None:
        self._size = size
        self._executor = executor
        self._report = report
        self._waiting: deque[Attempt] = deque()
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)  # for the pool's threads
        self._changed = threading.Condition(self._lock)  # for the watchdog and shutdown
        self._running: set[Attempt] = set()
        self._deadlines: list[tuple[float, int, Attempt]] = []
        self._seq = itertools.count()
        self._closed = False
        self._watchdog = threading.Thread(target=self._watch, name="asyncactions-watchdog",
                                          daemon=True)

    def start(self) -> None:
        for _ in range(self._size):
            self._spawn()
        self._watchdog.start()

    def submit(self, attempt: Attempt, first: bool = False) -> None:
        """Queue an attempt for the next free thread (`first`: ahead of the others)."""
        with self._lock:
            if first:
                self._waiting.appendleft(attempt)
            else:
                self._waiting.append(attempt)
            self._work_ready.notify()

    def busy(self) -> int:
        """Attempts running or waiting for a thread."""
        return len(self._waiting) + len(self._running)

    def _spawn(self) -> None:
        threading.Thread(target=self._work, name="asyncactions-run", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._work_ready.wait_for(lambda: self._waiting or self._closed)
                if self._closed:
                    return
                attempt = self._waiting.popleft()
                self._running.add(attempt)
                if attempt.timeout is not None:
                    deadline = time.monotonic() + attempt.timeout
                    heapq.heappush(self._deadlines, (deadline, next(self._seq), attempt))
                    self._changed.notify_all()
            try:
                done = self._executor.run(attempt)
            except BaseException as exc:  # the executor never raises; if it did, go on
                log.exception("running an attempt failed unexpectedly")
                done = Done(self._executor.failed(attempt, exc))
            with self._lock:
                abandoned = attempt.finished
                attempt.finished = True
                self._running.discard(attempt)
                self._changed.notify_all()
            if abandoned:
                return  # timed out meanwhile: a replacement thread took this one's place
            self._reported(done)

    def _reported(self, done: Done) -> None:
        try:
            self._report(done)
        except BaseException:
            log.exception("reporting an outcome failed")

    def _watch(self) -> None:
        while True:
            try:
                if self._watch_once():
                    return
            except BaseException:
                log.exception("the timeout watchdog failed; it goes on")
                time.sleep(0.1)

    def _watch_once(self) -> bool:
        """Abandon the attempts past their deadline; true once closed and idle."""
        while True:
            expired: list[Attempt] = []
            with self._lock:
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, _, attempt = heapq.heappop(self._deadlines)
                    if not attempt.finished:
                        attempt.finished = True
                        self._running.discard(attempt)
                        expired.append(attempt)
                if not expired:
                    if self._closed and not self._running:
                        return True
                    wait = self._deadlines[0][0] - now if self._deadlines else None
                    self._changed.wait(wait)
                    continue
                self._changed.notify_all()
            for attempt in expired:
                self._spawn()
                self._reported(Done(self._executor.timed_out(attempt)))

    # --- shutdown ---------------------------------------------------------------------

    def close(self) -> list[Attempt]:
        """Start no more attempts; return those that were submitted but never started."""
        with self._lock:
            self._closed = True
            unstarted = list(self._waiting)
            self._waiting.clear()
            self._work_ready.notify_all()
            self._changed.notify_all()
        return unstarted

    def wait_running(self, timeout: float) -> list[Attempt]:
        """Wait up to `timeout` for running attempts; abandon and return the ones left."""
        with self._changed:
            self._changed.wait_for(lambda: not self._running, timeout)
            left = list(self._running)
            for attempt in left:
                attempt.finished = True
            self._running.clear()
            self._changed.notify_all()
        return left
