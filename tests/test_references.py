"""SPEC §3 references: an ORM instance inside `data` is stored as {"$ref": "module:Class",
"pk": …}, never copied, and loaded again on the worker (in the transactional processor's
session, or a short one of its own); a row that is gone fails the action for good."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from asyncactions import Status, UnserializableData, admin, init_action, processor

from .conftest import Db, drain, processor_of


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "test_customer"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class Ghost(Base):
    """Mapped here, but its module is one a worker cannot import."""
    __tablename__ = "test_ghost"
    id: Mapped[int] = mapped_column(primary_key=True)


Ghost.__module__ = "no_such_module"
REF = f"{__name__}:Customer"


@pytest.fixture
def customers(db: Db) -> Iterator[Db]:
    Base.metadata.create_all(db.engine)
    yield db
    Base.metadata.drop_all(db.engine)


def stored_data(db: Db, action_id: int) -> Any:
    value = db.scalar("SELECT data FROM async_action WHERE id = :id", id=action_id)
    return json.loads(value) if isinstance(value, str) else value


def test_an_orm_instance_is_stored_as_a_reference_and_loaded_on_the_worker(
        customers: Db, kind: str) -> None:
    db = customers
    with Session(db.engine) as session, session.begin():
        ada = Customer(name="Ada")
        session.add(ada)  # not flushed yet: enqueue flushes it for its primary key
        action = init_action(session, "greet", {"customer": ada, "via": ["mail", ada]})
        pk = ada.id
    assert stored_data(db, action.id) == {
        "customer": {"$ref": REF, "pk": pk}, "via": ["mail", {"$ref": REF, "pk": pk}]}
    with Session(db.engine) as session, session.begin():
        session.get(Customer, pk).name = "Ada L."  # loaded again, not copied

    @processor_of(kind, "greet")
    def greet(action: Any) -> str:
        assert isinstance(action.data["via"][1], Customer)
        return f"hello {action.data['customer'].name}"

    drain(db)
    assert admin.get_action(db.engine, action.id).result == "hello Ada L."


def test_a_transactional_processor_loads_references_in_its_own_session(
        customers: Db) -> None:
    db = customers
    with Session(db.engine) as session, session.begin():
        bob = Customer(name="Bob")
        session.add(bob)
        session.flush()
        action = init_action(session, "rename", {"customer": bob})

    @processor("rename", transactional=True)
    def rename(action: Any, session: Session) -> None:
        customer = action.data["customer"]
        assert customer in session
        customer.name = "Robert"  # committed with the outcome

    drain(db)
    assert admin.get_action(db.engine, action.id).status == Status.COMPLETED
    assert db.scalar("SELECT name FROM test_customer") == "Robert"


def test_a_deleted_row_fails_the_action_for_good_naming_class_and_pk(customers: Db) -> None:
    db = customers
    with Session(db.engine) as session, session.begin():
        eve = Customer(id=41, name="Eve")
        session.add(eve)
        session.flush()
        action = init_action(session, "greet", {"customer": eve})
        session.delete(eve)
    ran: list[Any] = []
    processor("greet", retries=5)(ran.append)
    drain(db)
    failed = admin.get_action(db.engine, action.id)
    assert ran == [] and failed.status == Status.FAILED and failed.attempts == 1
    assert failed.error == (f'MissingReference: data["customer"]: {REF} with pk 41 no longer '
                            "exists; it was deleted after the action was enqueued")


def test_a_reference_to_a_class_that_does_not_import_fails_clearly(customers: Db) -> None:
    db = customers
    with Session(db.engine) as session, session.begin():
        ghost = Ghost(id=1)
        session.add(ghost)
        action = init_action(session, "haunt", [ghost])
    processor("haunt")(print)
    drain(db)
    failed = admin.get_action(db.engine, action.id)
    assert failed.status == Status.FAILED
    assert failed.error.startswith("MissingReference: data[0]: the reference to "
                                   "'no_such_module:Ghost' does not import (")


def test_a_reference_shaped_object_from_the_user_is_refused(db: Db) -> None:
    with pytest.raises(UnserializableData, match=r'^data\["x"\]: \{"\$ref": …, "pk": …\} is '
                                                 "reserved"):
        init_action(db.engine, "p", {"x": {"$ref": "shop:User", "pk": 1}})
    init_action(db.engine, "p", {"x": {"$ref": "shop:User", "pk": 1, "note": "mine"}})


def test_an_instance_without_a_primary_key_is_refused(db: Db) -> None:
    with pytest.raises(UnserializableData, match=r'^data\["c"\]: a Customer that is not in '
                                                 "the database yet"):
        init_action(db.engine, "p", {"c": Customer(name="nobody")})
    assert db.scalar("SELECT count(*) FROM async_action") == 0
