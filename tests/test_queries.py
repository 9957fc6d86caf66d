"""The worker's statements, each held to its contract on both backends (claim, record,
release, heartbeat and leadership, rescue, prune, wake), the fence included."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import text

from asyncactions import admin, init_action, init_actions, queries
from asyncactions.action import Action, Status
from asyncactions.outcomes import Kind, Outcome

from .conftest import Db, index_scans, plan_nodes, plans_sent_here, wait_until

LEASE = timedelta(minutes=5)


def claim(db: Db, worker: str, processors: list[tuple[str, int]], free: int) -> list[Action]:
    with db.engine.begin() as conn:
        actions, malformed = queries.claim(conn, worker, processors, free, LEASE)
    assert malformed == []
    return actions


def record(db: Db, outcomes: list[Outcome]) -> set[int]:
    with db.engine.begin() as conn:
        return queries.record(conn, outcomes)


def register(db: Db, *workers: str) -> None:
    with db.engine.begin() as conn:
        for worker in workers:
            queries.register_worker(conn, worker, "host", 1, ["p"], lease=LEASE)


# --- claim ---------------------------------------------------------------------------

def test_claim_takes_eligible_pending_actions_of_its_processors_in_order_up_to_the_limit(
        db: Db) -> None:
    low = init_action(db.engine, "p", {"n": 1}, priority=5)
    first = init_action(db.engine, "p", {"n": 2})
    second = init_action(db.engine, "p", {"n": 3})
    init_action(db.engine, "p", {"n": 4}, delay=timedelta(hours=1))  # not yet eligible
    init_action(db.engine, "other", {"n": 5})  # another processor's
    claimed = claim(db, "w1", [("p", 3)], 2)
    assert [a.id for a in claimed] == [first.id, second.id]
    assert all(a.status == Status.RUNNING and a.attempts == 1 and a.claimed_by == "w1"
               and a.lease_expires_at > a.started_at for a in claimed)
    assert [a.id for a in claim(db, "w2", [("p", 3)], 10)] == [low.id]
    assert claim(db, "w3", [("p", 3)], 10) == []


def test_claim_sets_retries_from_the_claiming_processor_only_when_none_were_given(
        db: Db) -> None:
    unset = init_action(db.engine, "p", {})
    given = init_action(db.engine, "p", {}, retries=7)
    assert admin.get_action(db.engine, unset.id).retries is None
    claimed = {a.id: a.retries for a in claim(db, "w", [("p", 0), ("q", 9)], 10)}
    assert claimed == {unset.id: 0, given.id: 7}
    assert admin.get_action(db.engine, unset.id).retries == 0


# --- record: the fence --------------------------------------------------------------

def test_record_writes_the_outcome_of_the_claimed_attempt(db: Db) -> None:
    init_action(db.engine, "p", {})
    (action,) = claim(db, "w", [("p", 3)], 1)
    assert record(db, [Outcome(action, Kind.COMPLETED, 3, result='{"ok":1}')]) == {action.id}
    done = admin.get_action(db.engine, action.id)
    assert (done.status, done.result, done.claimed_by, done.lease_expires_at) == \
        (Status.COMPLETED, {"ok": 1}, None, None)
    assert done.finished_at is not None


def test_record_puts_a_retry_back_to_pending_after_its_delay(db: Db) -> None:
    init_action(db.engine, "p", {})
    (action,) = claim(db, "w", [("p", 3)], 1)
    record(db, [Outcome(action, Kind.RETRIED, 2, delay=timedelta(hours=1), error="E: x",
                        errors='[{"attempt": 1}]')])
    retried = admin.get_action(db.engine, action.id)
    assert (retried.status, retried.retries, retried.error, retried.errors) == \
        (Status.PENDING, 2, "E: x", [{"attempt": 1}])
    assert retried.next_eligible_at > datetime.now(UTC) + timedelta(minutes=59)
    assert retried.finished_at is None


@pytest.mark.parametrize("stale", ["attempts", "claimed_by", "canceled", "status"])
def test_record_is_fenced_on_the_attempt_it_claimed(db: Db, stale: str) -> None:
    init_action(db.engine, "p", {})
    (action,) = claim(db, "w", [("p", 3)], 1)
    late = {"attempts": action._replace(attempts=action.attempts - 1),
            "claimed_by": action._replace(claimed_by="another-worker")}.get(stale, action)
    if stale == "canceled":
        admin.cancel(db.engine, action.id)
    if stale == "status":  # by hand: the claim's worker and attempt still on the row
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE async_action SET status = 'canceled' WHERE id = :id"),
                         {"id": action.id})
    assert record(db, [Outcome(late, Kind.COMPLETED, 3, result="1")]) == set()
    unchanged = admin.get_action(db.engine, action.id)
    assert unchanged.result is None
    assert unchanged.status == (Status.RUNNING if stale in ("attempts", "claimed_by")
                                else Status.CANCELED)


def test_record_applies_a_batch_in_one_statement_and_says_which_got_through(db: Db) -> None:
    init_action(db.engine, "p", {})
    init_action(db.engine, "p", {})
    ours, theirs = claim(db, "w", [("p", 3)], 2)
    outcomes = [Outcome(ours, Kind.COMPLETED, 3),
                Outcome(theirs._replace(claimed_by="gone"), Kind.COMPLETED, 3)]
    assert record(db, outcomes) == {ours.id}


def test_a_completed_outcome_without_a_result_is_written_and_fenced_like_any_other(
        db: Db) -> None:
    # The commonest outcome has a shorter way into the batch: the worker's id is quoted
    # into it (this one needs escaping), and the fence still holds.
    init_actions(db.engine, "p", [{}, {}])
    worker = 'host:1:ns-"a"\\b'
    ours, theirs = claim(db, worker, [("p", 3)], 2)
    outcomes = [Outcome(ours, Kind.COMPLETED, 3),
                Outcome(theirs._replace(claimed_by=worker + "x"), Kind.COMPLETED, 3)]
    assert record(db, outcomes) == {ours.id}
    done, untouched = (admin.get_action(db.engine, a.id) for a in (ours, theirs))
    assert (done.status, done.result, done.retries, done.error, done.claimed_by) == \
        (Status.COMPLETED, None, 3, None, None)
    assert done.finished_at is not None and done.next_eligible_at == ours.next_eligible_at
    assert (untouched.status, untouched.claimed_by) == (Status.RUNNING, worker)


# --- release ---------------------------------------------------------------------------

def test_record_goes_through_after_the_lease_was_renewed_or_ran_out(db: Db) -> None:
    register(db, "w")
    for _ in range(2):
        init_action(db.engine, "p", {})
    with db.engine.begin() as conn:
        (ran_out,), _ = queries.claim(conn, "w", [("p", 3)], 1, timedelta(seconds=1))
    with db.engine.begin() as conn:
        (renewed,), _ = queries.claim(conn, "w", [("p", 3)], 1, LEASE)
        queries.heartbeat(conn, "w", timedelta(hours=2), [renewed.id])
    # The database's clock is this machine's.
    wait_until(lambda: datetime.now(UTC) > ran_out.lease_expires_at, 10, what="the lease to end")
    # The batch knows the leases it claimed with (each claim its own; renewal has since
    # moved one on): the write must read running rows from the earliest of them.
    assert record(db, [Outcome(renewed, Kind.COMPLETED, 3),
                       Outcome(ran_out, Kind.COMPLETED, 3)]) == {renewed.id, ran_out.id}


def _lease_index_entries_read(conn: psycopg.Connection, outcomes: list[Outcome],
                              dialect: object) -> int:
    """Entries of the lease index an outcome write reads, by EXPLAIN ANALYZE (rolled back)."""
    sql, args = queries.RECORD["postgresql"].render(
        dialect, queries.record_params("postgresql", outcomes))
    return sum(scan["Actual Rows"] for scan in index_scans(conn, sql, args,
                                                           "async_action_lease_idx"))


def test_an_outcome_write_reads_no_running_row_older_than_its_batch(pg: Db) -> None:
    """Every action passes through running, and until vacuum the lease index keeps an
    entry for each: a write must not read the entries of all the actions run before."""
    init_actions(pg.engine, "p", [{}] * 2010)
    for _ in range(20):
        done = claim(pg, "w", [("p", 3)], 100)
        assert record(pg, [Outcome(a, Kind.COMPLETED, 3) for a in done]) == {a.id for a in done}
    batch = [Outcome(a, Kind.COMPLETED, 3) for a in claim(pg, "w", [("p", 3)], 10)]
    with psycopg.connect(pg.url.replace("+psycopg", "")) as conn:
        assert _lease_index_entries_read(conn, batch, pg.engine.dialect) <= 10


def test_status_conditions_use_their_partial_indexes_in_a_generic_plan(pg: Db) -> None:
    """Statuses in conditions are literals, so a generic plan (which a session may choose,
    or force) still finds the rows by the partial indexes on status: the rescue's read of
    running rows by the lease index, the backlog's of pending ones by an index on
    pending. With the status bound as a value, each read the whole table."""
    init_actions(pg.engine, "p", [{}] * 2_010)
    done = claim(pg, "w", [("p", 3)], 2_000)
    record(pg, [Outcome(a, Kind.COMPLETED, 3) for a in done])
    claim(pg, "w", [("p", 3)], 5)
    with pg.engine.connect() as conn:
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        plans = plans_sent_here(conn)
        conn.commit()
        for _ in range(8):  # psycopg prepares a statement after 5 runs
            with conn.begin():
                conn.execute(queries.LOST, {"limit": 500}).all()
                queries.backlog(conn)
    for name in ("ORDER BY async_action.lease_expires_at", "GROUP BY async_action.processor"):
        scans = [[n for n in plan_nodes(ran["Plan"]) if n.get("Relation Name") == "async_action"]
                 for ran in plans if name in ran["Query Text"]]
        assert len(scans) == 8, name
        for nodes in scans[-3:]:  # the prepared statement's generic plan
            assert nodes and all(n["Node Type"] != "Seq Scan" for n in nodes), (name, nodes)


def test_release_hands_back_an_unstarted_claim_as_if_never_claimed(db: Db) -> None:
    init_action(db.engine, "p", {})
    (action,) = claim(db, "w", [("p", 3)], 1)
    with db.engine.begin() as conn:
        queries.release(conn, [action])
        queries.release(conn, [action])  # twice is harmless: the fence matches nothing
    back = admin.get_action(db.engine, action.id)
    assert (back.status, back.attempts, back.claimed_by) == (Status.PENDING, 0, None)


# --- heartbeat, leases and leadership ---------------------------------------------------

def test_heartbeat_extends_only_the_leases_this_worker_holds(db: Db) -> None:
    register(db, "w1", "w2")
    for _ in range(3):
        init_action(db.engine, "p", {})
    held, not_held = claim(db, "w1", [("p", 3)], 2)
    (others,) = claim(db, "w2", [("p", 3)], 1)
    with db.engine.begin() as conn:
        alive, _ = queries.heartbeat(conn, "w1", timedelta(hours=2), [held.id, others.id])
    assert alive
    lease = {a.id: admin.get_action(db.engine, a.id).lease_expires_at
             for a in (held, not_held, others)}
    assert lease[held.id] > datetime.now(UTC) + timedelta(hours=1)
    assert lease[not_held.id] == not_held.lease_expires_at  # a claim it does not know of
    assert lease[others.id] == others.lease_expires_at  # another worker's


def test_heartbeat_never_shortens_a_lease(db: Db) -> None:
    """A lease only grows while its attempt runs (an outcome write relies on it), even
    should the database's clock step back."""
    register(db, "w")
    init_action(db.engine, "p", {})
    (held,) = claim(db, "w", [("p", 3)], 1)
    with db.engine.begin() as conn:
        queries.heartbeat(conn, "w", timedelta(seconds=1), [held.id])
    assert admin.get_action(db.engine, held.id).lease_expires_at == held.lease_expires_at


