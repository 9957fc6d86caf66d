"""An asyncio web shop (Starlette, SQLAlchemy's AsyncSession) with async processors.

    pip install 'asyncactions[examples]'
    python -m examples.aio_shop --port 8000                  # the web service
    asyncactions worker --import examples.aio_shop           # its worker

    curl -X POST localhost:8000/orders -d '{"email": "ada@example.com", "items": ["tea"]}'
    curl 'localhost:8000/actions/1?wait=10'                   # waits for the receipt

`POST /orders` writes the order and enqueues its follow-ups in one AsyncSession
transaction: a declined card rolls all of it back, and no worker hears of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

from sqlalchemy import Column, Integer, MetaData, Table, Text, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asyncactions import Action, ActionNotFound, aio, processor
from asyncactions.config import load_config
from asyncactions.database import make_engine
from asyncactions.migrate import upgrade

shop = MetaData()
orders = Table("web_order", shop,
               Column("id", Integer, primary_key=True),
               Column("email", Text, nullable=False),
               Column("status", Text, nullable=False))


# --- the processors: async def, run on the worker's event loop ---------------------------

@processor("send_receipt", retries=3)
async def send_receipt(action: Action) -> dict[str, str]:
    await asyncio.sleep(0.01)  # an HTTP call to the mail service, say
    return {"sent_to": action.data["email"]}


@processor("reserve_stock", batch_size=50)
async def reserve_stock(actions: list[Action]) -> None:
    await asyncio.sleep(0.01)  # one call to the warehouse for the whole batch


@processor("confirm_order", transactional=True)
async def confirm_order(action: Action, session: AsyncSession) -> str:
    # Commits together with this action's completion, or not at all.
    await session.execute(update(orders).where(orders.c.id == action.data["order_id"])
                          .values(status="confirmed"))
    return "confirmed"


# --- the web service -----------------------------------------------------------------------

class PaymentDeclined(Exception):
    pass


async def place_order(request: Request) -> JSONResponse:
    body = await request.json()
    if not isinstance(body, dict) or not isinstance(body.get("email"), str):
        return JSONResponse({"error": "send {\"email\": \"...\", \"items\": [...]}"}, 400)
    items = [str(item) for item in body.get("items", [])]
    try:
        async with AsyncSession(request.app.state.engine) as session, session.begin():
            order_id = (await session.execute(
                insert(orders).values(email=body["email"], status="placed")
                .returning(orders.c.id))).scalar_one()
            related = f"order:{order_id}"
            receipt = await aio.init_action(session, "send_receipt",
                                            {"order_id": order_id, "email": body["email"]},
                                            related_id=related)
            await aio.init_actions(session, "reserve_stock",
                                   [{"order_id": order_id, "item": i} for i in items],
                                   related_id=related)
            await aio.init_action(session, "confirm_order", {"order_id": order_id},
                                  related_id=related)
            if body.get("card") == "declined":
                raise PaymentDeclined  # rolls back the order and its actions
    except PaymentDeclined:
        return JSONResponse({"error": "payment declined: nothing was ordered"}, 402)
    return JSONResponse({"order": order_id, "receipt": receipt.id}, 201)


async def show_order(request: Request) -> JSONResponse:
    async with request.app.state.engine.connect() as conn:
        row = (await conn.execute(select(orders).where(
            orders.c.id == request.path_params["id"]))).first()
    if row is None:
        return JSONResponse({"error": "no such order"}, 404)
    return JSONResponse({"order": row.id, "email": row.email, "status": row.status})


async def show_action(request: Request) -> JSONResponse:
    """`?wait=N` waits up to N seconds for the action to finish (LISTEN on PostgreSQL)."""
    engine, action_id = request.app.state.engine, request.path_params["id"]
    try:
        wait = float(request.query_params.get("wait", 0))
        action = (await aio.wait_for(engine, action_id, timeout=wait) if wait > 0
                  else await aio.get_action(engine, action_id))
    except ActionNotFound as exc:
        return JSONResponse({"error": str(exc)}, 404)
    except TimeoutError as exc:
        return JSONResponse({"error": str(exc)}, 408)
    except ValueError:
        return JSONResponse({"error": "wait must be a number of seconds"}, 400)
    return JSONResponse({"action": action.id, "processor": action.processor,
                         "status": action.status, "result": action.result})


def async_engine(url: str) -> AsyncEngine:
    """The application's engine: the same database through SQLAlchemy's asyncio drivers."""
    parsed = make_url(url)
    driver = "sqlite+aiosqlite" if parsed.get_backend_name() == "sqlite" \
        else "postgresql+psycopg"
    return create_async_engine(parsed.set(drivername=driver))


def create_app(url: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.engine = async_engine(url)
        yield
        await app.state.engine.dispose()

    return Starlette(routes=[Route("/orders", place_order, methods=["POST"]),
                             Route("/orders/{id:int}", show_order),
                             Route("/actions/{id}", show_action)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    url = load_config().effective_database_url
    engine = make_engine(url)
    upgrade(engine)  # asyncactions' tables (`asyncactions db upgrade` does the same)
    shop.create_all(engine)
    engine.dispose()
    uvicorn.run(create_app(url), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
