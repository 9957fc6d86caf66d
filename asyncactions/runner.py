"""Run attempts within the worker's concurrency, with per-attempt timeouts.

`concurrency` is a number of slots, shared by both kinds of processor: a sync
attempt takes a thread (threads are started as needed and kept), an async one a
task on the worker's event loop, so hundreds of awaiting attempts cost no thread.

At its timeout an attempt is abandoned: recorded as timed out at once and its slot
freed. An async attempt's task is also cancelled (its `finally` blocks run). A Python
thread cannot be killed, so a sync attempt's thread runs on, whatever it returns
later is dropped, and another thread takes up the slot's work. Threads are daemons,
so a hung processor never keeps the process alive.

Nothing here can die of a processor: the executor turns whatever a processor does
into outcomes, and anything that still escapes is logged and the runner goes on.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from .eventloop import EventLoop
from .executor import Attempt, Done, Executor

log = logging.getLogger("asyncactions.runner")


class Runner:
    def __init__(self, size: int, executor: Executor, report: Callable[[Done], None], *,
                 loop: EventLoop | None = None) -> None:
        self._size = size
        self._executor = executor
        self._report = report
        self._loop = loop  # for async processors' attempts; None when there are none
        self._waiting: deque[Attempt] = deque()  # submitted, not started
        self._ready: deque[Attempt] = deque()  # started sync attempts, for a thread
        self._idle = 0  # threads waiting for a ready attempt
        self._waking = False  # a thread is woken (or started) for ready attempts
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)  # for the pool's threads
        self._changed = threading.Condition(self._lock)  # for the watchdog and shutdown
        self._running: set[Attempt] = set()
        self._for_loop: list[Attempt] = []  # started async attempts, for the loop
        self._loop_woken = False  # a call of _start_tasks is on its way
        self._deadlines: list[tuple[float, int, Attempt]] = []
        self._seq = itertools.count()
        self._closed = False
        self._watchdog = threading.Thread(target=self._watch, name="asyncactions-watchdog",
                                          daemon=True)

    def start(self) -> None:
        self._watchdog.start()

    def submit(self, *attempts: Attempt, first: bool = False) -> None:
        """Run these attempts once slots are free (all at once: the loop is woken once);
        `first`: ahead of those already waiting."""
        with self._lock:
            if first:
                self._waiting.extendleft(reversed(attempts))
            else:
                self._waiting.extend(attempts)
            started = self._start_waiting()
        self._to_loop(started)

    def busy(self) -> int:
        """Attempts running or waiting for a slot."""
        return len(self._waiting) + len(self._running)

    def running(self) -> list[Attempt]:
        """The attempts running now (to find one to cancel)."""
        with self._lock:
            return list(self._running)

    def cancel(self, attempt: Attempt) -> bool:
        """Cancel a running async attempt's task (its processor gets CancelledError, its
        `finally` blocks run); whatever it then returns is recorded as usual, and fenced
        out if the action no longer is this attempt's. False for a sync attempt, which
        cannot be stopped."""
        if self._loop is None or not self._executor.is_async(attempt):
            return False
        self._loop.call(_cancel_task, attempt)
        return True

    def _start_waiting(self, keep: int = 0) -> list[Attempt]:
        """(Holding the lock.) Start waiting attempts while slots are free: sync ones
        go to the threads, except the first `keep`, which the calling thread takes
        itself (waking another would cost a thread switch per attempt); returns the
        async ones, for the loop."""
        to_loop: list[Attempt] = []
        while self._waiting and len(self._running) < self._size and not self._closed:
            attempt = self._waiting.popleft()
            self._running.add(attempt)
            if attempt.timeout is not None:
                deadline = time.monotonic() + attempt.timeout
                heapq.heappush(self._deadlines, (deadline, next(self._seq), attempt))
                if self._deadlines[0][2] is attempt:  # the watchdog's next wake-up
                    self._changed.notify_all()
            if self._executor.is_async(attempt):
                to_loop.append(attempt)
                continue
            self._ready.append(attempt)
        if len(self._ready) > keep:
            self._wake_next()
        return to_loop

    def _wake_next(self) -> None:
        """(Holding the lock, with attempts ready.) Wake one thread, or start one if none
        is idle; it wakes the next if it leaves attempts ready. One at a time: a thread
        woken per attempt makes a herd that queues for the GIL, while a chain of wakes
        lets a thread whose attempt ends at once take the next ready ones itself, and
        still starts blocking attempts a thread each."""
        if self._waking:
            return
        if self._idle:
            self._work_ready.notify()
        else:  # if no thread can start, this raises and a later wake tries again
            threading.Thread(target=self._work, name="asyncactions-run", daemon=True).start()
        self._waking = True

    def _to_loop(self, attempts: list[Attempt]) -> None:
        """Hand started async attempts to the loop: one wake-up of the loop for all that
        are handed over before it gets to them."""
        if not attempts:
            return
        assert self._loop is not None, "an async attempt in a worker without a loop"
        with self._lock:
            self._for_loop += attempts
            if self._loop_woken:
                return
            self._loop_woken = True
        self._loop.call(self._start_tasks)

    def _ended(self, attempt: Attempt, done: Done, *, thread: bool = False,
               ) -> tuple[bool, Attempt | None]:
        """An attempt returned: free its slot, report it. Returns whether it had been
        abandoned and, for the `thread` that ran it to its end, its next attempt."""
        with self._lock:
            abandoned = attempt.finished
            attempt.finished = True
            self._running.discard(attempt)
            takes = thread and not abandoned
            started = self._start_waiting(keep=int(takes))
            after = self._ready.popleft() if takes and self._ready else None
            if self._closed:  # shutdown waits for the running ones
                self._changed.notify_all()
        self._to_loop(started)
        if not abandoned:
            self._reported(done)
        return abandoned, after

    # --- sync attempts: threads -----------------------------------------------------------

    def _work(self) -> None:
        attempt = self._next_ready(woken=True)
        while attempt is not None:
            try:
                done = self._executor.run(attempt)
            except BaseException as exc:  # the executor never raises; if it did, go on
                log.exception("running an attempt failed unexpectedly")
                done = Done(self._executor.failed(attempt, exc))
            abandoned, attempt = self._ended(attempt, done, thread=True)
            if abandoned:
                return  # timed out meanwhile: another thread took up this one's work
            if attempt is None:
                attempt = self._next_ready()

    def _next_ready(self, woken: bool = False) -> Attempt | None:
        with self._lock:
            while True:
                if woken:
                    self._waking = False
                if self._ready or self._closed:
                    break
                self._idle += 1
                self._work_ready.wait()
                self._idle -= 1
                woken = True
            attempt = self._ready.popleft() if self._ready else None
            if self._ready:
                self._wake_next()
            return attempt

    # --- async attempts: tasks on the loop --------------------------------------------

    def _start_tasks(self) -> None:
        assert self._loop is not None
        with self._lock:
            attempts, self._for_loop = self._for_loop, []
            self._loop_woken = False
        for attempt in attempts:
            if not attempt.finished:  # not abandoned before it could start
                attempt.task = self._loop.spawn(self._run_async(attempt), _Label(attempt))

    async def _run_async(self, attempt: Attempt) -> None:
        try:
            done = await self._executor.run_async(attempt)
        except BaseException as exc:  # cancelled before the executor began
            done = Done(self._executor.failed(attempt, exc))
        self._ended(attempt, done)

    def _reported(self, done: Done) -> None:
        try:
            self._report(done)
        except BaseException:
            log.exception("reporting an outcome failed")

    # --- timeouts -------------------------------------------------------------------------

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
                started = self._start_waiting()
                self._changed.notify_all()
            self._to_loop(started)
            for attempt in expired:
                self.cancel(attempt)
                self._reported(Done(self._executor.timed_out(attempt)))

    # --- shutdown -------------------------------------------------------------------------

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
        """Wait up to `timeout` for running attempts; abandon and return the ones left
        (async ones are cancelled)."""
        with self._changed:
            self._changed.wait_for(lambda: not self._running, timeout)
            left = list(self._running)
            for attempt in left:
                attempt.finished = True
            self._running.clear()
            self._changed.notify_all()
        for attempt in left:
            self.cancel(attempt)
        return left


def _cancel_task(attempt: Attempt) -> None:
    if attempt.task is not None:
        attempt.task.cancel()


class _Label:
    """What a task runs, for stall warnings."""

    __slots__ = ("attempt",)

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt

    def __str__(self) -> str:
        actions = self.attempt.actions
        ids = ", ".join(a.display_id for a in actions[:3])
        return f"processor {self.attempt.processor!r} ({ids}{', …' if len(actions) > 3 else ''})"
