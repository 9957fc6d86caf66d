"""SPEC §4 operations, run as the real command on each backend: list, show, stats,
retry, cancel, purge, workers, processors, and their answers to bad input."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pty
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Text, insert, literal

from asyncactions import Action, Worker, admin, audit, codec, init_action, processor
from asyncactions.maintenance import HorizonWatch
from asyncactions.output import Ratio, emit, human_duration
from asyncactions.schema import as_payload, async_action, async_action_worker

from .conftest import ROOT, Db, cli, drain, worker_config
from .test_cli import one_line_error

FIELDS = set(Action._fields)
HOUR = timedelta(hours=1)


def put(db: Db, processor: str = "mail", status: str = "pending", *, age: timedelta = HOUR,
        wait: float | None = None, run: float | None = None, **values: Any) -> int:
    """Insert an action as workers would have left it: created `age` ago, its latest
    attempt started `wait` seconds later and finished `run` seconds after that."""
    created = datetime.now(UTC) - age
    started = None if wait is None else created + timedelta(seconds=wait)
    finished = None if run is None or started is None else started + timedelta(seconds=run)
    for name in ("data", "errors", "result"):
        if name in values:
            values[name] = as_payload(literal(codec.dumps(values[name]), Text))
    row = {"processor": processor, "status": status, "retries": 3, "attempts": 0,
           "created_at": created, "next_eligible_at": created, "started_at": started,
           "finished_at": finished, **values}
    with db.engine.begin() as conn:
        return conn.execute(insert(async_action).values(row)
                            .returning(async_action.c.id)).scalar_one()


def run(db: Db, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, cwd=cwd, env={"ASYNCACTIONS_DATABASE_URL": db.url,
                                    "ASYNCACTIONS_CONFIG": ""})


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def records(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ok(result).splitlines()]


def by_id(db: Db) -> dict[int, tuple]:
    return {r[0]: r[1:] for r in db.rows(
        "SELECT id, status, retries, attempts, finished_at, claimed_by FROM async_action")}


# --- list, show, stats ----------------------------------------------------------------------

def test_list_filters_newest_first_in_every_format(db: Db, tmp_path: Path) -> None:
    put(db, "mail", "completed", age=timedelta(days=3), wait=1, run=1, related_id="order:1")
    put(db, "mail", "failed", wait=1, run=1, related_id="order:1", attempts=4,
        error="SMTPError: refused", data={"to": "ada@example.com"})
    put(db, "sms", "pending", related_id="order:2")
    put(db, "mail", "canceled", finished_at=datetime.now(UTC))
    put(db, "sms", "completed", wait=1, run=1, related_id="order:1", result={"sid": 7})

    everything = records(run(db, tmp_path, "list", "--format", "json"))
    assert [r["id"] for r in everything] == [5, 4, 3, 2, 1]
    assert all(set(r) == FIELDS for r in everything)
    failed = everything[3]
    assert (failed["status"], failed["attempts"], failed["error"], failed["data"]) == (
        "failed", 4, "SMTPError: refused", {"to": "ada@example.com"})
    assert everything[0]["result"] == {"sid": 7}

    # Filters combine: only the failed one is mail, of order 1 and recent.
    chosen = records(run(db, tmp_path, "list", "--status", "failed,completed", "--processor",
                         "mail", "--related-id", "order:1", "--since", "24h", "--format",
                         "json"))
    assert [r["id"] for r in chosen] == [2]

    table = list(csv.DictReader(io.StringIO(ok(run(db, tmp_path, "list", "--processor", "sms",
                                                   "--limit", "1", "--format", "csv")))))
    assert [(r["id"], r["status"], r["result"]) for r in table] == [
        ("5", "completed", '{"sid": 7}')]
    human = ok(run(db, tmp_path, "list", "--related-id", "order:1"))
    assert "ASYNC-00000005" in human and "ASYNC-00000001" in human
    assert "ASYNC-00000003" not in human


def test_a_processor_filter_lists_every_status_newest_first_page_by_page(
        db: Db, tmp_path: Path) -> None:
    # Its index leaves running rows out (schema.NOT_RUNNING): they are read apart and
    # merged in id order.
    statuses = ["completed", "running", "pending", "failed", "running", "canceled",
                "pending", "running"]
    ids = [put(db, "mail", status) for status in statuses]
    put(db, "sms", "running")
    listed = records(run(db, tmp_path, "list", "--processor", "mail", "--format", "json"))
    assert [(r["id"], r["status"]) for r in listed] == list(zip(ids, statuses, strict=True))[::-1]
    first = audit.list_actions(db.engine, audit.Filter(processor="mail"), limit=3)
    rest = audit.list_actions(db.engine, audit.Filter(processor="mail"), limit=10,
                              before=first[-1].id)
    assert [a.id for a in first + rest] == ids[::-1]
    running = audit.list_actions(db.engine, audit.Filter(("running",), "mail"))
    assert [a.id for a in running] == [ids[7], ids[4], ids[1]]


def test_retries_not_yet_set_read_as_the_processors_and_stay_null_in_json(
        db: Db, tmp_path: Path) -> None:
    action_id = put(db, "mail", retries=None)
    assert records(run(db, tmp_path, "list", "--format", "json"))[0]["retries"] is None
    assert records(run(db, tmp_path, "show", str(action_id), "--format", "json"))[0][
        "retries"] is None
    for command in (["list"], ["show", str(action_id)]):
        assert "(processor's)" in ok(run(db, tmp_path, *command)), command


def test_enqueue_with_a_unique_key_prints_the_live_holder(db: Db, tmp_path: Path) -> None:
    put(db, "sms", "completed", wait=1, run=1, unique_key="otp:42")  # finished: no block
    args = ("enqueue", "sms", "--data", '{"to": "+4470"}', "--related-id", "user:42",
            "--priority", "-5", "--delay", "1m", "--unique-key", "otp:42")
    first, again = ok(run(db, tmp_path, *args)), ok(run(db, tmp_path, *args))
    assert first == again == "ASYNC-00000002\n"
    action = admin.get_action(db.engine, 2)
    assert (action.data, action.related_id, action.priority, action.unique_key) == (
        {"to": "+4470"}, "user:42", -5, "otp:42")
    assert action.next_eligible_at - action.created_at == timedelta(minutes=1)
    assert len(by_id(db)) == 2


def test_show_prints_every_field_timings_and_the_error_history(db: Db, tmp_path: Path) -> None:
    @processor("flaky", retries=1, retry_interval=timedelta(0))
    def flaky(action):
        raise ConnectionError(f"smtp refused attempt {action.attempts}")

    failed = init_action(db.engine, "flaky", {"to": "ada@example.com"}).id
    drain(db, concurrency=1)
    done = put(db, "mail", "completed", wait=2, run=3, attempts=1, result={"sent": True})
    waiting = put(db, "mail", "pending")

    (shown,) = records(run(db, tmp_path, "show", f"ASYNC-{failed:08d}", "--format", "json"))
    assert set(shown) == FIELDS | {"queued", "run_time"}
    assert (shown["id"], shown["status"], shown["attempts"], shown["retries"]) == (
        failed, "failed", 2, 0)
    assert shown["error"] == "ConnectionError: smtp refused attempt 2"
    assert [e["attempt"] for e in shown["errors"]] == [1, 2]
    assert all("raise ConnectionError" in e["traceback"] and e["worker"]
               for e in shown["errors"])
    assert shown["queued"] >= 0 and shown["run_time"] >= 0

    (timed,) = records(run(db, tmp_path, "show", str(done), "--format", "json"))
    assert timed["queued"] == pytest.approx(2, abs=0.01)
    assert timed["run_time"] == pytest.approx(3, abs=0.01)
    assert timed["result"] == {"sent": True}

    human = ok(run(db, tmp_path, "show", str(failed)))
    assert f"ASYNC-{failed:08d} flaky failed" in human
    assert "attempt 1 at" in human and "smtp refused attempt 1" in human
    assert "Traceback (most recent call last)" in human and "raise ConnectionError" in human
    assert "queued" in human and "run_time" in human

    # While pending or running, the clock runs on to now.
    pending, now = admin.get_action(db.engine, waiting), audit.db_clock(db.engine)
    assert audit.timings(pending, now) == {"queued": now - pending.created_at,
                                           "run_time": None}


def test_stats_per_processor_over_the_window(db: Db, tmp_path: Path) -> None:
    for second in range(1, 21):  # run times 1..20 s, the first four after a retry
        put(db, "mail", "completed", wait=0.5, run=second, attempts=2 if second <= 4 else 1)
    for _ in range(2):
        put(db, "mail", "failed", wait=1, run=1, attempts=3, error="SMTPError: refused")
    put(db, "mail", "failed", wait=1, run=1, attempts=1, error="ValueError: bad address")
    put(db, "mail", "pending")
    put(db, "mail", "pending")
    put(db, "mail", "canceled", finished_at=datetime.now(UTC))  # never ran: no run time
    put(db, "mail", "completed", age=timedelta(days=3), wait=1, run=100, attempts=1)
    put(db, "sms", "running", wait=1, attempts=1, claimed_by="w1")

    mail, sms = records(run(db, tmp_path, "stats", "--format", "json"))
    assert mail["processor"] == "mail"
    assert {k: mail[k] for k in ("total", "pending", "running", "completed", "failed",
                                 "canceled")} == {"total": 26, "pending": 2, "running": 0,
                                                  "completed": 20, "failed": 3, "canceled": 1}
    assert mail["success_rate"] == pytest.approx(20 / 23)
    assert mail["retry_rate"] == pytest.approx(6 / 23)
    # 23 run times: 1,1,1,1,2,3,…,20; nearest-rank p95 is the 22nd.
    assert mail["mean_run_time"] == pytest.approx(213 / 23, abs=1e-3)
    assert mail["p95_run_time"] == pytest.approx(19, abs=1e-3)
    assert mail["top_errors"] == [{"error": "SMTPError: refused", "count": 2},
                                  {"error": "ValueError: bad address", "count": 1}]
    assert (sms["total"], sms["running"], sms["success_rate"], sms["retry_rate"],
            sms["mean_run_time"], sms["p95_run_time"], sms["top_errors"]) == (
        1, 1, None, 0.0, None, None, [])

    week = records(run(db, tmp_path, "stats", "--since", "7d", "--format", "json"))[0]
    assert (week["total"], week["completed"]) == (27, 21)
    assert week["p95_run_time"] == pytest.approx(20, abs=1e-3)

    human = ok(run(db, tmp_path, "stats"))
    assert "87.0%" in human and "SMTPError: refused" in human and "top errors" in human


# --- retry and cancel -----------------------------------------------------------------------

def test_retry_by_ids_and_by_filter(db: Db, tmp_path: Path) -> None:
    history = [{"attempt": 3, "at": "2026-01-01T00:00:00+00:00", "error": "X: boom",
                "traceback": "Traceback …", "worker": "w1"}]
    f1 = put(db, "mail", "failed", wait=1, run=1, attempts=3, retries=0, error="X: boom",
             errors=history)
    c2 = put(db, "mail", "completed", wait=1, run=1, attempts=1)
    p3 = put(db, "mail", "pending")
    s4 = put(db, "sms", "failed", wait=1, run=1, attempts=1, retries=0)
    held5 = put(db, "mail", "failed", wait=1, run=1, attempts=1, unique_key="k")
    put(db, "mail", "pending", unique_key="k")  # holds k: 5 cannot be pending too
    old7 = put(db, "mail", "failed", wait=1, run=1, attempts=1, unique_key="j")
    new8 = put(db, "mail", "failed", wait=1, run=1, attempts=1, unique_key="j")
    x9 = put(db, "mail", "canceled", finished_at=datetime.now(UTC))
    f10 = put(db, "mail", "failed", wait=1, run=1, attempts=1, retries=0)
    before = by_id(db)

    out = ok(run(db, tmp_path, "retry", f"ASYNC-{f1:08d}", str(c2), "--retries", "2"))
    assert out.splitlines() == [f"ASYNC-{f1:08d} mail pending", f"ASYNC-{c2:08d} mail pending"]
    line = one_line_error(run(db, tmp_path, "retry", str(s4), str(p3)))
    assert f"cannot retry ASYNC-{p3:08d}: it is pending" in line
    assert by_id(db)[s4] == before[s4]

    assert ok(run(db, tmp_path, "retry", "--status", "failed", "--processor", "mail",
                  "--yes")) == "retried 2 actions\n"

    again = admin.get_action(db.engine, f1)
    assert (again.status, again.retries, again.attempts) == ("pending", 2, 3)
    assert again.errors == history and again.error == "X: boom"
    assert again.finished_at is None and again.next_eligible_at <= datetime.now(UTC)
    after = by_id(db)
    assert after[c2][:3] == ("pending", 2, 1)
    assert [after[i][0] for i in (s4, held5, old7, new8, x9, f10)] == [
        "failed", "failed", "failed", "pending", "canceled", "pending"]
    assert after[f10][1] == 0  # retries unchanged without --retries


def test_cancel_by_ids_and_by_filter(db: Db, tmp_path: Path) -> None:
    p1 = put(db, "mail", "pending")
    p2 = put(db, "mail", "pending")
    r3 = put(db, "mail", "running", wait=1, attempts=1, claimed_by="w1",
             lease_expires_at=datetime.now(UTC) + HOUR)
    s4 = put(db, "sms", "pending")
    c5 = put(db, "mail", "completed", wait=1, run=1, attempts=1)
    p6 = put(db, "mail", "pending")
    r7 = put(db, "mail", "running", wait=1, attempts=1, claimed_by="w2")

    out = ok(run(db, tmp_path, "cancel", str(p1), f"ASYNC-{r3:08d}"))
    assert out.splitlines() == [f"ASYNC-{p1:08d} mail canceled",
                                f"ASYNC-{r3:08d} mail canceled"]
    line = one_line_error(run(db, tmp_path, "cancel", str(s4), str(c5)))
    assert f"cannot cancel ASYNC-{c5:08d}: it is completed" in line
    assert by_id(db)[s4][0] == "pending"

    assert ok(run(db, tmp_path, "cancel", "--processor", "mail", "--status", "pending,running",
                  "--yes")) == "canceled 3 actions\n"
    after = by_id(db)
    assert [after[i][0] for i in (p1, p2, r3, s4, c5, p6, r7)] == [
        "canceled", "canceled", "canceled", "pending", "completed", "canceled", "canceled"]
    assert after[r3][3] is not None and after[r3][4] is None  # finished, released


def on_terminal(db: Db, cwd: Path, answer: str, *args: str) -> tuple[int, str, str]:
    """Run the command with a terminal as stdin and stderr; returns (exit status, stdout,
    what the terminal showed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "asyncactions", *args], cwd=cwd,
                            stdin=slave, stderr=slave, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 "ASYNCACTIONS_DATABASE_URL": db.url,
                                 "ASYNCACTIONS_CONFIG": ""})
    os.close(slave)
    os.write(master, answer.encode())
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()  # nothing to do once it has exited
    shown = b""
    try:
        while chunk := os.read(master, 65536):
            shown += chunk
    except OSError:  # the other end is closed: all read
        pass
    os.close(master)
    return proc.returncode, out, shown.decode(errors="replace")


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_on_a_terminal_filters_ask_first_and_purge_shows_progress(db: Db,
                                                                  tmp_path: Path) -> None:
    pending = put(db, "mail", "pending")
    code, out, _ = on_terminal(db, tmp_path, "n\n", "cancel", "--processor", "mail")
    assert code == 1 and "Cancel 1 pending mail action?" in out
    assert by_id(db)[pending][0] == "pending"
    code, out, _ = on_terminal(db, tmp_path, "y\n", "cancel", "--processor", "mail")
    assert code == 0 and out.endswith("canceled 1 action\n")
    assert by_id(db)[pending][0] == "canceled"

    for _ in range(3):
        put(db, "mail", "completed", age=timedelta(days=40), wait=1, run=1)
    code, out, shown = on_terminal(db, tmp_path, "", "purge", "--older-than", "30d")
    assert (code, out) == (0, "purged 3 actions\n")
    assert "purging" in shown


