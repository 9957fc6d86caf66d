"""SPEC §3 and §5 processor features: batches, transactional processors, hooks,
backoff, malformed data and metrics."""

from __future__ import annotations

import signal
import socket
import textwrap
import threading
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from asyncactions import (
    Defer,
    PermanentFailure,
    Status,
    Worker,
    admin,
    init_action,
    init_actions,
    processor,
    report_exceptions,
)
from asyncactions.outcomes import retry_delay
from asyncactions.processors import ProcessorSettings

from .conftest import Db, drain, processor_of, start_worker, wait_until, worker_config, worker_log


def statuses(db: Db) -> dict[str, int]:
    return dict(db.rows("SELECT status, count(*) FROM async_action GROUP BY status"))


# --- batches ------------------------------------------------------------------------

def test_batch_processor_gets_lists_and_per_action_outcomes(db: Db, kind: str) -> None:
    calls: list[list[int]] = []

    @processor_of(kind, "sync_invoices", batch_size=10, retries=0)
    def sync_invoices(actions):
        calls.append([a.data for a in actions])
        outcomes = {}
        for a in actions:
            if a.data == 3:
                outcomes[a.id] = PermanentFailure("invoice 3 is void")
            elif a.data == 4:
                outcomes[a.id] = RuntimeError("upstream 503")
            elif a.data == 5 and a.attempts == 1:
                outcomes[a.id] = Defer(timedelta(0))
            elif a.data % 2 == 0:
                outcomes[a.id] = {"synced": a.data}
        return outcomes  # odd ones are left out: completed with no result

    actions = init_actions(db.engine, "sync_invoices", list(range(25)))
    drain(db)
    assert all(1 <= len(c) <= 10 for c in calls)
    assert sorted(n for c in calls for n in c) == sorted([*range(25), 5])  # 5 ran twice
    by_data = {a.data: admin.get_action(db.engine, a.id) for a in actions}
    assert by_data[2].result == {"synced": 2} and by_data[2].status == Status.COMPLETED
    assert by_data[7].result is None and by_data[7].status == Status.COMPLETED
    assert by_data[3].error == "PermanentFailure: invoice 3 is void"
    assert (by_data[4].status, by_data[4].error) == (Status.FAILED, "RuntimeError: upstream 503")
    assert (by_data[5].status, by_data[5].attempts, by_data[5].retries) == (
        Status.COMPLETED, 2, 0)


def test_a_raising_batch_applies_the_outcome_to_every_action(db: Db, kind: str) -> None:
    @processor_of(kind, "all_or_nothing", batch_size=5, retries=1,
                  retry_interval=timedelta(hours=1))
    def all_or_nothing(actions):
        raise ConnectionError("bulk API down")

    init_actions(db.engine, "all_or_nothing", list(range(5)))
    drain(db)
    assert db.rows("SELECT DISTINCT status, retries, error FROM async_action") == [
        ("pending", 0, "ConnectionError: bulk API down")]


def test_batch_timeout_applies_to_the_whole_batch(db: Db) -> None:
    release = threading.Event()

    @processor("slow_batch", batch_size=3, retries=0, timeout=timedelta(milliseconds=300))
    def slow_batch(actions):
        release.wait(30)

    init_actions(db.engine, "slow_batch", [1, 2, 3])
    try:
        drain(db)
    finally:
        release.set()
    errors = {e for (e,) in db.rows("SELECT error FROM async_action")}
    assert errors == {"TimeoutError: attempt timed out after 300ms (the processor's timeout) "
                      "and was abandoned"}


# --- transactional processors --------------------------------------------------------

def test_transactional_writes_commit_with_the_completion(ledger: Db) -> None:
    @processor("book", transactional=True, retries=2, retry_interval=timedelta(0))
    def book(action, session):
        session.execute(text("INSERT INTO ledger VALUES (:a, :n)"),
                        {"a": action.id, "n": action.attempts})
        if action.attempts < 3:
            raise RuntimeError("booking failed after writing")
        return "booked"

    action = init_action(ledger.engine, "book", {})
    drain(ledger)
    done = admin.get_action(ledger.engine, action.id)
    assert (done.status, done.result, done.attempts) == (Status.COMPLETED, "booked", 3)
    assert [e["error"] for e in done.errors] == ["RuntimeError: booking failed after writing"] * 2
    # The failed attempts' writes rolled back; the successful one's committed.
    assert ledger.rows("SELECT action_id, attempt FROM ledger") == [(action.id, 3)]


