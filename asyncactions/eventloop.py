"""The worker's event loop for `async def` processors: one thread running one loop.

Async attempts run there as tasks, concurrently, however many the worker's
`concurrency` allows: awaiting costs no thread. A processor that blocks (a sync HTTP
call, time.sleep) stalls every other async attempt, so a watchdog thread warns when
the loop has not turned for STALL_WARNING seconds, naming the task that holds it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("asyncactions.eventloop")

STALL_WARNING = 0.5  # seconds without a turn of the loop
_BEAT = 0.05  # how often the loop shows it turns


class EventLoop:
    def __init__(self, *, stall_warning: float = STALL_WARNING) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="asyncactions-loop",
                                        daemon=True)
        self._stall_warning = stall_warning
        self._tasks: dict[asyncio.Task[Any], object] = {}  # running tasks, what they run
        self._beat = time.monotonic()
        self._closed = threading.Event()

    def start(self) -> None:
        self._beat = time.monotonic()  # not since __init__: the worker's start-up is no stall
        self._thread.start()
        threading.Thread(target=self._watch, name="asyncactions-loop-watchdog",
                         daemon=True).start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._turned)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def call(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn(*args)` on the loop soon; safe from any thread (from the loop's own,
        without waking it through its pipe)."""
        if threading.get_ident() == self._thread.ident:
            self._loop.call_soon(fn, *args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def spawn(self, coro: Coroutine[Any, Any, None], label: object) -> asyncio.Task[None]:
        """A task for `coro` (on the loop's thread); str(label) names it in stall
        warnings (made only then: it costs more than the task)."""
        task = self._loop.create_task(self._tracked(coro))
        self._tasks[task] = label  # also the strong reference asyncio does not keep
        return task

    async def _tracked(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        finally:  # not a done callback: that would cost the loop one more turn per task
            self._tasks.pop(asyncio.current_task(), None)  # type: ignore[arg-type]

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        """Run `coro` on the loop and wait for its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self, timeout: float = 2.0, *,
              cleanup: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        """Cancel what still runs (at shutdown: attempts already recorded as interrupted),
        give it `timeout` seconds to finish, await `cleanup()` (disposing of an engine),
        stop the loop. A loop held by a blocking call is left behind (a daemon thread)."""
        if self._thread.ident is None:  # never started
            self._loop.close()
            return
        if not self._thread.is_alive():
            return
        try:
            self.run(self._cancel_all(timeout, cleanup), timeout + 10)
        except Exception as exc:
            log.warning("the event loop did not stop cleanly (%s); leaving it",
                        type(exc).__name__)
        self._closed.set()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    async def _cancel_all(self, timeout: float,
                          cleanup: Callable[[], Coroutine[Any, Any, None]] | None) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        if cleanup is not None:
            await cleanup()

    # --- stalls -----------------------------------------------------------------------

    def _turned(self) -> None:
        self._beat = time.monotonic()
        self._loop.call_later(_BEAT, self._turned)

    def _watch(self) -> None:
        warned_for = None
        while not self._closed.wait(_BEAT):
            stalled = time.monotonic() - self._beat
            if stalled < self._stall_warning:
                warned_for = None
                continue
            beat = self._beat
            if warned_for == beat:  # once per stall
                continue
            warned_for = beat
            task = asyncio.current_task(self._loop)
            label = self._tasks.get(task) if task is not None else None  # type: ignore[arg-type]
            log.warning("the event loop of async processors has been blocked for %.1fs by %s: "
                        "a blocking call in an async def processor stalls every async attempt "
                        "of this worker; await an asyncio library instead, or run the call "
                        "with `await asyncio.to_thread(...)`", stalled,
                        "a task" if label is None else str(label))