# --- purge ------------------------------------------------------------------------------------

def test_purge_deletes_old_finished_actions(db: Db, tmp_path: Path) -> None:
    old = timedelta(days=40)
    c1 = put(db, "mail", "completed", age=old, wait=1, run=1)
    put(db, "mail", "failed", age=old, wait=1, run=1)
    put(db, "mail", "canceled", age=old, finished_at=datetime.now(UTC) - old)
    recent = put(db, "mail", "completed", age=timedelta(days=10), wait=1, run=1)
    waiting = put(db, "mail", "pending", age=old)
    s6 = put(db, "sms", "completed", age=old, wait=1, run=1)

    assert ok(run(db, tmp_path, "purge", "--older-than", "30d", "--dry-run")) == \
        "would purge 4 actions\n"
    assert len(by_id(db)) == 6
    assert ok(run(db, tmp_path, "purge", "--older-than", "30d", "--status",
                  "failed,canceled")) == "purged 2 actions\n"
    assert set(by_id(db)) == {c1, recent, waiting, s6}


def test_purge_works_in_batches_and_reports_progress(db: Db) -> None:
    for _ in range(5):
        put(db, "mail", "completed", age=timedelta(days=2), wait=1, run=1)
    seen: list[tuple[int, int]] = []
    assert admin.purge(db.engine, timedelta(days=1), batch_size=2,
                       progress=lambda done, total: seen.append((done, total))) == 5
    assert seen == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert by_id(db) == {}


