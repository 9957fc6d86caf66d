"""examples/aio_shop.py, run as its README says: the web service and a worker, real
processes, talking HTTP and sharing the database under test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, Db, cli, track, wait_until


def call(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                      method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def answers(port: int) -> bool:
    try:
        return call(port, "GET", "/orders/0")[0] == 404
    except OSError:
        return False


@pytest.fixture
def shop(db: Db, tmp_path: Path) -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = track(subprocess.Popen(
        [sys.executable, "-m", "examples.aio_shop", "--port", str(port)], cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "ASYNCACTIONS_DATABASE_URL": db.url},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    wait_until(lambda: answers(port) or server.poll() is not None, what="the web service")
    assert server.poll() is None, server.stderr.read() if server.stderr else ""
    yield port
    server.terminate()
    server.wait(30)
    with db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE web_order")


def test_the_async_shop_places_orders_and_its_worker_runs_the_follow_ups(
        db: Db, shop: int, tmp_path: Path) -> None:
    status, placed = call(shop, "POST", "/orders", {"email": "ada@example.com",
                                                    "items": ["tea", "cups"]})
    assert status == 201, placed
    assert call(shop, "POST", "/orders", {"email": "eve@example.com", "items": ["gold"],
                                          "card": "declined"}) == (
        402, {"error": "payment declined: nothing was ordered"})
    assert call(shop, "POST", "/orders", ["not", "an", "order"])[0] == 400
    # The declined order left neither its row nor any action.
    assert db.scalar("SELECT count(*) FROM web_order") == 1
    assert db.scalar("SELECT count(*) FROM async_action") == 4
    assert call(shop, "GET", f"/actions/{placed['receipt']}?wait=0.2")[0] == 408

    worker = cli("worker", "--import", "examples.aio_shop", "--burst", cwd=tmp_path,
                 env={"ASYNCACTIONS_DATABASE_URL": db.url})
    assert worker.returncode == 0, worker.stderr

    assert call(shop, "GET", f"/actions/{placed['receipt']}?wait=10") == (200, {
        "action": placed["receipt"], "processor": "send_receipt", "status": "completed",
        "result": {"sent_to": "ada@example.com"}})
    assert call(shop, "GET", f"/orders/{placed['order']}") == (200, {
        "order": placed["order"], "email": "ada@example.com", "status": "confirmed"})
    assert db.rows("SELECT processor, status, count(*) FROM async_action "
                   "GROUP BY processor, status ORDER BY processor") == [
        ("confirm_order", "completed", 1), ("reserve_stock", "completed", 2),
        ("send_receipt", "completed", 1)]
