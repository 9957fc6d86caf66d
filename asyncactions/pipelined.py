"""init_action(wait=False): the enqueue statement rides the caller's next round trip.

The statement init_action would run is queued on the caller's SQLAlchemy Connection
instead, and sent in one psycopg pipeline with the transaction's COMMIT (the commit then
costs no more round trips than before, and psycopg's own commit finds the transaction
already closed), or just before the next statement anything runs on that connection
(including SAVEPOINT and its release or rollback), so the caller's own queries, later
enqueues and savepoints see the rows in call order. A rollback drops what is queued: no
row, no notification. The statement, its checks and its encoding are init_action's own;
only when it is sent differs.
"""

from __future__ import annotations

import weakref
from contextlib import suppress
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, event
from sqlalchemy import exc as sa_exc

from .action import Action
from .database import HotStatement, kept_cursor
from .errors import AsyncActionsError

_QUEUED = "_asyncactions_queued"  # on the Connection: [(statement, params, action), …]
_COMMIT_CURSOR = "asyncactions.commit_cursor"
_ROLLED_BACK = ("rolled back",)
# Engines whose events we listen to (added once per engine, on first use).
_listening: weakref.WeakSet[Engine] = weakref.WeakSet()


class QueuedAction(Action):
    """An Action from init_action(wait=False): its row is sent with the transaction's
    commit (or the connection's next statement), and id, created_at and
    next_eligible_at are the database's from then on."""

    @property  # type: ignore[misc]
    def id(self) -> int:  # type: ignore[override]
        return self._row()[0]

    @property  # type: ignore[misc]
    def created_at(self) -> Any:  # type: ignore[override]
        return self._row()[1]

    @property  # type: ignore[misc]
    def next_eligible_at(self) -> Any:  # type: ignore[override]
        return self._row()[2]

    def _row(self) -> tuple[Any, ...]:
        row = self.__dict__.get("row")
        if row is None:
            raise AsyncActionsError("this action was enqueued with wait=False: its id is known "
                                    "once its transaction has committed (or run another "
                                    "statement)")
        if row is _ROLLED_BACK:
            raise AsyncActionsError("this action was enqueued with wait=False in a transaction "
                                    "that rolled back: it was never recorded")
        return row

    def __repr__(self) -> str:
        row = self.__dict__.get("row")
        sent = row is not None and row is not _ROLLED_BACK
        return repr(self._replace_row(row) if sent else Action._make(self))

    def _replace_row(self, row: tuple[Any, ...]) -> Action:
        return Action._make(self)._replace(id=row[0], created_at=row[1],
                                           next_eligible_at=row[2])


def usable(conn: Connection) -> bool:
    """Whether the statement can wait for the next round trip on `conn`: psycopg (sync),
    in a transaction (not autocommit). Elsewhere init_action sends it at once."""
    dialect = conn.dialect
    if dialect.driver != "psycopg" or dialect.is_async:
        return False
    driver = conn.connection.dbapi_connection
    return not driver.autocommit and psycopg.Pipeline.is_supported()  # type: ignore[union-attr]


def queue(conn: Connection, stmt: HotStatement, params: dict[str, Any],
          action: Action) -> QueuedAction:
    engine = conn.engine
    if engine not in _listening:
        _listen(engine)
    if not conn.in_transaction():
        conn.begin()  # as a statement would: the caller commits
    queued = QueuedAction._make(action)
    items = conn.__dict__.get(_QUEUED)
    if items is None:
        items = conn.__dict__[_QUEUED] = []
    items.append((stmt, params, queued))
    return queued


def send(conn: Connection, *, commit: bool = False) -> None:
    """Send what is queued on `conn` in one pipeline (with COMMIT, when committing) and
    give each action its row."""
    items = conn.__dict__.pop(_QUEUED, None)
    if not items:
        return
    dialect = conn.dialect
    driver = conn.connection.dbapi_connection
    rendered = [stmt.render(dialect, params) for stmt, params, _ in items]
    cursors = [kept_cursor(conn), *(driver.cursor() for _ in items[1:])]  # type: ignore[union-attr]
    try:
        with driver.pipeline():  # type: ignore[union-attr]
            for cursor, (sql, args) in zip(cursors, rendered, strict=True):
                cursor.execute(sql, args)
            if commit:
                _commit_cursor(conn).execute("COMMIT")
        rows = [cursor.fetchall() for cursor in cursors]
    except dialect.loaded_dbapi.Error as exc:
        for _, _, action in items:
            action.__dict__["row"] = _ROLLED_BACK
        if commit:
            # The server skipped the COMMIT after the error; SQLAlchemy, seeing the commit
            # fail, ends its transaction without a rollback: end the server's here.
            with suppress(dialect.loaded_dbapi.Error):
                driver.rollback()  # type: ignore[union-attr]
        raise sa_exc.DBAPIError.instance(rendered[0][0], rendered[0][1], exc,
                                         dialect.loaded_dbapi.Error) from exc
    for (stmt, _, action), got in zip(items, rows, strict=True):
        action.__dict__["row"] = stmt.process(dialect, got)[0]


def _drop(conn: Connection) -> None:
    for _, _, action in conn.__dict__.pop(_QUEUED, None) or ():
        action.__dict__["row"] = _ROLLED_BACK


def _commit_cursor(conn: Connection) -> Any:
    """A second kept cursor: the enqueue's cursor holds its result until fetched."""
    pooled = conn.connection
    driver = pooled.dbapi_connection
    kept = pooled.info.get(_COMMIT_CURSOR)
    if kept is None or kept[0] is not driver:
        kept = pooled.info[_COMMIT_CURSOR] = (driver, driver.cursor())  # type: ignore[union-attr]
    return kept[1]


def _listen(engine: Engine) -> None:
    """Commit sends the queue with COMMIT; rollback drops it; any other statement on the
    connection (SAVEPOINT and its release or rollback among them) is preceded by it."""
    event.listen(engine, "commit", _on_commit)
    event.listen(engine, "rollback", _drop)
    event.listen(engine, "before_cursor_execute", _on_execute)
    _listening.add(engine)


def _on_commit(conn: Connection) -> None:
    if _QUEUED in conn.__dict__:
        send(conn, commit=True)


def _on_execute(conn: Connection, *_: Any) -> None:
    if _QUEUED in conn.__dict__:
        send(conn)