# --- workers and processors ------------------------------------------------------------------

def test_workers_shows_live_workers_and_what_they_hold(db: Db, tmp_path: Path) -> None:
    started, release = threading.Semaphore(0), threading.Event()

    @processor("hold")
    def hold(action):
        started.release()
        release.wait(30)

    init_action(db.engine, "hold", {})
    init_action(db.engine, "hold", {})
    worker = Worker(config=worker_config(db), concurrency=2)
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    thread.start()
    try:
        assert started.acquire(timeout=30) and started.acquire(timeout=30)
        # One that last beat 40 s ago: late, but within the 60 s lease after which the
        # running worker's maintenance would forget it.
        with db.engine.begin() as conn:
            conn.execute(insert(async_action_worker).values(
                id="stale", hostname="elsewhere", pid=1, processors="mail,sms",
                started_at=datetime.now(UTC) - HOUR,
                heartbeat_at=datetime.now(UTC) - timedelta(seconds=40)))
        stale, live = records(run(db, tmp_path, "workers", "--format", "json"))
    finally:
        release.set()
        thread.join(30)
    assert (live["id"], live["pid"], live["processors"], live["running"]) == (
        worker.id, os.getpid(), ["asyncactions.fanout", "hold"], 2)  # fan-outs: every worker
    assert 0 <= live["heartbeat_age"] < 30
    assert (stale["id"], stale["hostname"], stale["processors"], stale["running"]) == (
        "stale", "elsewhere", ["mail", "sms"], 0)
    assert stale["heartbeat_age"] == pytest.approx(40, abs=10)


