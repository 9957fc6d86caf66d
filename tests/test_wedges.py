"""SPEC §9: nothing a processor does, and nothing the table holds, wedges the worker.

Each wedge runs in a real worker process: its action ends in a named state with its
reason, and the same worker then runs 100 more actions with every concurrency slot
busy at once (the processors meet at a barrier, so they measure it themselves); every
worker started afterwards starts. Also: the processor's retry policy reaches actions
enqueued by a program that never imported it.
"""

from __future__ import annotations

import signal
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from asyncactions import Status, admin, init_action, init_actions

from .conftest import Db, start_worker, wait_until, worker_log

CONCURRENCY = 4

WEDGES = textwrap.dedent(f"""
    import threading
    from datetime import timedelta
    from asyncactions import Defer, processor

    class Shouting(Exception):
        def __str__(self):
            raise RuntimeError("no message for you")

    class Custom(BaseException):
        pass

    def deep(n):
        value = []
        for _ in range(n):
            value = [value]
        return value

    RAISE = {{"SystemExit": SystemExit(3), "KeyboardInterrupt": KeyboardInterrupt(),
             "GeneratorExit": GeneratorExit(), "Custom": Custom("boom"),
             "Shouting": Shouting()}}

    @processor("wedge", retries=0)
    def wedge(action):
        kind = action.data["kind"]
        if kind in RAISE:
            raise RAISE[kind]
        if kind == "deep_result":
            return deep(100_000)
        if kind == "huge_result":
            return "x" * 1_000_000
        if kind == "defer_forever":
            raise Defer(timedelta.max)
        return "fine"

    barrier = threading.Barrier({CONCURRENCY}, timeout=60)
    lock = threading.Lock()
    running = [0, 0]  # now, most at once

    @processor("busy")
    def busy(action):
        with lock:
            running[0] += 1
            running[1] = max(running)
        try:
            barrier.wait()  # breaks (and fails the action) unless all slots are busy
        finally:
            with lock:
                running[0] -= 1
        return {{"most_at_once": running[1]}}

    @processor("report", retries=0)
    def report(action):
        raise RuntimeError("report failed")

    @processor("configured", retries=0)
    def configured(action):
        raise RuntimeError("configured failed")
""")

# kind -> (status, what the error must say)
EXPECTED = {
    "SystemExit": (Status.FAILED, "SystemExit: 3"),
    "KeyboardInterrupt": (Status.FAILED, "KeyboardInterrupt"),
    "GeneratorExit": (Status.FAILED, "GeneratorExit"),
    "Custom": (Status.FAILED, "Custom: boom"),
    "Shouting": (Status.FAILED, "Shouting: (its message cannot be read: RuntimeError)"),
    "deep_result": (Status.FAILED, "result: nested too deeply"),
    "huge_result": (Status.FAILED, "result is 1000002 bytes encoded, over the limit"),
    "defer_forever": (Status.FAILED, "is outside 0s..3650d"),
}


def setup(tmp_path: Path) -> Path:
    (tmp_path / "wedges.py").write_text(WEDGES)
    (tmp_path / "asyncactions.toml").write_text(textwrap.dedent(f"""
        imports = ["wedges"]
        [worker]
        concurrency = {CONCURRENCY}
        poll_interval = "50ms"
        lease = "3s"
        [processors.configured]
        retries = 5
    """))
    return tmp_path


def final(db: Db, action_id: int) -> admin.Action:
    wait_until(lambda: admin.get_action(db.engine, action_id).status.is_final,
               what=f"action {action_id} to end")
    return admin.get_action(db.engine, action_id)


def runs_100_with_every_slot_busy(db: Db) -> None:
    actions = init_actions(db.engine, "busy", [{}] * 100)
    done = [final(db, a.id) for a in actions]
    assert {a.status for a in done} == {Status.COMPLETED}, done[0].error
    assert max(a.result["most_at_once"] for a in done) == CONCURRENCY


def test_nothing_a_processor_raises_or_returns_wedges_the_worker(db: Db, tmp_path: Path) -> None:
    setup(tmp_path)
    worker = start_worker(tmp_path, db.url)
    wedges = {kind: init_action(db.engine, "wedge", {"kind": kind}) for kind in EXPECTED}
    # An outcome the database refuses travels with good ones: only it is affected.
    fine = init_actions(db.engine, "wedge", [{"kind": "fine"}] * 20)
    for kind, (status, says) in EXPECTED.items():
        ended = final(db, wedges[kind].id)
        assert ended.status == status, (kind, ended)
        assert says in ended.error, (kind, ended.error)
    assert {final(db, a.id).status for a in fine} == {Status.COMPLETED}
    runs_100_with_every_slot_busy(db)
    assert worker.poll() is None, worker_log(worker)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker_log(worker)
    assert "Traceback" not in worker_log(worker).split("stopping gracefully")[-1]


def test_rows_that_do_not_decode_fail_alone_and_every_later_worker_starts(
        db: Db, tmp_path: Path) -> None:
    setup(tmp_path)
    poison = init_action(db.engine, "wedge", {"kind": "fine"})
    lost = init_action(db.engine, "wedge", {"kind": "fine"})
    nested = "[" * 990 + "]" * 990  # init_action refuses this; an older writer did not
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE async_action SET data = :d WHERE id = :id"),
                     {"d": nested, "id": poison.id})
        # A running row of a dead worker, its lease long gone, errors not a list.
        conn.execute(text("UPDATE async_action SET status = 'running', attempts = 1, "
                          "claimed_by = 'elsewhere:1:0-gone', errors = '5', data = :d, "
                          "lease_expires_at = :t WHERE id = :id"),
                     {"d": '{"$decimal": "not a number"}', "id": lost.id,
                      "t": datetime.now(UTC) - timedelta(hours=1)})
    for _ in range(2):  # a second worker, after the first, starts too
        worker = start_worker(tmp_path, db.url)
        undecodable, rescued = final(db, poison.id), final(db, lost.id)
        assert undecodable.status == Status.FAILED
        assert "the stored data cannot be decoded" in undecodable.error, undecodable.error
        # Recovered at start-up although it does not decode (no retries: failed).
        assert rescued.status == Status.FAILED
        assert rescued.error.startswith("WorkerLost: worker elsewhere:1:0-gone was lost")
        runs_100_with_every_slot_busy(db)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker_log(worker)


@pytest.mark.parametrize(("processor", "retries_left"), [("report", 0), ("configured", 4)])
def test_the_processors_retry_policy_reaches_actions_enqueued_without_it(
        db: Db, tmp_path: Path, processor: str, retries_left: int) -> None:
    """This test process never imports the processors: like a web app that enqueues."""
    setup(tmp_path)
    action = init_action(db.engine, processor, {})
    assert admin.get_action(db.engine, action.id).retries is None  # the processor's
    worker = start_worker(tmp_path, db.url)
    wait_until(lambda: admin.get_action(db.engine, action.id).attempts >= 1 and
               admin.get_action(db.engine, action.id).status != Status.RUNNING)
    after = admin.get_action(db.engine, action.id)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker_log(worker)
    expected = Status.FAILED if retries_left == 0 else Status.PENDING
    assert (after.status, after.retries) == (expected, retries_left)