def test_heartbeat_names_the_longest_running_live_worker_as_leader(db: Db) -> None:
    register(db, "first")
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE async_action_worker SET started_at = :t"),
                     {"t": datetime.now(UTC) - timedelta(minutes=1)})
    register(db, "second")
    with db.engine.begin() as conn:
        assert queries.heartbeat(conn, "second", LEASE, []) == (True, "first")
        assert queries.heartbeat(conn, "first", LEASE, []) == (True, "first")
        # The first one's heartbeat ages past a lease: the second takes over.
        conn.execute(text("UPDATE async_action_worker SET heartbeat_at = :t WHERE id = 'first'"),
                     {"t": datetime.now(UTC) - 2 * LEASE})
        assert queries.heartbeat(conn, "second", LEASE, []) == (True, "second")
        assert queries.heartbeat(conn, "unregistered", LEASE, []) == (False, None)


def test_a_registration_names_the_leader_as_a_heartbeat_does(db: Db) -> None:
    """A starting worker learns who leads from its registration, with no beat of its
    own: itself when no live worker started before it."""
    with db.engine.begin() as conn:
        assert queries.register_worker(conn, "first", "host", 1, ["p"], lease=LEASE) == "first"
    with db.engine.begin() as conn:
        assert queries.register_worker(conn, "second", "host", 2, ["p"], lease=LEASE) == "first"
        conn.execute(text("UPDATE async_action_worker SET heartbeat_at = :t WHERE id = 'first'"),
                     {"t": datetime.now(UTC) - 2 * LEASE})
        assert queries.register_worker(conn, "third", "host", 3, ["p"], lease=LEASE) == "second"


