"""Issue 5 retention: workers prune finished actions so the table stays small."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from asyncactions import Worker, admin, init_action, init_actions, processor, queries
from asyncactions.maintenance import (
    FIRST_RUN_WITHIN,
    Heartbeat,
    Leadership,
    Maintenance,
    Pruner,
    Rescuer,
    StartsTrimmer,
)

from .conftest import Db, wait_until, worker_config


def test_a_worker_with_short_retention_keeps_the_table_bounded(db: Db) -> None:
    @processor("quick")
    def quick(action):
        if action.data == "fail":
            raise RuntimeError("kept for the post-mortem")

    init_action(db.engine, "quick", "fail", retries=0)
    config = worker_config(db, retention={"completed": timedelta(seconds=1),
                                          "canceled": None, "failed": None})
    worker = Worker(config=config)
    thread = threading.Thread(target=worker.run)
    thread.start()
    sizes = []
    try:
        for wave in range(8):
            init_actions(db.engine, "quick", [wave] * 200, related_id=f"wave:{wave}")
            wait_until(lambda: db.scalar("SELECT count(*) FROM async_action WHERE status = "
                                         "'pending'") == 0, what="the wave to run")
            sizes.append(db.scalar("SELECT count(*) FROM async_action"))
            # Pruning keeps up: two waves back is gone within a few seconds.
            wait_until(lambda wave=wave: db.scalar(
                "SELECT count(*) FROM async_action WHERE related_id = :r",
                r=f"wave:{wave - 2}") == 0, timeout=15, what="pruning")
        # Not "no completed row": outcomes still on their way to the table read as
        # running (400 of them once, on SQLite, in a whole-suite run).
        wait_until(lambda: db.scalar("SELECT count(*) FROM async_action WHERE status <> "
                                     "'failed'") == 0, timeout=15, what="the last pruning")
    finally:
        worker.stop()
        thread.join(30)
    # 1,601 actions went through; the table never held more than three waves.
    assert max(sizes) <= 3 * 200 + 1, sizes
    assert db.rows("SELECT status, error FROM async_action") == [
        ("failed", "RuntimeError: kept for the post-mortem")]


def test_only_the_elected_leader_prunes(db: Db) -> None:
    """Two workers' maintenance side by side: the longest-running one leads and prunes;
    the other's pruner does not run, until the leader's heartbeat ages past a lease."""
    lease = timedelta(minutes=1)
    with db.engine.begin() as conn:
        queries.register_worker(conn, "elder", "h", 1, ["p"], lease=lease)
        conn.execute(text("UPDATE async_action_worker SET started_at = :t"),
                     {"t": datetime.now(UTC) - timedelta(minutes=1)})
        assert queries.register_worker(conn, "younger", "h", 2, ["p"], lease=lease) == "elder"
    pruned: dict[str, int] = {}

    class CountingPruner(Pruner):
        def __init__(self, name: str) -> None:
            super().__init__(db.engine, {"canceled": timedelta(0)})
            self.name = name

        def run_once(self) -> int:
            pruned[self.name] = pruned.get(self.name, 0) + super().run_once()
            return pruned[self.name]

    parts = {}
    for name in ("elder", "younger"):
        leadership = Leadership(name, lease)
        heartbeat = Heartbeat(db.engine, name, lease, list, lambda: None, leadership)
        parts[name] = (heartbeat, Maintenance(leadership, [heartbeat],
                                              [CountingPruner(name)]))

    def round_of_maintenance() -> None:
        canceled = admin.cancel(db.engine, init_action(db.engine, "p", {}).id)
        with db.engine.begin() as conn:  # past its retention of 0 (not the same instant)
            conn.execute(text("UPDATE async_action SET finished_at = :t WHERE id = :id"),
                         {"t": datetime.now(UTC) - timedelta(seconds=1), "id": canceled.id})
        for heartbeat, maintenance in parts.values():
            heartbeat.run_once()
            for job in maintenance._scheduler.get_jobs():
                job.func(*job.args)

    round_of_maintenance()
    assert pruned == {"elder": 1}
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE async_action_worker SET heartbeat_at = :t WHERE id = 'elder'"),
                     {"t": datetime.now(UTC) - 2 * lease})
    parts.pop("elder")  # its process is gone
    round_of_maintenance()
    assert pruned == {"elder": 1, "younger": 1}


def test_a_starting_worker_claims_before_its_services_run(db: Db) -> None:
    """The heartbeat and the rescue ran as the worker started: their next runs are an
    interval away. The others wait a moment too (at most FIRST_RUN_WITHIN), so the
    claim loop's first claims do not queue behind them."""
    lease = timedelta(seconds=30)
    leadership = Leadership("w", lease)
    heartbeat = Heartbeat(db.engine, "w", lease, list, lambda: None, leadership)
    rescuer = Rescuer(db.engine, lease, {}, lambda *_: None)
    trimmer = StartsTrimmer(db.engine, lease)
    pruner = Pruner(db.engine, {"completed": timedelta(minutes=1)})
    started = datetime.now(UTC)
    maintenance = Maintenance(leadership, [heartbeat], [rescuer, trimmer, pruner])
    made = datetime.now(UTC)  # the first runs are set as it is made
    maintenance.start()
    try:
        first = {job.id: job.next_run_time for job in maintenance._scheduler.get_jobs()}
    finally:
        maintenance.stop()
    assert first["Heartbeat"] >= started + timedelta(seconds=heartbeat.interval)
    assert first["Rescuer"] >= started + timedelta(seconds=rescuer.interval)
    for name in ("StartsTrimmer", "Pruner"):  # intervals of a minute and more
        assert started < first[name] <= made + timedelta(seconds=FIRST_RUN_WITHIN)
