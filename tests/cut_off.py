"""A client cut off from PostgreSQL at the worst moment: after its statements, before its
COMMIT. A TCP proxy passes everything on until a read from the client holds COMMIT
(psycopg sends it as a message of its own), then passes nothing more from it, and keeps
both connections open: to the server, the session is
`idle in transaction` with a client that will never speak again (a network partition, a
frozen host), holding every lock the transaction took."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress

import pytest
from sqlalchemy.engine import make_url


class CutBeforeCommit:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.cut = threading.Event()  # set when a COMMIT was held back
        self._closed = False
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._upstream)
                self._sockets += [client, server]
                if self._closed:  # accepted while closing
                    self.close()
                    return
                threading.Thread(target=self._pump, args=(client, server, True),
                                 daemon=True).start()
                threading.Thread(target=self._pump, args=(server, client, False),
                                 daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        with suppress(OSError):
            while chunk := source.recv(65536):
                if from_client and (self.cut.is_set() or b"COMMIT\0" in chunk):
                    self.cut.set()
                    continue  # held back, and all that follows: the client is gone
                target.sendall(chunk)

    def close(self) -> None:
        """Close both ends of every connection (a shutdown first: a close alone leaves a
        socket another thread is reading from open, and the server still waiting)."""
        self._closed = True
        for s in self._sockets:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                s.close()


@contextmanager
def cut_before_commit(url: str) -> Iterator[tuple[str, CutBeforeCommit]]:
    """The database URL through a proxy that cuts its clients off at their first COMMIT."""
    parsed = make_url(url)
    if parsed.host is None:
        pytest.skip("the test database is reached over a Unix socket: no TCP to cut")
    proxy = CutBeforeCommit((parsed.host or "127.0.0.1", parsed.port or 5432))
    with closing(proxy):
        yield parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False), proxy
