"""SPEC §3 typed payloads: `@processor(schema=Model)` with a Pydantic model or a
dataclass checks `data` at enqueue where the processor is registered and always at the
worker, naming the field; the processor receives the model instance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel, Field

from asyncactions import (
    ConfigError,
    InvalidData,
    Status,
    admin,
    init_action,
    init_actions,
    processor,
    publish,
)
from asyncactions.events import add_rule

from .conftest import Db, drain, processor_of


class Item(BaseModel):
    sku: str
    qty: int = Field(gt=0)


class Order(BaseModel):
    order_id: int
    items: list[Item]


@dataclass
class Receipt:
    order_id: int
    email: str
    copy: bool = False


GOOD = {"order_id": 7, "items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2}]}
BAD = {"order_id": 7, "items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2},
                                {"sku": "c", "qty": 0}]}


def test_data_that_does_not_fit_a_registered_schema_is_refused_at_enqueue(db: Db) -> None:
    processor("pack", schema=Order)(print)
    processor("receipt", schema=Receipt)(print)
    add_rule(db.engine, "order.placed", "pack")
    with pytest.raises(InvalidData) as refused:
        init_action(db.engine, "pack", BAD)
    assert str(refused.value) == 'data["items"][2]["qty"]: Input should be greater than 0'
    with pytest.raises(InvalidData, match=r'^data\[1\]\["order_id"\]: '):
        init_actions(db.engine, "pack", [GOOD, {**GOOD, "order_id": "seven"}])
    with pytest.raises(InvalidData, match=r'^data\["items"\]\[2\]\["qty"\]'):
        publish(db.engine, "order.placed", BAD)
    with pytest.raises(InvalidData, match=r'^data\["email"\]: Field required$'):
        init_action(db.engine, "receipt", {"order_id": 7})
    assert db.scalar("SELECT count(*) FROM async_action") == 0


def test_a_model_or_dataclass_instance_is_stored_as_json(db: Db) -> None:
    order = Order.model_validate(GOOD)
    stored = init_action(db.engine, "unregistered", order)
    assert admin.get_action(db.engine, stored.id).data == GOOD
    receipt = init_actions(db.engine, "receipts", [Receipt(7, "a@example.com")])[0]
    assert admin.get_action(db.engine, receipt.id).data == {
        "order_id": 7, "email": "a@example.com", "copy": False}


def test_the_worker_checks_the_data_and_hands_the_processor_the_model(db: Db,
                                                                       kind: str) -> None:
    # Enqueued before the processor is registered here: only the worker can check.
    good = init_action(db.engine, "pack", GOOD)
    bad = init_action(db.engine, "pack", BAD)
    seen: list[Any] = []

    @processor_of(kind, "pack", schema=Order, retries=5)
    def pack(action: Any) -> int:
        seen.append(action.data)
        return sum(item.qty for item in action.data.items)

    drain(db)
    assert seen == [Order.model_validate(GOOD)]
    assert admin.get_action(db.engine, good.id).result == 3
    failed = admin.get_action(db.engine, bad.id)
    assert failed.status == Status.FAILED and failed.attempts == 1
    assert failed.error == 'InvalidData: data["items"][2]["qty"]: Input should be greater than 0'


def test_a_batch_processor_gets_the_fitting_actions_as_models(db: Db) -> None:
    ids = [a.id for a in init_actions(db.engine, "receipts", [
        {"order_id": 1, "email": "a@x"}, {"order_id": 2}, {"order_id": 3, "email": "c@x"}])]
    got: list[Any] = []

    @processor("receipts", schema=Receipt, batch_size=10)
    def receipts(actions: list[Any]) -> None:
        got.extend(a.data for a in actions)

    drain(db)
    assert got == [Receipt(1, "a@x"), Receipt(3, "c@x")]
    statuses = [admin.get_action(db.engine, i).status for i in ids]
    assert statuses == [Status.COMPLETED, Status.FAILED, Status.COMPLETED]


def test_a_transactional_processor_gets_the_model_too(db: Db) -> None:
    action = init_action(db.engine, "tx", {"order_id": 4, "email": "d@x"})

    @processor("tx", schema=Receipt, transactional=True)
    def tx(action: Any, session: Any) -> str:
        return type(action.data).__name__

    drain(db)
    assert admin.get_action(db.engine, action.id).result == "Receipt"


@pytest.mark.parametrize("schema", [dict, Order(order_id=1, items=[]), "Order"])
def test_a_schema_that_is_not_a_model_or_dataclass_is_refused(schema: Any) -> None:
    with pytest.raises(ConfigError, match=r"schema: must be a Pydantic model class or a "
                                          "dataclass"):
        processor("bad", schema=schema)
