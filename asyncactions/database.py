"""Engines for asyncactions' own connections, and turning driver errors into one line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from .errors import ConfigError, DatabaseError


def normalize_url(url: str) -> str:
    """Accept the URLs people paste (postgres://, postgresql://) and use psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    try:
        parsed = make_url(normalize_url(url))
    except sa_exc.ArgumentError:
        raise ConfigError(f"database URL {url!r} is not a URL; write it like "
                          "postgresql://user@host/dbname or sqlite:///path.db") from None
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise ConfigError(f"database URL {parsed.render_as_string()!r}: unsupported backend "
                          f"{parsed.get_backend_name()!r}; use postgresql or sqlite")
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return create_engine(parsed, pool_size=pool_size, max_overflow=pool_size,
                         pool_pre_ping=True, connect_args={"connect_timeout": 10})


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Take transaction control from pysqlite so BEGIN IMMEDIATE below is what runs.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_on_begin(conn: Any) -> None:
    # Take the write lock up front: a deferred transaction that reads and then writes
    # can fail with "database is locked" instead of waiting its turn.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def describe(engine_or_url: Engine | str) -> str:
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(engine_or_url)
    return url.render_as_string(hide_password=True)


def first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


@contextmanager
def translated_errors(engine: Engine) -> Iterator[None]:
    """Turn 'cannot connect' into a DatabaseError with one line and a hint."""
    try:
        yield
    except sa_exc.OperationalError as exc:
        raise DatabaseError(f"cannot use the database {describe(engine)}: {first_line(exc)}; "
                            "check --database-url / ASYNCACTIONS_DATABASE_URL and that the "
                            "server is running") from None


def has_schema(engine: Engine) -> bool:
    with translated_errors(engine), engine.connect() as conn:
        return inspect(conn).has_table("async_action")


def require_schema(engine: Engine) -> None:
    if not has_schema(engine):
        raise DatabaseError(f"the database {describe(engine)} has no async_action table; run "
                            "`asyncactions db upgrade` first")


class KeptConnection:
    """One connection kept for a loop's whole life: no pool checkout or ping per use.

    After a database error it is thrown away and the next use connects afresh, so a
    loop survives terminated backends and server restarts.
    """

    def __init__(self, engine: Engine, *setup: str, single_statements: bool = False) -> None:
        self._engine = engine
        self._setup = setup  # statements run once per new connection
        # On PostgreSQL a unit of one statement needs no BEGIN and COMMIT round trips:
        # the statement is its own transaction. (SQLite has no round trips to save.)
        self._autocommit = single_statements and engine.dialect.name == "postgresql"
        self._conn: Connection | None = None

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        if self._conn is None:
            self._conn = self._engine.connect()
            if self._autocommit:
                self._conn = self._conn.execution_options(isolation_level="AUTOCOMMIT")
            for statement in self._setup:
                self._conn.exec_driver_sql(statement)
            self._conn.commit()
        try:
            with self._conn.begin():
                yield self._conn
        except sa_exc.DBAPIError:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except sa_exc.SQLAlchemyError:
                pass
            self._conn = None