def test_processors_show_effective_settings(tmp_path: Path) -> None:
    (tmp_path / "procs.py").write_text(textwrap.dedent("""
        from datetime import timedelta
        from asyncactions import processor

        @processor("mail", retries=3, retry_interval=timedelta(minutes=5), batch_size=10)
        def mail(actions):
            pass

        @processor("sms", backoff="exponential", timeout=timedelta(seconds=30))
        def sms(action):
            pass
    """))
    (tmp_path / "asyncactions.toml").write_text(
        'imports = ["procs"]\n[processors.mail]\nretries = 7\nenabled = false\n')
    mail, sms = records(cli("processors", "--format", "json", cwd=tmp_path,
                            env={"ASYNCACTIONS_CONFIG": ""}))
    assert mail == {"name": "mail", "retries": 7, "retry_interval": "5m", "backoff": "fixed",
                    "max_retry_interval": "1h", "timeout": None, "batch_size": 10, "enabled": False,
                    "transactional": False, "overridden": "enabled,retries",
                    "concurrency": None, "rate_limit": None}
    # No database here (the default SQLite file does not exist, and is not created):
    # nothing says whether they are paused or served, so those columns are left out.
    assert (sms["retries"], sms["backoff"], sms["timeout"], sms["overridden"]) == (
        3, "exponential", "30s", "")


