"""The heartbeat's locks never stall another worker (issue 15). Its lease extension never
waits for a row another transaction holds (retry storm: the completer writing outcomes
locks the same running rows in another order, and the two deadlocked, stalling the
whole worker for a second). And a heartbeat cut off mid-transaction (partition) does not
hold its locks past a lease, which would block the rescue of that worker's actions."""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from datetime import UTC, datetime, timedelta

from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from asyncactions import admin, init_actions, queries
from asyncactions.database import make_engine
from asyncactions.maintenance import Rescuer

from .conftest import Db

LEASE = timedelta(minutes=5)


def test_heartbeat_skips_a_row_whose_outcome_is_being_written_and_extends_the_rest(
        pg: Db) -> None:
    with pg.engine.begin() as conn:
        queries.register_worker(conn, "w", "host", 1, ["p"])
    init_actions(pg.engine, "p", [1, 2])
    with pg.engine.begin() as conn:
        writing, other = queries.claim(conn, "w", [("p", 3)], 2, LEASE)[0]
    with pg.engine.connect() as completer, pg.engine.connect() as beat, completer.begin():
        completer.execute(text("UPDATE async_action SET status = 'completed' "
                               "WHERE id = :id"), {"id": writing.id})
        # The outcome's transaction still holds its row. Waiting for it would be an
        # error here, not a hang: the test fails instead of deadlocking.
        with beat.begin():
            beat.execute(text("SET LOCAL lock_timeout = '2s'"))
            alive, _ = queries.heartbeat(beat, "w", timedelta(hours=2),
                                         [writing.id, other.id])
    assert alive
    extended = admin.get_action(pg.engine, other.id).lease_expires_at
    assert extended > datetime.now(UTC) + timedelta(hours=1)
    assert admin.get_action(pg.engine, writing.id).lease_expires_at == \
        writing.lease_expires_at



def test_a_heartbeat_cut_off_mid_transaction_lets_the_rescue_through_after_a_lease(
        pg: Db) -> None:
    lease = timedelta(seconds=1)
    with pg.engine.begin() as conn:
        queries.register_worker(conn, "gone", "elsewhere", 1, ["p"])
    init_actions(pg.engine, "p", [1])
    with pg.engine.begin() as conn:
        (held,), _ = queries.claim(conn, "gone", [("p", 3)], 1, lease)
    # Its next beat ran its statements, then its client vanished: no COMMIT will come,
    # and the server holds the worker's row and its action locked while it waits.
    vanished = make_engine(pg.url)
    cut_off = vanished.connect()
    cut_off.begin()
    queries.heartbeat(cut_off, "gone", lease, [held.id])
    rescued: list[int] = []

    def rescue() -> None:  # the leader's rescuer, each lease tenth, until it takes it
        rescuer = Rescuer(pg.engine, lease, {}, lambda *_: None)
        deadline = time.monotonic() + 30
        while not rescued and time.monotonic() < deadline:
            if rescuer.run_once():
                rescued.append(held.id)
            time.sleep(rescuer.interval)
    leader = threading.Thread(target=rescue, daemon=True)
    leader.start()
    leader.join(40)  # blocked for good on the cut-off beat's locks without the fix
    try:
        assert rescued == [held.id]
        assert admin.get_action(pg.engine, held.id).status == "pending"  # a retry left
    finally:
        with suppress(sa_exc.DBAPIError):
            cut_off.close()
        vanished.dispose()
