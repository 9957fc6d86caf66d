"""SPEC §2 schema: the migrations build exactly the tables the code queries."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from asyncactions import migrate
from asyncactions.database import has_schema
from asyncactions.schema import metadata

from .conftest import Db


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


def test_status_is_text_with_a_check_not_an_enum(db: Db) -> None:
    from sqlalchemy.exc import IntegrityError

    try:
        with db.engine.begin() as conn:
            conn.execute(text("INSERT INTO async_action (processor, status, retries) "
                              "VALUES ('p', 'exploded', 0)"))
    except IntegrityError as exc:
        assert "async_action_status_check" in str(exc) or "CHECK" in str(exc)
    else:
        raise AssertionError("a status outside the spec's five was accepted")


def test_claim_index_is_partial_on_pending(db: Db) -> None:
    indexes = {i["name"]: i for i in inspect(db.engine).get_indexes("async_action")}
    claim = indexes["async_action_claim_idx"]
    assert claim["column_names"] == ["processor", "priority", "next_eligible_at", "id"]
    where = claim.get("dialect_options", {}).get(f"{db.name}_where")
    assert where is not None and "pending" in str(where)
    assert {"async_action_related_idx", "async_action_status_finished_idx",
            "async_action_unique_key_idx"} <= set(indexes)