def test_transactional_writes_roll_back_when_the_claim_was_lost(ledger: Db) -> None:
    entered, release = threading.Event(), threading.Event()

    @processor("book_slowly", transactional=True)
    def book_slowly(action, session):
        session.execute(text("INSERT INTO ledger VALUES (:a, 1)"), {"a": action.id})
        entered.set()
        release.wait(30)

    action = init_action(ledger.engine, "book_slowly", {})
    worker = Worker(config=worker_config(ledger))
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    thread.start()
    assert entered.wait(30)
    if ledger.name == "sqlite":  # SQLite's one writer is busy with the processor's write
        release.set()
        thread.join(30)
        pytest.skip("SQLite: a cancel waits for the processor's write, so it cannot land "
                    "mid-attempt")
    admin.cancel(ledger.engine, action.id)
    release.set()
    thread.join(30)
    assert admin.get_action(ledger.engine, action.id).status == Status.CANCELED
    assert ledger.scalar("SELECT count(*) FROM ledger") == 0


TRANSACTIONAL = textwrap.dedent("""
    import time
    from datetime import timedelta
    from pathlib import Path
    from sqlalchemy import text
    from asyncactions import processor

    @processor("book", transactional=True, retry_interval=timedelta(0))
    def book(action, session):
        session.execute(text("INSERT INTO ledger VALUES (:a, :n)"),
                        {"a": action.id, "n": action.attempts})
        session.flush()
        (Path(__file__).parent / "inside").touch()
        time.sleep(HANG)
""")


def test_kill_9_mid_transaction_leaves_no_partial_writes(ledger: Db, tmp_path: Path) -> None:
    (tmp_path / "booking.py").write_text(TRANSACTIONAL.replace("HANG", "60"))
    action = init_action(ledger.engine, "book", {}, retries=1)
    worker = start_worker(tmp_path, ledger.url, "--import", "booking")
    wait_until(lambda: (tmp_path / "inside").exists(), what="the write inside the attempt")
    worker.kill()
    worker.wait()
    assert ledger.scalar("SELECT count(*) FROM ledger") == 0
    (tmp_path / "booking.py").write_text(TRANSACTIONAL.replace("HANG", "0"))
    again = start_worker(tmp_path, ledger.url, "--import", "booking")
    wait_until(lambda: admin.get_action(ledger.engine, action.id).status == Status.COMPLETED,
               what="the rerun")
    again.send_signal(signal.SIGTERM)
    assert again.wait(30) == 0, worker_log(again)
    assert ledger.rows("SELECT action_id, attempt FROM ledger") == [(action.id, 2)]


# --- hooks and backoff ------------------------------------------------------------------

def test_on_failure_is_called_once_with_the_failed_action(db: Db) -> None:
    seen = []

    @processor("doomed", retries=2, retry_interval=timedelta(0), on_failure=seen.append)
    def doomed(action):
        raise ValueError("never works")

    action = init_action(db.engine, "doomed", {"order": 42})
    drain(db)
    assert len(seen) == 1
    (failed,) = seen
    assert (failed.id, failed.status, failed.attempts, failed.data) == (
        action.id, Status.FAILED, 3, {"order": 42})
    assert failed.error == "ValueError: never works" and len(failed.errors) == 3


@pytest.mark.parametrize(("when", "reported_attempts"), [
    ("every", [1, 2, 3, 4]), ("first_and_final", [1, 4]), ("final", [4])])
def test_exception_reporter_policies(db: Db, when: str, reported_attempts: list[int]) -> None:
    reported: list[tuple[str, int]] = []

    @processor("flaky", retries=3, retry_interval=timedelta(0))
    def flaky(action):
        raise KeyError("missing")

    report_exceptions(lambda exc, action: reported.append((repr(exc), action.attempts)),
                      when=when)
    try:
        init_action(db.engine, "flaky", {})
        drain(db)
    finally:
        report_exceptions(None)
    assert reported == [("KeyError('missing')", n) for n in reported_attempts]


def test_exponential_backoff_doubles_with_jitter_and_a_cap() -> None:
    settings = ProcessorSettings(retry_interval=timedelta(seconds=10), backoff="exponential")
    from asyncactions import Action

    def delay(attempts: int) -> float:
        action = Action(1, "p", Status.RUNNING, None, None, 0, 5, attempts, None, [], None,
                        None, datetime.now(UTC), datetime.now(UTC), None, None, None, None)
        return retry_delay(action, settings).total_seconds()

    for attempts, base in [(1, 10), (2, 20), (3, 40), (4, 80), (20, 3600)]:
        samples = [delay(attempts) for _ in range(50)]
        assert all(0.8 * base <= s <= 1.2 * base for s in samples), (attempts, samples)
        assert len(set(samples)) > 1, "jitter spreads the retries"
    settings = ProcessorSettings(retry_interval=timedelta(seconds=10), backoff="exponential",
                                 max_retry_interval=timedelta(seconds=30))
    assert all(24 <= delay(6) <= 36 for _ in range(20)), "capped at 30s, then jittered"
    fixed = ProcessorSettings(retry_interval=timedelta(seconds=10))
    assert retry_delay(Action(1, "p", Status.RUNNING, None, None, 0, 5, 7, None, [], None, None,
                              datetime.now(UTC), datetime.now(UTC), None, None, None, None),
                       fixed) == timedelta(seconds=10)


