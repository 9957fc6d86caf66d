"""SPEC §2 asyncactions.alembic: the queue's schema inside the application's own Alembic
setup. In-process against real databases; tests/test_into_application.py does the same
from an installed wheel with the `alembic` command."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import alembic.op
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url

import asyncactions.alembic
from asyncactions import migrate
from asyncactions.schema import metadata as queue_metadata

from .conftest import ADMIN_URL, _admin, cli


@pytest.fixture(params=["postgresql", "sqlite"])
def empty(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """A database with nothing in it, on a plain engine as an application makes one."""
    if request.param == "sqlite":
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
        yield engine
        engine.dispose()
        return
    name = f"asyncactions_app_{uuid.uuid4().hex[:10]}"
    with _admin().connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = sa.create_engine(make_url(ADMIN_URL).set(database=name))
    yield engine
    engine.dispose()
    with _admin().connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def app_metadata() -> sa.MetaData:
    """The application's own models."""
    md = sa.MetaData()
    sa.Table("customer", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("name", sa.Text, nullable=False))
    return md


def proposed(engine: sa.Engine, **opts: object) -> list[tuple]:
    """What `alembic revision --autogenerate` would propose for the application."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, **opts})
        return compare_metadata(context, app_metadata())


def test_autogenerate_proposes_nothing_about_the_queue(empty: sa.Engine) -> None:
    migrate.upgrade(empty)
    app_metadata().create_all(empty)
    with empty.begin() as conn:  # a table a later asyncactions release adds
        conn.execute(sa.text("CREATE TABLE async_action_future (event TEXT PRIMARY KEY)"))
        conn.execute(sa.text("CREATE INDEX async_action_future_idx ON async_action_future (event)"))
    # The trap: without the hook, autogenerate proposes to drop the queue.
    dropped = {d[1].name for d in proposed(empty) if d[0] == "remove_table"}
    assert {"async_action", "async_action_worker", "async_action_rule", "async_action_future",
            "asyncactions_alembic_version"} <= dropped
    assert proposed(empty, include_name=asyncactions.alembic.include_name) == []


def test_include_name_keeps_the_applications_own_tables(empty: sa.Engine) -> None:
    with empty.begin() as conn:
        conn.execute(sa.text("CREATE TABLE async_actions_log (id INTEGER PRIMARY KEY)"))
    migrate.upgrade(empty)
    diff = proposed(empty, include_name=asyncactions.alembic.include_name)
    assert [(d[0], d[1].name) for d in diff] == [("add_table", "customer"),
                                                 ("remove_table", "async_actions_log")]


def run_as_application_migration(engine: sa.Engine, migration, commit: bool = True) -> None:
    """Run `migration(op)` as the body of one of the application's own migrations."""
    with engine.connect() as conn:
        app = MigrationContext.configure(conn)
        with conn.begin() as transaction, Operations.context(app):
            migration(alembic.op)
            if not commit:
                transaction.rollback()


def test_upgrade_and_downgrade_from_an_application_migration(empty: sa.Engine) -> None:
    def upgrade(op) -> None:
        asyncactions.alembic.upgrade(op, "head")
        op.create_table("customer", sa.Column("id", sa.Integer, primary_key=True))

    run_as_application_migration(empty, upgrade)
    assert migrate.current(empty) == migrate.head()
    assert {"async_action", "async_action_worker", "customer"} <= set(sa.inspect(empty)
                                                                      .get_table_names())
    with empty.connect() as conn:  # the schema is exactly what the code queries
        context = MigrationContext.configure(conn)
        assert [d for d in compare_metadata(context, queue_metadata)
                if d[0] != "remove_table"] == []

    def downgrade(op) -> None:
        op.drop_table("customer")
        asyncactions.alembic.downgrade(op, "0002")

    run_as_application_migration(empty, downgrade)
    assert migrate.current(empty) == "0002"
    run_as_application_migration(empty, lambda op: asyncactions.alembic.downgrade(op, "base"))
    assert migrate.current(empty) is None
    assert sa.inspect(empty).get_table_names() == []  # not even the version table


def test_the_queue_schema_rolls_back_with_the_application_migration(empty: sa.Engine) -> None:
    if empty.dialect.name == "sqlite":
        pytest.skip("pysqlite commits DDL as it goes unless the application takes control")
    run_as_application_migration(empty, asyncactions.alembic.upgrade, commit=False)
    assert migrate.current(empty) is None
    assert not sa.inspect(empty).has_table("async_action")


def test_an_unknown_revision_is_refused_before_anything_runs(empty: sa.Engine) -> None:
    with pytest.raises(asyncactions.AsyncActionsError, match="unknown asyncactions revision"):
        run_as_application_migration(empty, lambda op: asyncactions.alembic.upgrade(op, "9999"))
    assert migrate.current(empty) is None


def test_db_sql_from_prints_only_what_is_new(empty: sa.Engine) -> None:
    with empty.begin() as conn:
        migrate.upgrade_on(conn, "0003")
    sql = cli("db", "sql", "--dialect", empty.dialect.name, "--from", "0003").stdout
    assert "Running upgrade 0003 -> 0004" in sql
    assert "0002 -> 0003" not in sql and "CREATE TABLE async_action " not in sql
    if empty.dialect.name == "sqlite":  # as a DBA would apply it
        with sqlite3.connect(empty.url.database) as conn:
            conn.executescript(sql)
    else:
        with empty.connect() as conn:
            conn.exec_driver_sql(sql)
            conn.commit()
    assert migrate.current(empty) == migrate.head()


def test_db_sql_from_the_newest_revision_prints_nothing() -> None:
    done = cli("db", "sql", "--from", migrate.head())
    assert done.returncode == 0 and done.stdout == ""
    assert "nothing new since" in done.stderr


def test_db_sql_from_an_unknown_revision_is_one_line() -> None:
    done = cli("db", "sql", "--from", "nope")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "unknown asyncactions revision 'nope'" in done.stderr


def test_offline_application_migrations_point_to_db_sql_from() -> None:
    offline = MigrationContext.configure(dialect_name="postgresql", opts={"as_sql": True})
    with Operations.context(offline), pytest.raises(asyncactions.AsyncActionsError,
                                                    match=r"db sql --from REV"):
        asyncactions.alembic.upgrade(alembic.op, "head")


APP_ENV_PY = """
from alembic import context

import asyncactions.alembic

context.configure(connection=context.config.attributes["connection"],
                  include_name=asyncactions.alembic.include_name)
with context.begin_transaction():
    context.run_migrations()
"""

APP_MIGRATION = """
import sqlalchemy as sa
from alembic import op

from asyncactions import migrate

revision = "a1"
down_revision = None


def upgrade():
    migrate.upgrade(op.get_bind().engine)  # the queue's own step, from inside this one
    op.create_table("customer", sa.Column("id", sa.Integer, primary_key=True))
"""


def test_migrate_upgrade_from_inside_an_application_migration_leaves_alembic_working(
        empty: sa.Engine, tmp_path: Path) -> None:
    """It used to end the application's run with KeyError: 'script' once both schemas
    were committed."""
    from alembic import command
    from alembic.config import Config

    (tmp_path / "app" / "versions").mkdir(parents=True)
    (tmp_path / "app" / "env.py").write_text(APP_ENV_PY)
    (tmp_path / "app" / "versions" / "a1.py").write_text(APP_MIGRATION)
    cfg = Config()
    cfg.set_main_option("script_location", str(tmp_path / "app"))
    with empty.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()
    assert migrate.current(empty) == migrate.head()
    assert sa.inspect(empty).has_table("customer")
    with empty.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "a1"
