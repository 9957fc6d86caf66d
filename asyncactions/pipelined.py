"""init_action(wait=False): the enqueue statement rides the caller's next round trip.

The statement init_action would run is queued on the caller's SQLAlchemy Connection
instead, and sent together with the transaction's COMMIT in one message (the commit then
costs no more round trips than before, and psycopg's own commit finds the transaction
already closed), or just before the next statement anything runs on that connection
(including SAVEPOINT and its release or rollback), so the caller's own queries, later
enqueues and savepoints see the rows in call order. A rollback drops what is queued: no
row, no notification. The statement, its checks and its encoding are init_action's own;
only when and how it is sent differs: as `EXECUTE` of the same SQL, prepared once per
connection (`PREPARE` rides the first message), its values bound by psycopg, through the
simple protocol, which carries several statements in one message. (psycopg's pipeline
mode does that too, but costs about 60 us more client CPU per transaction than it saves
on a local round trip.)
"""

from __future__ import annotations

import functools
import itertools
import re
import weakref
from contextlib import suppress
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, event
from sqlalchemy import exc as sa_exc

from .action import Action
from .database import HotStatement
from .errors import AsyncActionsError

_QUEUED = "_asyncactions_queued"  # on the Connection: [(statement, params, action), …]
# On the pooled connection: (driver connection, its ClientCursor, {SQL: prepared name}).
_PREPARED = "asyncactions.prepared_enqueues"
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
    # prepare_threshold None: a pooler in transaction mode, where a statement prepared
    # on one server connection is missing on the next.
    return not driver.autocommit and driver.prepare_threshold is not None  # type: ignore[union-attr]


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
    """Send what is queued on `conn` in one message (with COMMIT, when committing) and
    give each action its row."""
    items = conn.__dict__.pop(_QUEUED, None)
    if not items:
        return
    dialect = conn.dialect
    pooled = conn.connection
    driver = pooled.dbapi_connection
    kept = pooled.info.get(_PREPARED)
    if kept is None or kept[0] is not driver:
        kept = pooled.info[_PREPARED] = (driver, psycopg.ClientCursor(driver), {},
                                         itertools.count())
    _, cursor, prepared, numbers = kept
    statements = []
    for stmt, params, _ in items:
        sql, args = stmt.render(dialect, params)
        name = prepared.get(sql)
        if name is None:  # first use on this connection: prepared in the same message
            # Never a name used before on this connection: PREPARE is not undone by a
            # rollback, so after an error it is unknown whether one exists.
            name = prepared[sql] = f"asyncactions_enqueue_{next(numbers)}"
            statements.append(f"PREPARE {name} AS {_numbered(sql)[0]}")
        statements.append(cursor.mogrify(_numbered(sql)[1].format(name=name), args))
    if commit:
        statements.append("COMMIT")
    try:
        # The simple protocol: the statements, and the COMMIT, in one round trip. Each
        # EXECUTE runs the plan prepared once per connection; the values are bound on
        # this side by psycopg (quoted as literals).
        cursor.execute("; ".join(statements), prepare=False)
        rows = []
        while True:
            if cursor.description is not None:
                rows.append(cursor.fetchall())
            if not cursor.nextset():
                break
    except dialect.loaded_dbapi.Error as exc:
        for _, _, action in items:
            action.__dict__["row"] = _ROLLED_BACK
        prepared.clear()  # a PREPARE of this message may or may not have run
        if commit:
            # The server skipped the COMMIT after the error; SQLAlchemy, seeing the commit
            # fail, ends its transaction without a rollback: end the server's here.
            with suppress(dialect.loaded_dbapi.Error):
                driver.rollback()  # type: ignore[union-attr]
        raise sa_exc.DBAPIError.instance(statements[0], None, exc,
                                         dialect.loaded_dbapi.Error) from exc
    for (stmt, _, action), got in zip(items, rows, strict=True):
        action.__dict__["row"] = stmt.process(dialect, got)[0]


@functools.cache
def _numbered(sql: str) -> tuple[str, str]:
    """A statement SQLAlchemy rendered for psycopg (`%(name)s` parameters) as the body of
    a PREPARE (`$1`, `$2`, …) and the EXECUTE that runs it, to be formatted with the
    statement's name and then bound by psycopg."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    body = _PARAM.sub(number, sql)
    execute = "EXECUTE {name}(" + ", ".join(f"%({n})s" for n in names) + ")"
    return body, execute


_PARAM = re.compile(r"%\((\w+)\)s")


def _drop(conn: Connection) -> None:
    for _, _, action in conn.__dict__.pop(_QUEUED, None) or ():
        action.__dict__["row"] = _ROLLED_BACK


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


def _on_execute(conn: Connection, _cursor: Any, statement: str, *_: Any) -> None:
    if _QUEUED in conn.__dict__:
        send(conn)
    if statement[:10].upper().lstrip().startswith(("DISCARD", "DEALLOCATE")):
        # Our prepared statements may be gone: prepare them again (under new names).
        kept = conn.connection.info.get(_PREPARED)
        if kept is not None:
            kept[2].clear()