# --- malformed data ----------------------------------------------------------------------

def test_malformed_stored_data_fails_only_that_action(db: Db) -> None:
    @processor("reads_data")
    def reads_data(action):
        return action.data

    init_actions(db.engine, "reads_data", [1, 2, 3])
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE async_action SET data = :bad WHERE id = 2"),
                     {"bad": '{"$decimal": "not a number"}'})
    drain(db)
    broken = admin.get_action(db.engine, 2)
    assert broken.status == Status.FAILED
    assert broken.error == ('PermanentFailure: the stored data cannot be decoded (ValueError: '
                            '{"$decimal": \'not a number\'} is not a valid decimal); fix or '
                            'cancel this action')
    assert "not a number" in broken.data  # shown raw
    assert statuses(db) == {"completed": 2, "failed": 1}


# --- metrics ---------------------------------------------------------------------------

def scrape(port: int) -> dict[tuple[str, tuple], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def test_metrics_endpoint_counts_outcomes_durations_and_backlog(db: Db) -> None:
    gate = threading.Event()

    @processor("counted", retries=0)
    def counted(action):
        if action.data == "fail":
            raise RuntimeError("no")

    @processor("gated")
    def gated(action):
        gate.wait(30)

    init_actions(db.engine, "counted", ["ok"] * 5 + ["fail"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Worker(config=worker_config(db), metrics_port=port,
                    processors=["counted"])
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_until(lambda: statuses(db) == {"completed": 5, "failed": 1}, what="the actions")
        init_actions(db.engine, "counted", ["ok"], delay=timedelta(0))
        wait_until(lambda: scrape(port).get(
            ("asyncactions_actions_processed_total",
             (("outcome", "completed"), ("processor", "counted")))) == 6, what="the counter")
        # The backlog is sampled every 10 s, first within a second of the start.
        pending = ("asyncactions_pending_actions", (("processor", "counted"),))
        wait_until(lambda: pending in scrape(port), what="the backlog gauge")
        metrics = scrape(port)
    finally:
        worker.stop()
        gate.set()
        thread.join(30)
    assert metrics[("asyncactions_actions_processed_total",
                    (("outcome", "failed"), ("processor", "counted")))] == 1
    assert metrics[("asyncactions_actions_claimed_total", (("processor", "counted"),))] == 7
    assert metrics[("asyncactions_attempt_duration_seconds_count",
                    (("processor", "counted"),))] == 7
    assert metrics[("asyncactions_worker_heartbeat_age_seconds", ())] < 60
    # Claims are timed: the first six and the seventh took two claims at least (an idle
    # worker's rounds count too).
    assert metrics[("asyncactions_claim_duration_seconds_count", ())] >= 2
    assert metrics[("asyncactions_claim_duration_seconds_sum", ())] > 0
    assert pending in metrics  # served (its values: the sampler's own test below)


def test_the_backlog_sampler_reads_eligible_pending_actions_per_served_processor(
        db: Db) -> None:
    from asyncactions.maintenance import BacklogSampler
    from asyncactions.metrics import Metrics
    from asyncactions.processors import Processor

    served = {name: Processor(name, print, ProcessorSettings()) for name in ("mail", "idle")}
    init_actions(db.engine, "mail", [{}] * 3)
    init_action(db.engine, "mail", {}, delay=timedelta(hours=1))  # not eligible: not counted
    init_action(db.engine, "other", {})  # not served here
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE async_action SET next_eligible_at = :t WHERE id = 1"),
                     {"t": datetime.now(UTC) - timedelta(minutes=5)})
    metrics = Metrics()
    BacklogSampler(db.engine, metrics, served).run_once()
    assert metrics.pending.labels("mail")._value.get() == 3
    assert metrics.pending.labels("idle")._value.get() == 0
    assert metrics.oldest_pending.labels("mail")._value.get() >= 300
    assert ("other",) not in metrics.pending._metrics