def test_tables_read_plainly_and_machine_formats_stay_exact(
        capsys: pytest.CaptureFixture[str]) -> None:
    row = {"names": ["mail", "sms"], "age": timedelta(seconds=95.2), "rate": Ratio(0.875),
           "errors": [{"error": "X: boom", "count": 2}]}
    columns = list(row)
    emit([row], columns, "table")
    table = capsys.readouterr().out
    assert "mail, sms" in table and "1m 35s" in table and "87.5%" in table
    emit([row], columns, "json")
    assert json.loads(capsys.readouterr().out) == {
        "names": ["mail", "sms"], "age": 95.2, "rate": 0.875,
        "errors": [{"error": "X: boom", "count": 2}]}
    emit([row], columns, "csv")
    assert list(csv.reader(io.StringIO(capsys.readouterr().out)))[1] == [
        '["mail", "sms"]', "95.2", "0.875", '[{"error": "X: boom", "count": 2}]']
    assert [human_duration(timedelta(seconds=s)) for s in (0.25, 3, 3600 * 5 + 60, 86400 * 2)] \
        == ["250ms", "3.0s", "5h 01m", "2d 00h"]


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_bad_input_is_one_line_and_changes_nothing(db: Db, tmp_path: Path) -> None:
    put(db, "mail", "failed", wait=1, run=1, attempts=1)
    put(db, "mail", "pending")
    before = by_id(db)
    cases = {
        ("list", "--status", "faild"): "unknown status 'faild'; use pending, running, "
                                       "completed, failed, canceled",
        ("list", "--processor", "nope"): "unknown processor 'nope'; known: mail",
        ("list", "--since", "yesterday"): "'yesterday' is not a duration",
        ("show", "ASYNC-00000099"): "no action 99 (ASYNC-00000099)",
        ("show", "order-7"): "'order-7' is not an action id",
        ("stats", "--since", "1w"): "'1w' is not a duration",
        ("retry",): "give action ids, or --status/--processor to retry by filter",
        ("retry", "1", "--status", "failed"): "give action ids or a filter",
        ("retry", "--status", "pending", "--yes"): "only completed, failed or canceled "
                                                   "actions can be run again",
        ("retry", "--processor", "nope", "--yes"): "unknown processor 'nope'",
        ("cancel", "--status", "completed", "--yes"): "only pending or running actions "
                                                      "can be canceled",
        ("cancel", "7"): "no action 7",
        ("purge",): "Missing option '--older-than'",
        ("purge", "--older-than", "30d", "--status", "pending"): "only finished actions "
                                                                 "can be purged",
        ("retry", "--status", "failed"): "refusing to retry 1 failed action without "
                                         "confirmation (stdin is not a terminal); pass --yes",
        ("cancel", "--processor", "mail"): "refusing to cancel 1 pending mail action without "
                                           "confirmation (stdin is not a terminal); pass --yes",
        ("enqueue", "mail", "--timeout", "5s"): "Invalid value for --timeout: only makes "
                                                "sense with --wait (see `asyncactions "
                                                "enqueue --help`)",
    }
    with ThreadPoolExecutor(4) as pool:  # independent processes: overlap their start-up
        results = pool.map(lambda args: run(db, tmp_path, *args), cases)
        for (args, message), result in zip(cases.items(), results, strict=True):
            line = one_line_error(result)
            assert message in line, (args, line)
    assert by_id(db) == before


