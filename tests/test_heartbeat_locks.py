"""The heartbeat's locks never stall another worker (issue 15). Its lease extension never
waits for a row another transaction holds (retry storm: the completer writing outcomes
locks the same running rows in another order, and the two deadlocked, stalling the
whole worker for a second). A heartbeat cut off before its COMMIT: test_cut_off.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from asyncactions import admin, init_actions, queries

from .conftest import Db

LEASE = timedelta(minutes=5)


def test_heartbeat_skips_a_row_whose_outcome_is_being_written_and_extends_the_rest(
        pg: Db) -> None:
    with pg.engine.begin() as conn:
        queries.register_worker(conn, "w", "host", 1, ["p"], lease=LEASE)
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

