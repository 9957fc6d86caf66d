"""SPEC §2 schema: the migrations build exactly the tables the code queries."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from asyncactions import init_action, migrate, processor
from asyncactions.database import describe, has_schema
from asyncactions.schema import STATUSES, metadata

from .conftest import Db, cli, drain


def test_migrated_schema_matches_the_code(db: Db) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        # Tables of the application (or other tests) sharing the database are not ours.
        diff = [d for d in compare_metadata(context, metadata)
                if not (d[0] == "remove_table" and d[1].name not in metadata.tables)]
    assert diff == []


def test_migrations_record_their_own_version_table(db: Db) -> None:
    assert db.scalar("SELECT version_num FROM asyncactions_alembic_version") == migrate.head()
    assert migrate.is_current(db.engine)


def test_downgrade_to_base_and_back(db: Db) -> None:
    migrate.downgrade(db.engine, "base")
    assert not inspect(db.engine).has_table("async_action")
    assert not has_schema(db.engine)  # what the worker and the CLI check
    assert migrate.current(db.engine) is None
    migrate.upgrade(db.engine)
    assert inspect(db.engine).has_table("async_action")
    assert has_schema(db.engine)


def _bad_status_refused(db: Db) -> str | None:
    """Insert a status outside the spec's five: the error it is refused with, if any."""
    try:
        with db.engine.begin() as conn:
            conn.execute(text("INSERT INTO async_action (processor, status) "
                              "VALUES ('p', 'exploded')"))
    except IntegrityError as exc:
        return str(exc)
    return None


def test_status_is_text_with_a_check_not_an_enum(db: Db) -> None:
    refused = _bad_status_refused(db)
    assert refused is not None, "a status outside the spec's five was accepted"
    assert "async_action_status_check" in refused or "CHECK" in refused


def test_the_status_domain_migration_keeps_every_row_and_still_refuses_a_bad_status(
        db: Db) -> None:
    """0011 moves PostgreSQL's status rule from a table CHECK to a domain (SQLite keeps
    its CHECK): rows of every status survive the upgrade and the downgrade, an action
    enqueued after it is claimed and completed, and a status outside the five is refused
    before and after."""
    migrate.downgrade(db.engine, "0010")
    with db.engine.begin() as conn:
        for status in STATUSES:
            conn.execute(text("INSERT INTO async_action (processor, status) "
                              "VALUES ('kept', :s)"), {"s": status})
    assert _bad_status_refused(db)
    migrate.upgrade(db.engine)
    assert _bad_status_refused(db)
    assert sorted(s for (s,) in db.rows("SELECT status FROM async_action")) == sorted(STATUSES)

    @processor("after_0011")
    def after_0011(action) -> None:
        pass

    action = init_action(db.engine, "after_0011", {})
    drain(db)
    assert db.scalar("SELECT status FROM async_action WHERE id = :i", i=action.id) == \
        "completed"
    migrate.downgrade(db.engine, "0010")
    assert _bad_status_refused(db)
    assert db.scalar("SELECT count(*) FROM async_action") == len(STATUSES) + 1
    migrate.upgrade(db.engine)


def test_claim_index_is_partial_on_pending(db: Db) -> None:
    indexes = {i["name"]: i for i in inspect(db.engine).get_indexes("async_action")}
    claim = indexes["async_action_claim_idx"]
    assert claim["column_names"] == ["processor", "priority", "next_eligible_at", "id"]
    where = claim.get("dialect_options", {}).get(f"{db.name}_where")
    assert where is not None and "pending" in str(where)
    assert {"async_action_related_idx", "async_action_status_finished_idx",
            "async_action_unique_key_idx"} <= set(indexes)


def test_head_is_the_newest_migration() -> None:
    assert migrate.head() == migrate.HEAD


def test_a_worker_refuses_a_schema_older_than_its_own_in_one_line(pg: Db) -> None:
    migrate.downgrade(pg.engine, "0004")
    try:
        run = cli("--database-url", pg.url, "worker", "--import", "examples.shop", "--burst",
                  timeout=60)
        workers = pg.scalar("SELECT count(*) FROM async_action_worker")
    finally:
        migrate.upgrade(pg.engine)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        f"error: DatabaseError: the database {describe(pg.engine)} is at asyncactions schema "
        f"revision 0004; this version needs {migrate.HEAD}: run `asyncactions db upgrade`, or "
        f'the application\'s migration that calls asyncactions.alembic.upgrade(op, '
        f'"{migrate.HEAD}")']
    assert workers == 0  # refused before it registered


def test_a_schema_newer_than_this_version_or_without_our_version_table_passes(pg: Db) -> None:
    with pg.engine.begin() as conn:
        conn.execute(text("UPDATE asyncactions_alembic_version SET version_num = '0099'"))
    try:
        migrate.require_current(pg.engine)  # a newer release migrated first: no refusal
        with pg.engine.begin() as conn:
            conn.execute(text("ALTER TABLE asyncactions_alembic_version RENAME TO kept"))
        migrate.require_current(pg.engine)  # nothing to tell by
    finally:
        with pg.engine.begin() as conn:
            conn.execute(text("ALTER TABLE IF EXISTS kept RENAME TO asyncactions_alembic_version"))
            conn.execute(text(f"UPDATE asyncactions_alembic_version "
                              f"SET version_num = '{migrate.HEAD}'"))
