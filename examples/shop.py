"""A small shop that uses asyncactions as its outbox.

    python -m examples.shop                          # place a few orders (enqueues actions)
    asyncactions worker --import examples.shop --burst   # process them

Each order row and its follow-up actions are written in one transaction: the
order that is rolled back below leaves no action behind.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from decimal import Decimal

from sqlalchemy import Column, Integer, MetaData, Numeric, Table, Text, insert
from sqlalchemy.orm import Session

from asyncactions import Action, Defer, PermanentFailure, init_action, processor
from asyncactions.config import load_config
from asyncactions.database import make_engine
from asyncactions.migrate import upgrade

shop = MetaData()
orders = Table("shop_order", shop,
               Column("id", Integer, primary_key=True),
               Column("email", Text),
               Column("total", Numeric(10, 2), nullable=False))


def say(line: str) -> None:
    sys.stdout.write(f"  {line}\n")  # one write per line: workers print from many threads


@processor("send_welcome_email", retries=3, retry_interval=timedelta(seconds=0))
def send_welcome_email(action: Action) -> dict[str, str]:
    email = action.data["email"]
    if not email:
        say(f"[mail] order {action.data['order_id']}: no email address, giving up")
        raise PermanentFailure("customer has no email address")
    say(f"[mail] Welcome email sent to {email}")
    return {"sent_to": email}


@processor("sync_invoice", retries=2, retry_interval=timedelta(seconds=0))
def sync_invoice(action: Action) -> dict[str, str]:
    # The accounting API times out on the first try, as real ones do.
    if action.attempts == 1:
        say(f"[invoice] order {action.data['order_id']}: accounting API timed out")
        raise TimeoutError("accounting API did not answer within 10s")
    total: Decimal = action.data["total"]
    say(f"[invoice] order {action.data['order_id']}: invoice for {total} EUR synced")
    return {"invoice": f"INV-{action.data['order_id']:05d}", "total": total}


@processor("notify_warehouse", retries=3)
def notify_warehouse(action: Action) -> None:
    if action.attempts == 1:
        say(f"[warehouse] order {action.data['order_id']}: warehouse busy, deferring")
        raise Defer(timedelta(0))
    say(f"[warehouse] order {action.data['order_id']}: picking list printed")


@processor("daily_sales_report", retries=1)
def daily_sales_report(action: Action) -> dict[str, str]:
    """Enqueued every morning by [schedules.daily_sales_report] in config/asyncactions.toml."""
    say(f"[report] sales report for {action.created_at:%Y-%m-%d} sent to the team")
    return {"report": "sent"}


def place_order(session: Session, email: str | None, total: str) -> int:
    order_id = session.execute(insert(orders).values(email=email, total=Decimal(total))
                               .returning(orders.c.id)).scalar_one()
    related = f"order:{order_id}"
    init_action(session, "send_welcome_email", {"order_id": order_id, "email": email},
                related_id=related)
    init_action(session, "sync_invoice", {"order_id": order_id, "total": Decimal(total)},
                related_id=related)
    init_action(session, "notify_warehouse", {"order_id": order_id}, related_id=related)
    return order_id


def main() -> None:
    engine = make_engine(load_config().effective_database_url)
    upgrade(engine)
    shop.create_all(engine)
    for email, total in [("ada@example.com", "42.00"), ("grace@example.com", "19.90"),
                         (None, "7.50")]:
        with Session(engine) as session, session.begin():
            order_id = place_order(session, email, total)
        print(f"placed order {order_id} ({total} EUR) with 3 actions")
    with Session(engine) as session, session.begin():
        place_order(session, "eve@example.com", "99.00")
        session.rollback()  # payment declined: the order and its actions never existed
    print("rolled back one order: it left no actions")


if __name__ == "__main__":
    main()
