"""The HTTP API of SPEC §7, under /api/v1. Answers are the CLI's JSON."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import admin, audit, codec, events, reports
from .. import processors as registry
from ..action import Action
from ..config import check_payload, check_text
from ..durations import parse_duration
from ..enqueue import init_action
from ..errors import ActionNotFound, AsyncActionsError, ConfigError, UnknownProcessor
from ..output import json_row
from ..schema import NOW
from .app import BadInput, Caller, Conflict, Context, JSONAnswer, error

MAX_LIST = 1000
MAX_WAIT = timedelta(minutes=5)
ENQUEUE_FIELDS = ("processor", "data", "related_id", "delay", "priority", "unique_key",
                  "ordering_key", "retries")


def action_json(action: Action, now: Any) -> dict[str, Any]:
    """The action as `show --format json` prints it, plus its human name."""
    return {"id": action.id, "name": action.display_id,
            **json_row(reports.show(action, now))}


def _now(ctx: Context) -> Any:
    return audit.db_clock(ctx.engine)


def duration(value: str | None, name: str, *, default: str | None = None,
             maximum: timedelta | None = None) -> timedelta | None:
    value = value if value is not None else default
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadInput(name, f"{value!r} is not a duration; write it like 500ms, 30s, 5m")
    try:
        parsed = parse_duration(value, what=name)
    except ConfigError as exc:
        raise BadInput(name, str(exc).split(": ", 1)[1]) from None
    if maximum is not None and parsed > maximum:
        raise BadInput(name, f"{value!r} is longer than the maximum of {maximum}")
    return parsed


def integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, str):
        value = int(value) if value.strip().lstrip("-").isdigit() and len(value) < 30 \
            else value
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = repr(value) if len(repr(value)) < 40 else "that value"
        raise BadInput(name, f"{shown} is not a whole number from {low} to {high}")
    return value


def text(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadInput(name, f"must be a string, got {type(value).__name__}")
    try:
        return check_text(value, name)
    except ConfigError as exc:
        raise BadInput(name, str(exc).split(": ", 1)[-1]) from None


def flag(value: str | None, name: str) -> bool:
    if value is None or value.lower() in ("false", "0", "no", ""):
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    raise BadInput(name, f"{value!r} is not true or false")


async def json_body(request: Request, *, required: bool = True) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if required:
            raise BadInput("body", "empty; send a JSON object")
        return {}
    try:
        body = codec.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, *codec.MALFORMED) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise BadInput("body", f"not valid JSON ({reason})") from None
    if not isinstance(body, dict):
        raise BadInput("body", f"must be a JSON object, got {type(body).__name__}")
    return body


def action_filter(request: Request) -> tuple[audit.Filter, int, int | None]:
    """status, processor, related_id, since, limit, before from the query string."""
    q = request.query_params
    statuses: tuple[str, ...] = ()
    if q.get("status"):
        try:
            statuses = audit.parse_statuses(q["status"])
        except AsyncActionsError as exc:
            raise BadInput("status", str(exc)) from None
    limit = integer(q.get("limit", "50"), "limit", 1, MAX_LIST)
    before = None
    if q.get("before"):
        try:
            before = admin.parse_id(q["before"])
        except ActionNotFound as exc:
            raise BadInput("before", str(exc)) from None
    where = audit.Filter(statuses, text(q.get("processor") or None, "processor"),
                         text(q.get("related_id") or None, "related_id"),
                         duration(q.get("since") or None, "since"))
    return where, limit, before


# --- handlers ----------------------------------------------------------------------

async def enqueue(request: Request, ctx: Context, _caller: Caller) -> Response:
    q = request.query_params
    blocking = flag(q.get("blocking"), "blocking")
    timeout = duration(q.get("timeout"), "timeout", default="30s", maximum=MAX_WAIT)
    body = await json_body(request)
    unknown = sorted(set(body) - set(ENQUEUE_FIELDS))
    if unknown:
        raise BadInput(unknown[0], f"unknown field; allowed: {', '.join(ENQUEUE_FIELDS)}")
    if "processor" not in body:
        raise BadInput("processor", "required; name the processor to run")
    processor = text(body["processor"], "processor")
    if not processor:
        raise BadInput("processor", "must not be empty")
    data = body.get("data")
    try:
        check_payload(data, "data", ctx.config.max_data_bytes)
    except ConfigError as exc:
        raise BadInput("data", str(exc)) from None
    options: dict[str, Any] = {
        "related_id": text(body.get("related_id"), "related_id"),
        "delay": duration(body.get("delay"), "delay"),
        "priority": integer(body.get("priority", 0), "priority", -32768, 32767),
        "unique_key": text(body.get("unique_key"), "unique_key"),
        "retries": None if body.get("retries") is None
        else integer(body["retries"], "retries", 0, registry.MAX_RETRIES),
    }
    options["ordering_key"] = text(body.get("ordering_key"), "ordering_key")

    def run() -> Action:
        reports.check_processor_known(ctx.config, ctx.engine, processor)
        return init_action(ctx.engine, processor, data,
                           max_data_bytes=ctx.config.max_data_bytes, **options)

    action = await run_in_threadpool(run)
    status = 202
    now = await run_in_threadpool(_now, ctx)
    # An action not eligible before the timeout cannot end within it: no point waiting.
    if blocking and timeout is not None and action.next_eligible_at <= now + timeout:
        seconds = timeout.total_seconds()
        final = None
        with anyio.move_on_after(seconds + 1):  # also when every waiting thread is taken
            with contextlib.suppress(TimeoutError):
                final = await anyio.to_thread.run_sync(admin.wait_for, ctx.engine, action.id,
                                                       seconds, limiter=ctx.waits)
        if final is not None:
            action, status = final, 200
        else:
            action = await run_in_threadpool(admin.get_action, ctx.engine, action.id)
        now = await run_in_threadpool(_now, ctx)
    return JSONAnswer(action_json(action, now), status_code=status)


async def list_actions(request: Request, ctx: Context, _caller: Caller) -> Response:
    where, limit, before = action_filter(request)

    def run() -> tuple[list[Action], Any]:
        return audit.list_actions(ctx.engine, where, limit=limit, before=before), _now(ctx)

    actions, now = await run_in_threadpool(run)
    return JSONAnswer({"actions": [action_json(a, now) for a in actions],
                       "next": actions[-1].id if len(actions) == limit else None})


async def get_action(request: Request, ctx: Context, _caller: Caller) -> Response:
    def run() -> tuple[Action, Any]:
        return admin.get_action(ctx.engine, request.path_params["id"]), _now(ctx)

    action, now = await run_in_threadpool(run)
    return JSONAnswer(action_json(action, now))


def transition(verb: str) -> Callable[[Request, Context, Caller], Any]:
    async def handler(request: Request, ctx: Context, _caller: Caller) -> Response:
        options: dict[str, Any] = {}
        if verb == "retry":
            body = await json_body(request, required=False)
            unknown = sorted(set(body) - {"retries"})
            if unknown:
                raise BadInput(unknown[0], "unknown field; allowed: retries")
            if body.get("retries") is not None:
                options["retries"] = integer(body["retries"], "retries", 0,
                                             registry.MAX_RETRIES)

        def run() -> tuple[Action, Any]:
            action_id = admin.parse_id(request.path_params["id"])
            change = admin.retry if verb == "retry" else admin.cancel
            try:
                action = change(ctx.engine, action_id, **options)
            except ActionNotFound:
                raise
            except AsyncActionsError as exc:
                raise Conflict(str(exc)) from None
            return action, _now(ctx)

        action, now = await run_in_threadpool(run)
        return JSONAnswer(action_json(action, now))

    return handler


async def stats(request: Request, ctx: Context, _caller: Caller) -> Response:
    since = duration(request.query_params.get("since"), "since", default="24h")
    rows = await run_in_threadpool(reports.stats, ctx.engine, since)
    return JSONAnswer({"stats": [json_row(r) for r in rows]})


async def workers(_request: Request, ctx: Context, _caller: Caller) -> Response:
    rows = await run_in_threadpool(reports.workers, ctx.engine)
    return JSONAnswer({"workers": [json_row(r) for r in rows]})


async def processors(_request: Request, ctx: Context, _caller: Caller) -> Response:
    rows = await run_in_threadpool(lambda: reports.processors(ctx.config, engine=ctx.engine))
    return JSONAnswer({"processors": [json_row(r) for r in rows]})


def pause_or_resume(verb: str) -> Callable[[Request, Context, Caller], Any]:
    async def handler(request: Request, ctx: Context, caller: Caller) -> Response:
        name = request.path_params["name"]

        def run() -> admin.ProcessorState:
            registry.import_modules(ctx.config.imports)
            if verb == "pause":
                return admin.pause(ctx.engine, name, by=f"web ({caller.via})")
            return admin.resume(ctx.engine, name)

        try:
            state = await run_in_threadpool(run)
        except UnknownProcessor as exc:
            return error(404, str(exc))
        return JSONAnswer(json_row({"name": state.name,
                                    "state": "paused" if state.paused else "running",
                                    "paused_at": state.paused_at,
                                    "paused_by": state.paused_by}))

    return handler


EVENT_FIELDS = ("data", "related_id", "delay")


async def publish_event(request: Request, ctx: Context, _caller: Caller) -> Response:
    body = await json_body(request, required=False)
    unknown = sorted(set(body) - set(EVENT_FIELDS))
    if unknown:
        raise BadInput(unknown[0], f"unknown field; allowed: {', '.join(EVENT_FIELDS)}")
    data = body.get("data")
    try:
        check_payload(data, "data", ctx.config.max_data_bytes)
    except ConfigError as exc:
        raise BadInput("data", str(exc)) from None
    related_id = text(body.get("related_id"), "related_id")
    delay = duration(body.get("delay"), "delay")

    def run() -> tuple[list[Action], Any]:
        return events.publish(ctx.engine, request.path_params["event"], data,
                              related_id=related_id, delay=delay,
                              max_data_bytes=ctx.config.max_data_bytes), _now(ctx)

    actions, now = await run_in_threadpool(run)
    return JSONAnswer({"actions": [action_json(a, now) for a in actions]}, status_code=202)


async def schedules(_request: Request, ctx: Context, _caller: Caller) -> Response:
    return JSONAnswer({"schedules": [json_row(r) for r in reports.schedules(ctx.config)]})


async def healthz(_request: Request, ctx: Context, _caller: Caller) -> Response:
    def ping() -> None:
        with ctx.engine.connect() as conn:
            conn.execute(select(NOW))

    try:
        await run_in_threadpool(ping)
    except Exception:  # any failure to answer is "not healthy"; the reason goes to the log
        return JSONAnswer({"status": "unavailable"}, status_code=503)
    return JSONAnswer({"status": "ok"})


async def openapi(request: Request, _ctx: Context, _caller: Caller) -> Response:
    from .openapi import document

    return JSONAnswer(document(request.scope.get("root_path", "")))


def routes(route: Callable[..., Route]) -> list[Route]:
    return [
        route("/api/v1/actions", enqueue, ("POST",)),
        route("/api/v1/actions", list_actions),
        route("/api/v1/actions/{id}", get_action),
        route("/api/v1/actions/{id}/retry", transition("retry"), ("POST",)),
        route("/api/v1/actions/{id}/cancel", transition("cancel"), ("POST",)),
        route("/api/v1/stats", stats),
        route("/api/v1/workers", workers),
        route("/api/v1/processors", processors),
        route("/api/v1/schedules", schedules),
        route("/api/v1/processors/{name}/pause", pause_or_resume("pause"), ("POST",)),
        route("/api/v1/processors/{name}/resume", pause_or_resume("resume"), ("POST",)),
        route("/api/v1/events/{event}", publish_event, ("POST",)),
        route("/healthz", healthz, public=True),
        route("/openapi.json", openapi),
    ]

