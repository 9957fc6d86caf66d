"""SPEC §3 "Events and rules": publish records one action per processor bound to the
event, in the caller's transaction; rules live in the table, so producers need neither
the processors nor the config; a starting worker adds its processors' rules."""

from __future__ import annotations

import json
import signal
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from asyncactions import AsyncActionsError, InvalidData, Status, admin, processor, publish
from asyncactions.events import add_rule, list_rules, remove_rule
from asyncactions.notifier import NOTIFY_CHANNEL

from .conftest import Db, cli, start_worker, wait_until, worker_log


def test_publish_creates_one_action_per_bound_processor_with_the_event(db: Db) -> None:
    add_rule(db.engine, "order.placed", "send_receipt")
    add_rule(db.engine, "order.placed", "sync_invoice")
    add_rule(db.engine, "order.shipped", "notify_customer")
    actions = publish(db.engine, "order.placed", {"order": 42}, related_id="order:42")
    assert sorted(a.processor for a in actions) == ["send_receipt", "sync_invoice"]
    for action in actions:
        stored = admin.get_action(db.engine, action.id)
        assert (stored.event, stored.data, stored.related_id, stored.status) == (
            "order.placed", {"order": 42}, "order:42", Status.PENDING)
    assert publish(db.engine, "nobody.listens", {}) == []


def test_publish_joins_the_callers_transaction_all_or_none(db: Db) -> None:
    add_rule(db.engine, "order.placed", "send_receipt")
    add_rule(db.engine, "order.placed", "sync_invoice")
    with Session(db.engine) as session:
        session.begin()
        assert len(publish(session, "order.placed", {"order": 1})) == 2
        session.rollback()
    assert db.scalar("SELECT count(*) FROM async_action") == 0
    with Session(db.engine) as session, session.begin():
        publish(session, "order.placed", {"order": 2})
    assert db.scalar("SELECT count(*) FROM async_action WHERE event = 'order.placed'") == 2


def test_rules_are_added_once_and_removed(db: Db) -> None:
    assert add_rule(db.engine, "e", "p", created_by="ops") is True
    assert add_rule(db.engine, "e", "p") is False
    assert [(r.event, r.processor, r.created_by) for r in list_rules(db.engine)] == [
        ("e", "p", "ops")]
    assert remove_rule(db.engine, "e", "p") is True
    assert remove_rule(db.engine, "e", "p") is False
    assert list_rules(db.engine) == []


@contextmanager
def round_trips(conn: Connection) -> Iterator[list[int]]:
    """Counts what `conn` sends to the server, at the driver (SQLAlchemy's statement
    events do not see the hot statements, run on the driver's cursor): on PostgreSQL
    libpq's protocol trace, one ReadyForQuery per round trip; on SQLite each statement
    run (SQLite has no round trips)."""
    driver = conn.connection.driver_connection
    counted = [0]
    if conn.dialect.name == "sqlite":
        driver.set_trace_callback(lambda _sql: counted.__setitem__(0, counted[0] + 1))
        try:
            yield counted
        finally:
            driver.set_trace_callback(None)
        return
    with tempfile.TemporaryFile() as trace:
        driver.pgconn.trace(trace.fileno())
        driver.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield counted
        finally:
            driver.pgconn.untrace()
            trace.seek(0)
            counted[0] = sum(line.split(b"\t")[:3:2] == [b"B", b"ReadyForQuery"]
                             for line in trace.read().splitlines())


def test_publish_to_three_processors_is_one_round_trip_in_the_callers_transaction(
        db: Db) -> None:
    for name in ("invoice", "receipt", "warehouse"):
        add_rule(db.engine, "order.placed", name)
    with db.engine.connect() as conn, conn.begin():
        conn.execute(text("SELECT 1"))  # the transaction has begun
        with round_trips(conn) as sent:
            actions = publish(conn, "order.placed", {"order": 1}, priority=2)
        assert sent == [1]
        assert [a.processor for a in actions] == ["invoice", "receipt", "warehouse"]
        assert [a.id for a in actions] == sorted(a.id for a in actions)
    stored = [admin.get_action(db.engine, a.id) for a in actions]
    assert [(s.processor, s.event, s.data, s.priority, s.retries) for s in stored] == [
        (name, "order.placed", {"order": 1}, 2, None)
        for name in ("invoice", "receipt", "warehouse")]
    assert [(s.created_at, s.next_eligible_at) for s in stored] == [
        (a.created_at, a.next_eligible_at) for a in actions]


@dataclass
class Shipment:
    order: int
    carrier: str


def test_a_registered_schema_refuses_only_when_its_processor_is_bound(db: Db) -> None:
    processor("ship", schema=Shipment)(print)  # registered here, bound to another event
    add_rule(db.engine, "order.placed", "receipt")
    add_rule(db.engine, "order.shipped", "ship")
    assert [a.processor for a in publish(db.engine, "order.placed", {"order": 1})] == [
        "receipt"]
    add_rule(db.engine, "order.placed", "ship")
    with db.engine.connect() as conn, conn.begin():
        with pytest.raises(InvalidData, match=r'^data\["carrier"\]: Field required$'):
            publish(conn, "order.placed", {"order": 2})
        # Nothing was inserted, and the caller's transaction is still usable.
        assert conn.execute(text("SELECT count(*) FROM async_action")).scalar() == 1
    assert len(publish(db.engine, "order.placed", {"order": 3, "carrier": "ups"})) == 2


