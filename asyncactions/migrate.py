"""Alembic, driven from Python: the migrations ship inside the wheel.

Our history lives in its own version table so it sits beside the application's.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic import context as alembic_context
from alembic import op as alembic_op
from alembic.config import Config as AlembicConfig
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, MetaData, Table, text

from .database import describe, has_table, translated_errors
from .errors import AsyncActionsError, DatabaseError

VERSION_TABLE = "asyncactions_alembic_version"
# The schema this version's code needs: its newest migration (test_migrations keeps the
# two the same). Written down because reading the migrations to find it costs ~4 ms, on
# every worker's start.
HEAD = "0011"

# What to run, given the revisions the database is at (Alembic's `fn` of a migration context).
Steps = Callable[[ScriptDirectory, Any], list[Any]]


def migrations_dir() -> Path:
    packaged = Path(__file__).parent / "migrations"  # inside an installed wheel
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "migrations"


def _config(**attributes: object) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes.update(attributes)
    return cfg


def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def upgrade(engine: Engine, revision: str = "head") -> None:
    with translated_errors(engine), engine.begin() as conn:
        upgrade_on(conn, revision)


def downgrade(engine: Engine, revision: str) -> None:
    with translated_errors(engine), engine.begin() as conn:
        downgrade_on(conn, revision)


def upgrade_on(conn: Connection, revision: str = "head") -> None:
    migrate(conn, lambda script, heads: script._upgrade_revs(revision, heads))


def downgrade_on(conn: Connection, revision: str) -> None:
    """Down to `revision`; at "base" the version table goes too, so nothing is left."""
    migrate(conn, lambda script, heads: script._downgrade_revs(revision, heads))
    if revision == "base":
        Table(VERSION_TABLE, MetaData()).drop(conn, checkfirst=True)


def migrate(conn: Connection, steps: Steps) -> None:
    """Run our migrations on `conn`, inside the transaction it is in, recording them in
    our own version table. Safe inside another Alembic migration (the application's):
    Alembic's module-level `op` and `context` point back at the application's when done."""
    script = script_directory()
    context = MigrationContext.configure(conn, opts={
        "version_table": VERSION_TABLE, "script": script,
        "fn": lambda heads, _context: steps(script, heads)})
    with _alembic_proxies_kept(), Operations.context(context):
        context.run_migrations()


@contextmanager
def _alembic_proxies_kept() -> Iterator[None]:
    """Alembic's `op` and `context` are module globals that a finished migration run
    deletes: run inside the application's migration, that left its own run without them
    (a KeyError: 'script' once our schema was already committed)."""
    kept = [getattr(module, "_proxy", None) for module in (alembic_op, alembic_context)]
    try:
        yield
    finally:
        for proxy in kept:
            if proxy is not None:
                proxy._install_proxy()


def current(engine: Engine) -> str | None:
    with translated_errors(engine), engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head() -> str | None:
    return script_directory().get_current_head()


def require_current(engine: Engine) -> None:
    """Refuse, in one line, a database whose asyncactions schema is older than this
    version's: its statements would fail on missing tables and columns for ever (a
    worker would retry its claims without end). A revision this version does not know
    (a newer release migrated first, in a rolling upgrade) passes, as does a schema
    without our version table (made some other way: nothing to tell by)."""
    with translated_errors(engine), engine.connect() as conn:
        at = (conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
              if has_table(conn, VERSION_TABLE) else None)
    if at is None or at == HEAD:
        return
    if any(s.revision == at for s in script_directory().walk_revisions()):
        raise DatabaseError(
            f"the database {describe(engine)} is at asyncactions schema revision {at}; this "
            f"version needs {HEAD}: run `asyncactions db upgrade`, or the application's "
            f'migration that calls asyncactions.alembic.upgrade(op, "{HEAD}")')


def is_current(engine: Engine) -> bool:
    return current(engine) == head()


def offline_sql(dialect: str, since: str | None = None) -> str:
    """The DDL of every migration (or of those after revision `since`), for a DBA to
    review or apply by hand."""
    if since is not None:
        check_revision(since)
        if since == head():
            return ""
    buffer = io.StringIO()
    cfg = _config(dialect=dialect)
    cfg.output_buffer = buffer
    with _alembic_proxies_kept():
        command.upgrade(cfg, f"{since}:head" if since not in (None, "base") else "head",
                        sql=True)
    return buffer.getvalue()


def check_revision(revision: str) -> None:
    """Refuse, in one line, a revision that is not one of ours."""
    if revision in ("base", "head"):
        return
    try:
        found = script_directory().get_revision(revision)
    except CommandError as exc:
        found, reason = None, str(exc).splitlines()[0]
    else:
        reason = "no such revision"
    if found is None:
        revisions = [s.revision for s in script_directory().walk_revisions()][::-1]
        raise AsyncActionsError(f"unknown asyncactions revision {revision!r} ({reason}); "
                                f"revisions: base, {', '.join(revisions)}")
