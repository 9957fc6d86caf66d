"""Processors the benchmark workers run (`--import bench.noop`).

bench_noop does nothing, so S1 and the RSS check measure the queue, not the work.
The *_async processors are the same as `async def` (the asyncio scenarios), and
bench_sleep_async awaits asyncio.sleep(1): what threads cannot run 500 at a time.
bench_pickup appends "i monotonic-time" to $BENCH_PICKUP_FILE when it starts (S3);
CLOCK_MONOTONIC is system-wide on Linux, so the enqueuing process can compare.

With $BENCH_GATE set, importing this module (which the worker does before it
connects) announces readiness and waits for the gate file: worker processes pay
their Python start-up before the drain clock starts, not inside it.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from asyncactions import Action, processor


def _wait_for_gate(gate: str) -> None:
    Path(f"{gate}.ready.{os.getpid()}").touch()
    while not os.path.exists(gate):
        time.sleep(0.001)


if os.environ.get("BENCH_GATE"):
    _wait_for_gate(os.environ["BENCH_GATE"])

_pickup_fd: int | None = None
if os.environ.get("BENCH_PICKUP_FILE"):
    _pickup_fd = os.open(os.environ["BENCH_PICKUP_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)


@processor("bench_noop")
def bench_noop(action: Action) -> None:
    pass


@processor("bench_pickup")
def bench_pickup(action: Action) -> None:
    started = time.monotonic()
    if _pickup_fd is not None:
        # One write() on an O_APPEND file is atomic: no lock among the pool's threads.
        os.write(_pickup_fd, f"{action.data['i']} {started!r}\n".encode())


@processor("bench_noop_async")
async def bench_noop_async(action: Action) -> None:
    pass


@processor("bench_pickup_async")
async def bench_pickup_async(action: Action) -> None:
    bench_pickup(action)


@processor("bench_sleep_async")
async def bench_sleep_async(action: Action) -> None:
    await asyncio.sleep(1)