def test_publish_wakes_each_bound_processor_at_commit(pg: Db) -> None:
    for name in ("invoice", "receipt"):
        add_rule(pg.engine, "order.placed", name)
    listener = psycopg.connect(pg.engine.url.set(drivername="postgresql")
                               .render_as_string(hide_password=False), autocommit=True)
    listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
    with Session(pg.engine) as session:
        session.begin()
        publish(session, "order.placed", {})
        session.rollback()
    publish(pg.engine, "order.placed", {})
    notes = list(listener.notifies(timeout=10, stop_after=2))
    assert sorted(n.payload for n in notes) == ["invoice", "receipt"]
    assert list(listener.notifies(timeout=0.2)) == []
    listener.close()


@pytest.mark.parametrize("event", ["", "   ", "x" * 201, "a\x00b"])
def test_an_event_name_that_is_not_a_name_is_refused(db: Db, event: str) -> None:
    with pytest.raises(AsyncActionsError, match="event"):
        publish(db.engine, event, {})


PROCESSORS = textwrap.dedent("""
    from asyncactions import processor

    @processor("receipt", on=["order.placed"])
    def receipt(action):
        return {"receipt_for": action.data["order"], "event": action.event}

    @processor("invoice", on=["order.placed", "order.refunded"])
    def invoice(action):
        return "synced"
""")


def test_a_starting_worker_adds_its_processors_rules_and_runs_what_is_published(
        db: Db, tmp_path: Path) -> None:
    (tmp_path / "shop_processors.py").write_text(PROCESSORS)
    (tmp_path / "asyncactions.toml").write_text(
        'imports = ["shop_processors"]\n[worker]\npoll_interval = "50ms"\n')
    worker = start_worker(tmp_path, db.url)
    wait_until(lambda: len(list_rules(db.engine)) == 3, what="the worker's rules")
    # This process never imported the processors: the rules come from the table.
    actions = publish(db.engine, "order.placed", {"order": 7})
    assert sorted(a.processor for a in actions) == ["invoice", "receipt"]
    receipt = next(a for a in actions if a.processor == "receipt")
    done = admin.wait_for(db.engine, receipt.id, timeout=30)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker_log(worker)
    assert done.result == {"receipt_for": 7, "event": "order.placed"}
    assert {(r.event, r.processor) for r in list_rules(db.engine)} == {
        ("order.placed", "receipt"), ("order.placed", "invoice"),
        ("order.refunded", "invoice")}


def test_the_cli_manages_rules_publishes_and_lists_by_event(db: Db, tmp_path: Path) -> None:
    env = {"ASYNCACTIONS_DATABASE_URL": db.url, "ASYNCACTIONS_CONFIG": ""}
    (tmp_path / "jobs.py").write_text("from asyncactions import processor\n"
                                      "processor('receipt')(print)\n")

    def run(*args: str) -> str:
        result = cli(*args, cwd=tmp_path, env=env)
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    assert "added" in run("rule", "add", "order.placed", "receipt", "--import", "jobs")
    assert "order.placed" in run("rules")
    published = [json.loads(line) for line in run(
        "publish", "order.placed", "--data", '{"order": 9}', "--format", "json").splitlines()]
    assert [(p["processor"], p["event"]) for p in published] == [("receipt", "order.placed")]
    listed = [json.loads(line) for line in run("list", "--event", "order.placed",
                                                "--format", "json").splitlines()]
    assert [a["id"] for a in listed] == [published[0]["id"]]
    assert run("list", "--event", "other", "--format", "json") == ""
    assert "order.placed" in run("show", str(published[0]["id"]))
    assert "removed" in run("rule", "remove", "order.placed", "receipt")
    nothing = cli("publish", "order.placed", cwd=tmp_path, env=env)
    assert nothing.returncode == 0 and "no rule binds 'order.placed'" in nothing.stderr
    missing = cli("rule", "remove", "order.placed", "receipt", cwd=tmp_path, env=env)
    assert missing.returncode != 0
    assert missing.stderr.strip() == ("error: no rule binds 'order.placed' to 'receipt'; "
                                      "`asyncactions rules` lists them")
    # A name nobody knows here is bound anyway (a producer may not know the processors),
    # with a one-line warning naming it.
    unknown = cli("rule", "add", "order.placed", "recipt", cwd=tmp_path, env=env)
    assert unknown.returncode == 0 and len(unknown.stderr.strip().splitlines()) == 1
    assert unknown.stderr.startswith("warning: unknown processor 'recipt'")
    assert "order.placed -> recipt: added" in unknown.stdout