# --- rescue -------------------------------------------------------------------------------

def test_lost_actions_are_those_whose_lease_expired_or_whose_worker_is_gone(db: Db) -> None:
    register(db, "alive", "expired")
    for _ in range(3):
        init_action(db.engine, "p", {})
    (healthy,) = claim(db, "alive", [("p", 3)], 1)
    (expired,) = claim(db, "expired", [("p", 3)], 1)
    (orphan,) = claim(db, "never-registered", [("p", 3)], 1)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE async_action SET lease_expires_at = :t WHERE id = :id"),
                     {"t": datetime.now(UTC) - timedelta(seconds=1), "id": expired.id})
        lost = queries.lost_actions(conn, LEASE)
    assert sorted(a.id for a in lost) == sorted([expired.id, orphan.id])
    assert healthy.id not in {a.id for a in lost}


def test_rescue_forgets_workers_whose_heartbeat_is_older_than_a_lease(db: Db) -> None:
    register(db, "fresh", "stale")
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE async_action_worker SET heartbeat_at = :t WHERE id = 'stale'"),
                     {"t": datetime.now(UTC) - 2 * LEASE})
        queries.lost_actions(conn, LEASE)
    assert db.rows("SELECT id FROM async_action_worker") == [("fresh",)]


def test_lost_actions_that_do_not_decode_are_still_found(db: Db) -> None:
    init_action(db.engine, "p", {})
    (action,) = claim(db, "gone", [("p", 3)], 1)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE async_action SET errors = '5', data = '{\"$decimal\": \"x\"}'"
                          " WHERE id = :id"), {"id": action.id})
        (lost,) = queries.lost_actions(conn, LEASE)
    # Shown as stored; the rescue's failed attempt starts the history afresh.
    assert (lost.id, lost.errors, lost.data) == (action.id, "5", '{"$decimal": "x"}')