def test_unreachable_or_unmigrated_database_is_one_line(tmp_path: Path) -> None:
    down = ("--database-url", "postgresql://nobody@127.0.0.1:1/none")
    commands = [(*down, "list"), (*down, "stats"), (*down, "workers"),
                (*down, "purge", "--older-than", "1d"),
                ("--database-url", f"sqlite:///{tmp_path / 'new.db'}", "retry", "1")]
    with ThreadPoolExecutor(4) as pool:
        lines = [one_line_error(r) for r in pool.map(lambda c: cli(*c, cwd=tmp_path), commands)]
    assert all("127.0.0.1:1" in line and "server is running" in line for line in lines[:4])
    assert "run `asyncactions db upgrade` first" in lines[4]


def test_the_leader_names_a_long_transaction_that_holds_back_vacuum_once(
        pg: Db, caplog: pytest.LogCaptureFixture) -> None:
    url = pg.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, application_name="nightly-report") as pinning:
        pinning.execute("SELECT txid_current()")  # then idle in transaction: xmin held
        pid = pinning.info.backend_pid
        assert HorizonWatch(pg.engine, older_than=HOUR).run_once() == []  # not long yet
        watch = HorizonWatch(pg.engine, older_than=timedelta(0))
        with caplog.at_level(logging.WARNING, logger="asyncactions.maintenance"):
            assert [h.pid for h in watch.run_once()] == [pid]
            assert [h.pid for h in watch.run_once()] == [pid]
        told = [r.getMessage() for r in caplog.records if "holds back vacuum" in r.getMessage()]
        assert len(told) == 1, told  # once per transaction
        assert told[0].startswith(f"the transaction of backend pid {pid} (idle in transaction "
                                  "for ")
        assert "application 'nightly-report'" in told[0]
        assert "idle_in_transaction_session_timeout" in told[0]
        pinning.rollback()
        assert watch.run_once() == []
