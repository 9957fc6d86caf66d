"""Engines for asyncactions' own connections, and turning driver errors into one line."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Dialect, Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement

from .errors import AsyncActionsError, ConfigError, DatabaseError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

Database = Session | Connection | Engine


@contextmanager
def connection(db: Database, *, one_statement: bool = False) -> Iterator[Connection]:
    """The connection to work on: the caller's (joining its transaction) or, for an
    Engine, a fresh one in a short transaction of its own.

    With `one_statement`, on PostgreSQL an Engine's connection runs in autocommit: a
    single statement is then its own transaction, committed (and flushed) in its own
    round trip, without the round trips of BEGIN and COMMIT."""
    if isinstance(db, Session):
        yield db.connection()
    elif isinstance(db, Connection):
        yield db
    elif isinstance(db, Engine):
        if one_statement and db.dialect.name == "postgresql":
            with db.connect() as conn:
                yield conn.execution_options(isolation_level="AUTOCOMMIT")
            return
        with db.begin() as conn:
            yield conn
    else:
        raise NotADatabase(_not_a_database(db))


class NotADatabase(AsyncActionsError, TypeError):
    """A function was given something else than the database handle it works on."""


def _not_a_database(db: object) -> str:
    kind = type(db).__name__
    if kind in ("AsyncSession", "AsyncConnection", "AsyncEngine"):
        return (f"got an {kind}: in async code use the coroutines of asyncactions.aio, "
                f"e.g. `await asyncactions.aio.init_action(session, ...)`")
    return f"db must be a SQLAlchemy Session, Connection or Engine, not {kind}"


def normalize_url(url: str) -> str:
    """Accept the URLs people paste (postgres://, postgresql://) and use psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


_HOW = "write it like postgresql://user:password@host:5432/dbname or sqlite:///path.db"


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    parsed = _checked_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_setup(create_engine(parsed, connect_args={"timeout": 30}))
    parsed, prepare = _prepare_threshold(parsed)
    # No hstore columns here: without its type lookup (a savepoint and a catalog query)
    # the first connection makes three round trips fewer.
    return create_engine(parsed, pool_size=pool_size, max_overflow=pool_size,
                         pool_pre_ping=True, use_native_hstore=False,
                         connect_args={"connect_timeout": 10, **prepare})


def make_async_engine(url: str, *, pool_size: int = 5) -> AsyncEngine:
    """The same database through SQLAlchemy's asyncio drivers (psycopg async,
    aiosqlite), set up like make_engine's: for async processors' sessions."""
    from sqlalchemy.ext.asyncio import create_async_engine  # only workers that need it

    parsed = _checked_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(parsed.set(drivername="sqlite+aiosqlite"),
                                     connect_args={"timeout": 30})
        _sqlite_setup(engine.sync_engine)
        return engine
    parsed, prepare = _prepare_threshold(parsed)
    return create_async_engine(parsed.set(drivername="postgresql+psycopg_async"),
                               pool_size=pool_size, max_overflow=pool_size,
                               pool_pre_ping=True, use_native_hstore=False,
                               connect_args={"connect_timeout": 10, **prepare})


def _checked_url(url: str) -> URL:
    try:
        parsed = make_url(normalize_url(url))
    except (sa_exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigError(f"database URL {describe(url)!r} is not a URL; {_HOW}") from None
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise ConfigError(f"database URL {describe(parsed)!r}: unsupported backend "
                          f"{parsed.get_backend_name()!r}; use postgresql or sqlite")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ConfigError(f"database URL {describe(parsed)!r}: port {parsed.port} is not "
                          f"from 1 to 65535; {_HOW}")
    return parsed


def _sqlite_setup(engine: Engine) -> Engine:
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _prepare_threshold(url: URL) -> tuple[URL, dict[str, int | None]]:
    """`?prepare_threshold=none` (psycopg's own name): through a pooler in transaction mode
    (PgBouncer before 1.21) a statement prepared on one server connection is missing on
    the next, so psycopg must not prepare any."""
    if "prepare_threshold" not in url.query:
        return url, {}
    raw = url.query["prepare_threshold"]
    value = raw[-1] if isinstance(raw, tuple) else raw
    rest = url.difference_update_query(["prepare_threshold"])
    if value.strip().lower() in ("none", ""):
        return rest, {"prepare_threshold": None}
    if value.strip().isdigit():
        return rest, {"prepare_threshold": int(value)}
    raise ConfigError(f"database URL {describe(url)!r}: prepare_threshold={value!r} must be "
                      "none (never prepare: for PgBouncer in transaction mode) or a whole "
                      "number of executions")


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


def describe(engine_or_url: Engine | URL | str) -> str:
    """The URL to show people: never with its password, even when it does not parse."""
    if isinstance(engine_or_url, Engine):
        engine_or_url = engine_or_url.url
    if isinstance(engine_or_url, str):
        try:
            engine_or_url = make_url(engine_or_url)
        except (sa_exc.ArgumentError, ValueError):
            return _hide_password(engine_or_url)
    return engine_or_url.render_as_string(hide_password=True)


def _hide_password(url: str) -> str:
    """user:PASSWORD@host in text that is not a URL: everything from the user's colon
    to the last @ goes (too much rather than too little)."""
    head, at, rest = url.rpartition("@")
    scheme, slashes, userinfo = head.rpartition("://")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{slashes}{userinfo.split(':', 1)[0]}:***@{rest}"


def is_disconnect(exc: sa_exc.DBAPIError) -> bool:
    """Whether the error is about the connection (worth waiting out and retrying), not
    about the statement or its values (which would fail again the same way)."""
    return exc.connection_invalidated or isinstance(
        exc, sa_exc.OperationalError | sa_exc.InterfaceError)


# The server is there but cannot take us now: too many connections, starting up.
BUSY_STATES = frozenset({"53300", "57P03"})


def busy_state(exc: sa_exc.DBAPIError) -> str | None:
    """The SQLSTATE of a server that answered 'not now', else None. (psycopg reports a
    refused connection attempt without one, so the message is read too.)"""
    state = getattr(exc.orig, "sqlstate", None)
    if state in BUSY_STATES:
        return state
    text = str(exc.orig)
    if "too many clients" in text or "connection slots are reserved" in text:
        return "53300"
    return "57P03" if "the database system is starting up" in text else None


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
        error = DatabaseError(f"cannot use the database {describe(engine)}: "
                              f"{first_line(exc)}; check --database-url / "
                              "ASYNCACTIONS_DATABASE_URL and that the server is running")
        error.connection, error.sqlstate = True, busy_state(exc)
        raise error from None
    except sa_exc.DatabaseError as exc:  # e.g. SQLite's "file is not a database"
        if type(exc) is not sa_exc.DatabaseError:  # integrity, programming...: the caller's
            raise
        raise DatabaseError(f"cannot use the database {describe(engine)}: {first_line(exc)}; "
                            "check that --database-url / ASYNCACTIONS_DATABASE_URL names an "
                            "asyncactions database") from None


def missing_sqlite_file(engine: Engine) -> str | None:
    """The path of an SQLite database file that does not exist (connecting would create
    it), else None."""
    url = engine.url
    path = url.database
    if url.get_backend_name() != "sqlite" or not path or path == ":memory:" \
            or path.startswith("file:") or url.query.get("uri"):
        return None
    return None if Path(path).exists() else path


def require_file(engine: Engine) -> None:
    """Commands that only read must not leave an empty database file behind a typo."""
    path = missing_sqlite_file(engine)
    if path is not None:
        raise DatabaseError(f"no database file at {path}: run `asyncactions db upgrade` first "
                            "(it creates one), or check --database-url / "
                            "ASYNCACTIONS_DATABASE_URL")


# Whether the queue's table is there, by one catalog lookup: SQLAlchemy's inspector
# first compiles a reflection query (6.9 against 0.7 ms, on every worker's start).
_HAS_TABLE = {
    "postgresql": text("SELECT to_regclass(:name) IS NOT NULL"),
    "sqlite": text("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' "
                   "AND name = :name"),
}


def has_table(conn: Connection, name: str) -> bool:
    return bool(conn.execute(_HAS_TABLE[conn.dialect.name], {"name": name}).scalar())


def has_schema(engine: Engine) -> bool:
    if missing_sqlite_file(engine) is not None:
        return False
    with translated_errors(engine), engine.connect() as conn:
        return has_table(conn, "async_action")


def require_schema(engine: Engine) -> None:
    require_file(engine)
    if not has_schema(engine):
        raise DatabaseError(f"the database {describe(engine)} has no async_action table; run "
                            "`asyncactions db upgrade` first")


class KeptConnection:
    """One connection kept for a loop's whole life: no pool checkout or ping per use.

    After a database error it is thrown away and the next use connects afresh, so a
    loop survives terminated backends and server restarts.
    """

    def __init__(self, engine: Engine, *setup: str, single_statements: bool = False,
                 on_connect: Callable[[Connection], None] | None = None) -> None:
        self._engine = engine
        self._setup = setup  # statements run once per new connection
        self._on_connect = on_connect  # then this, once per new connection
        # On PostgreSQL a unit of one statement needs no BEGIN and COMMIT round trips:
        # the statement is its own transaction. (SQLite has no round trips to save.)
        self._autocommit = single_statements and engine.dialect.name == "postgresql"
        self._conn: Connection | None = None

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        if self._conn is None:
            self._conn = self._connect()
        try:
            with self._conn.begin():
                yield self._conn
        except sa_exc.DBAPIError:
            self.close()
            raise

    def _connect(self) -> Connection:
        """A new connection, used only once its setup statements have all run: one whose
        setup failed (LISTEN, session settings) is thrown away, and the next use tries
        again."""
        conn = self._engine.connect()
        try:
            if self._autocommit:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for statement in self._setup:
                conn.exec_driver_sql(statement)
            if self._on_connect is not None:
                self._on_connect(conn)
            conn.commit()
        except BaseException:
            with suppress(sa_exc.SQLAlchemyError):
                conn.invalidate()
                conn.close()
            raise
        return conn

    @property
    def driver(self) -> Any:
        """The driver's own connection, or None while not connected."""
        return None if self._conn is None else self._conn.connection.driver_connection

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except sa_exc.SQLAlchemyError:
                pass
            self._conn = None


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...] | None  # parameter order, for positional drivers
    construct: Callable[[Mapping[str, Any]], dict[str, Any]]
    bind: dict[str, Callable[[Any], Any]]
    results: tuple[Callable[[Any], Any] | None, ...] | None  # None: rows as fetched


class HotStatement:
    """A Core statement compiled once per dialect and run on the driver's own cursor.

    For the statements a worker or an application runs for every action (enqueue one,
    claim, record outcomes): SQLAlchemy's work per execution costs as much as a local
    round trip (a claim: 0.77 ms through SQLAlchemy, 0.49 ms this way). Same SQL, same
    transaction, same value conversions, and errors raised as SQLAlchemy's DBAPIError;
    only SQLAlchemy's statement events do not see it.

    `binary`: rows come back in PostgreSQL's binary format (psycopg), for a statement that
    returns many timestamps (a claim's rows, in UTC: ~3.4 us each instead of ~4.4 as text).
    """

    def __init__(self, statement: ClauseElement, *, binary: bool = False) -> None:
        self.statement = statement
        self.binary = binary
        self._compiled: dict[tuple[str, str], _Compiled] = {}

    def render(self, dialect: Dialect, params: Mapping[str, Any]) -> tuple[str, Any]:
        """The SQL and the driver's arguments, as rows() sends them."""
        compiled = self._for(dialect)
        return compiled.sql, self._args(compiled, params)

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        dialect = conn.dialect
        compiled = self._for(dialect)
        sql, args = compiled.sql, self._args(compiled, params)
        if not conn.in_transaction():
            conn.begin()  # as SQLAlchemy's autobegin would: the caller commits
        cursor = kept_cursor(conn, self.binary)
        try:
            cursor.execute(sql, args)
            rows = cursor.fetchall()  # every hot statement returns rows
        except dialect.loaded_dbapi.Error as exc:
            raise sa_exc.DBAPIError.instance(sql, args, exc,
                                             dialect.loaded_dbapi.Error) from exc
        return self.process(dialect, rows)

    def process(self, dialect: Dialect, rows: list[Any]) -> list[tuple[Any, ...]]:
        """The driver's rows with SQLAlchemy's result conversions, as rows() returns them
        (for rows fetched elsewhere: a statement sent in a pipeline)."""
        results = self._for(dialect).results
        if results is not None:
            rows = [tuple(v if p is None else p(v) for p, v in zip(results, row, strict=True))
                    for row in rows]
        return rows

    @staticmethod
    def _args(compiled: _Compiled, params: Mapping[str, Any]) -> Any:
        values = compiled.construct(params)
        for name, process in compiled.bind.items():
            values[name] = process(values[name])
        return values if compiled.names is None else [values[n] for n in compiled.names]

    def _for(self, dialect: Dialect) -> _Compiled:
        return self._compiled.get((dialect.name, dialect.driver)) or self._compile(dialect)

    def _compile(self, dialect: Dialect) -> _Compiled:
        compiled = self.statement.compile(dialect=dialect)
        if compiled.post_compile_params or compiled.literal_execute_params:
            raise TypeError("a HotStatement cannot have expanding parameters")
        bind = {}
        for param, name in compiled.bind_names.items():
            process = param.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                bind[name] = process
        results = tuple(col.type.dialect_impl(dialect).result_processor(dialect, None)
                        for col in getattr(self.statement, "exported_columns", ()))
        entry = _Compiled(compiled.string,
                          tuple(compiled.positiontup or ()) if compiled.positional else None,
                          _constructor(compiled), bind, results if any(results) else None)
        self._compiled[(dialect.name, dialect.driver)] = entry
        return entry


def _constructor(compiled: Any) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """compiled.construct_params for the common shape (every parameter named by its key,
    or a fixed value), as a dict lookup per parameter: SQLAlchemy's general version costs
    a few microseconds per call, a tenth of an enqueue's Python time. Anything else, and
    a missing parameter (for SQLAlchemy's own error), goes to construct_params."""
    general = compiled.construct_params
    if compiled.escaped_bind_names:
        return general
    given: list[tuple[str, str]] = []
    fixed: list[tuple[str, str, Any]] = []
    for param, name in compiled.bind_names.items():
        if param.callable is not None or param.expanding or param.isoutparam:
            return general
        if param.required:
            given.append((name, param.key))
        else:
            fixed.append((name, param.key, param.value))

    def construct(params: Mapping[str, Any]) -> dict[str, Any]:
        try:
            values = {name: params[key] for name, key in given}
        except KeyError:
            return general(params)
        for name, key, value in fixed:
            values[name] = params.get(key, value)
        return values

    return construct


_CURSORS = ("asyncactions.cursor", "asyncactions.binary_cursor")


def kept_cursor(conn: Connection, binary: bool = False) -> Any:
    """The driver's cursor for `conn`, one per driver connection (and format), kept with
    it in the pool: a new psycopg cursor costs about 0.1 ms when the CPU has been idle,
    which is what a worker waking for a single action, or an enqueue after a pause,
    would pay on every statement. `binary`: results in binary format where the driver
    is psycopg's (elsewhere the driver's only kind)."""
    pooled = conn.connection
    driver = pooled.dbapi_connection
    binary = binary and conn.dialect.driver == "psycopg" and not conn.dialect.is_async
    key = _CURSORS[binary]
    # Kept with its connection: SQLAlchemy's asyncio adapters' cursors do not say
    # which connection they belong to.
    kept = pooled.info.get(key)
    if kept is None or kept[0] is not driver:
        cursor = driver.cursor(binary=True) if binary else driver.cursor()  # type: ignore[union-attr]
        kept = pooled.info[key] = (driver, cursor)
    return kept[1]