# --- prune ----------------------------------------------------------------------------------

def test_purge_deletes_only_finished_actions_past_the_age_in_batches(db: Db) -> None:
    old = [init_action(db.engine, "p", {}) for _ in range(5)]
    recent = init_action(db.engine, "p", {})
    pending = init_action(db.engine, "p", {})
    for action in [*old, recent]:
        admin.cancel(db.engine, action.id)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE async_action SET finished_at = :t WHERE id <= :last"),
                     {"t": datetime.now(UTC) - timedelta(days=2), "last": old[-1].id})
    assert admin.purge(db.engine, timedelta(days=1), batch_size=2) == 5
    assert sorted(r[0] for r in db.rows("SELECT id FROM async_action")) == \
        [recent.id, pending.id]


# --- wake (PostgreSQL: LISTEN/NOTIFY) -------------------------------------------------------

def test_wake_notifies_the_processors_whose_actions_just_became_eligible(pg: Db) -> None:
    init_action(pg.engine, "due", {}, delay=timedelta(seconds=0))
    init_action(pg.engine, "later", {}, delay=timedelta(hours=1))
    init_action(pg.engine, "long_ago", {})
    with pg.engine.begin() as conn:
        conn.execute(text("UPDATE async_action SET next_eligible_at = now() - interval '1 hour'"
                          " WHERE processor = 'long_ago'"))
    url = pg.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute("LISTEN asyncactions")
        with pg.engine.begin() as conn:
            assert queries.wake_eligible(conn, timedelta(minutes=5)) == 1
        woken = {n.payload for n in listener.notifies(timeout=5, stop_after=1)}
    assert woken == {"due"}


def test_wake_probes_each_processor_and_priority_instead_of_reading_the_backlog(pg: Db) -> None:
    """The wake-up has no index of its own (every enqueue would pay for it): it finds each
    (processor, priority) with pending actions in the claim index and probes its recent
    window, so what it reads grows with those parts, not with the actions waiting."""
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    init_actions(pg.engine, "backlog", [{}] * 20_000, eligible_at=long_ago)
    init_actions(pg.engine, "backlog", [{}] * 1000, eligible_at=long_ago, priority=2)
    init_actions(pg.engine, "later", [{}] * 1000, delay=timedelta(hours=1))
    init_action(pg.engine, "due", {}, priority=7)
    init_action(pg.engine, "due_too", {}, priority=-3)
    with pg.engine.begin() as conn:
        conn.execute(text("ANALYZE async_action"))  # as autovacuum would
    url = pg.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener, pg.engine.connect() as conn:
        listener.execute("LISTEN asyncactions")
        plans = plans_sent_here(conn)
        conn.commit()
        with conn.begin():
            assert queries.wake_eligible(conn, timedelta(minutes=5)) == 2
        woken = {n.payload for n in listener.notifies(timeout=5, stop_after=2)}
    assert woken == {"due", "due_too"}
    (wake,) = [p for p in plans if "pg_notify" in p["Query Text"]]
    scans = [n for n in plan_nodes(wake["Plan"]) if n.get("Relation Name") == "async_action"]
    assert scans and {n["Index Name"] for n in scans} == {"async_action_claim_idx"}
    # The claim index of these 22,002 actions has over 100 leaf pages; a probe reads 2-3.
    pages = sum(n["Shared Hit Blocks"] + n["Shared Read Blocks"] for n in scans)
    assert pages <= 40, scans
