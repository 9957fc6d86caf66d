"""Issue 5 retention: workers prune finished actions so the table stays small."""

from __future__ import annotations

import threading
from datetime import timedelta

from asyncactions import Worker, init_action, init_actions, processor
from asyncactions.maintenance import leader

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
        wait_until(lambda: db.scalar("SELECT count(*) FROM async_action WHERE status = "
                                     "'completed'") == 0, timeout=15, what="the last pruning")
    finally:
        worker.stop()
        thread.join(30)
    # 1,601 actions went through; the table never held more than three waves.
    assert max(sizes) <= 3 * 200 + 1, sizes
    assert db.rows("SELECT status, error FROM async_action") == [
        ("failed", "RuntimeError: kept for the post-mortem")]


def test_one_pruner_at_a_time_across_the_cluster(pg: Db) -> None:
    with pg.engine.connect() as first, pg.engine.connect() as second:
        with leader(first, "prune") as got_first, leader(second, "prune") as got_second:
            assert (got_first, got_second) == (True, False)
        with leader(second, "prune") as got_again:
            assert got_again
