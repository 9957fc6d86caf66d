"""A real `asyncactions web` process on a free port, for the API and browser tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from .conftest import ROOT, wait_until

TOKEN = "test-token-8f2c1d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    token: str | None
    process: subprocess.Popen[str]

    def client(self, *, token: str | None = "default", **kw: object) -> httpx.Client:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)


@contextmanager
def serve(database_url: str, cwd: Path, *args: str, token: str | None = TOKEN,
          config: str | None = None) -> Iterator[Server]:
    """`asyncactions web` as a subprocess; stopped (SIGTERM) when the block ends."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("ASYNCACTIONS_WEB_TOKEN", "ASYNCACTIONS_CONFIG")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{cwd}", ASYNCACTIONS_DATABASE_URL=database_url)
    if token:
        env["ASYNCACTIONS_WEB_TOKEN"] = token
    if config:
        (cwd / "asyncactions.toml").write_text(config)
    log = (cwd / f"web-{port}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "asyncactions", "web", "--port", str(port), *args],
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    server = Server(f"http://127.0.0.1:{port}", token, process)

    def up() -> bool:
        assert process.poll() is None, (cwd / f"web-{port}.log").read_text()
        try:
            return httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, timeout=30, interval=0.05, what="the web server to answer")
    try:
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
