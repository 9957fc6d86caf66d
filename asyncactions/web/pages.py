"""The dashboard: server-rendered pages (Jinja2, autoescaped), forms for changes, one
small static script for the overview's live refresh."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from .. import admin, audit, reports
from ..action import Action
from ..errors import ActionNotFound, AsyncActionsError
from ..output import human_duration
from . import api, overview
from .access import COOKIE, SESSION_SECONDS
from .app import HERE, BadInput, Caller, Context, _cross_site, error

# Autoescape on for every template: all a user stored (data, errors, names) is shown as text.
templates = Jinja2Templates(env=jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True))
FILTER_KEYS = ("status", "processor", "related_id", "since")


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


def _when(value: Any) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _ago(seconds: float | None) -> str:
    return "—" if seconds is None else human_duration(timedelta(seconds=seconds))


def _field(value: Any) -> str:
    """A field on the detail page: exact times, durations for people."""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, timedelta):
        return human_duration(value)
    return str(value)


templates.env.filters.update(pretty=_pretty, when=_when, ago=_ago, field=_field)


def render(request: Request, ctx: Context, caller: Caller, name: str, status: int = 200,
           **values: Any) -> Response:
    base = request.scope.get("root_path", "")
    return templates.TemplateResponse(request, name, {
        "base": base, "csrf": caller.csrf(ctx.access), "signed_in": caller.via == "cookie",
        "read_only": ctx.access.read_only, **values}, status_code=status)


def _link(base: str, path: str, **query: Any) -> str:
    query = {k: v for k, v in query.items() if v not in (None, "", ())}
    return f"{base}{path}" + (f"?{urlencode(query)}" if query else "")


# --- sign in ---------------------------------------------------------------------------

def _next(value: str | None, base: str) -> str:
    """Only a path on this site: never an open redirect."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return f"{base}/"


async def login_page(request: Request, ctx: Context, caller: Caller) -> Response:
    base = request.scope.get("root_path", "")
    if ctx.access.token is None:
        return RedirectResponse(f"{base}/", status_code=303)
    return render(request, ctx, caller, "login.html", next=request.query_params.get("next"),
                  failed=False)


async def login(request: Request, ctx: Context, caller: Caller) -> Response:
    base = request.scope.get("root_path", "")
    if _cross_site(request):
        return error(403, "cross-site request refused")
    form = await request.form()
    target = _next(form.get("next") if isinstance(form.get("next"), str) else None, base)
    if ctx.access.token is None:
        return RedirectResponse(target, status_code=303)
    given = form.get("token")
    if not ctx.access.token_matches(given if isinstance(given, str) else None):
        return render(request, ctx, caller, "login.html", status=401, next=target, failed=True)
    answer = RedirectResponse(target, status_code=303)
    answer.set_cookie(COOKIE, ctx.access.new_session(), max_age=SESSION_SECONDS,
                      path=f"{base}/", httponly=True, samesite="strict",
                      secure=request.url.scheme == "https")
    return answer


async def logout(request: Request, _ctx: Context, _caller: Caller) -> Response:
    base = request.scope.get("root_path", "")
    answer = RedirectResponse(f"{base}/login", status_code=303)
    answer.delete_cookie(COOKIE, path=f"{base}/", httponly=True, samesite="strict")
    return answer


# --- overview --------------------------------------------------------------------------

def _window(request: Request) -> str:
    window = request.query_params.get("window", "1h")
    if window not in overview.WINDOWS:
        raise BadInput("window", f"{window!r} is not one of {', '.join(overview.WINDOWS)}")
    return window


async def _overview_values(request: Request, ctx: Context) -> dict[str, Any]:
    window = _window(request)
    data = await run_in_threadpool(overview.overview, ctx.engine, window, ctx.backlog_history)
    charts = {name: overview.bar_chart(series) for name, series in sorted(data.series.items())}
    ages = [age for _, _, age in data.backlog_history]
    return {"o": data, "charts": charts, "windows": list(overview.WINDOWS),
            "final": audit.FINAL, "backlog_line": overview.line_points(ages, 720, 120),
            "backlog_top": max([*ages, 1.0])}


async def overview_page(request: Request, ctx: Context, caller: Caller) -> Response:
    return render(request, ctx, caller, "overview.html", page="overview",
                  **await _overview_values(request, ctx))


async def overview_partial(request: Request, ctx: Context, caller: Caller) -> Response:
    return render(request, ctx, caller, "_overview.html", **await _overview_values(request, ctx))


# --- actions ---------------------------------------------------------------------------

def _filter_values(request: Request) -> dict[str, str]:
    q = request.query_params
    return {k: q.get(k, "") for k in (*FILTER_KEYS, "limit")}


async def actions_page(request: Request, ctx: Context, caller: Caller) -> Response:
    values = _filter_values(request)
    try:
        where, limit, before = api.action_filter(request)
    except BadInput as exc:
        return render(request, ctx, caller, "actions.html", status=400, page="actions",
                      f=values, problem=str(exc), actions=[], next_link=None)

    def run() -> list[Action]:
        return audit.list_actions(ctx.engine, where, limit=limit, before=before)

    actions = await run_in_threadpool(run)
    base = request.scope.get("root_path", "")
    next_link = _link(base, "/actions", **values, before=actions[-1].id) \
        if len(actions) == limit else None
    return render(request, ctx, caller, "actions.html", page="actions", f=values,
                  actions=actions, next_link=next_link, problem=None,
                  done=request.query_params.get("done"),
                  filtered=any(values[k] for k in FILTER_KEYS),
                  bulk_query=urlencode({k: values[k] for k in FILTER_KEYS if values[k]}))


async def action_page(request: Request, ctx: Context, caller: Caller) -> Response:
    def run() -> tuple[Action, Any]:
        return admin.get_action(ctx.engine, request.path_params["id"]), audit.db_clock(
            ctx.engine)

    action, now = await run_in_threadpool(run)  # an unknown id: the 404 page
    fields = reports.show(action, now)
    return render(request, ctx, caller, "action.html", page="actions", a=action,
                  fields=fields, progress=getattr(action, "progress", None),
                  done=request.query_params.get("done"),
                  problem=request.query_params.get("problem"))


def change(verb: str) -> Callable[..., Any]:
    async def handler(request: Request, ctx: Context, _caller: Caller) -> Response:
        base = request.scope.get("root_path", "")
        action_id = request.path_params["id"]
        run = admin.retry if verb == "retry" else admin.cancel
        try:
            action = await run_in_threadpool(run, ctx.engine, action_id)
        except ActionNotFound:
            raise
        except AsyncActionsError as exc:
            return RedirectResponse(_link(base, f"/actions/{admin.parse_id(action_id)}",
                                          problem=str(exc)), status_code=303)
        return RedirectResponse(_link(base, f"/actions/{action.id}", done=verb),
                                status_code=303)

    return handler


def _bulk(values: Any) -> tuple[str, audit.Filter]:
    op = values.get("op")
    if op not in ("retry", "cancel"):
        raise BadInput("op", "must be retry or cancel")
    statuses = values.get("status") or ("failed" if op == "retry" else "pending")
    try:
        parsed = audit.parse_statuses(statuses)
    except AsyncActionsError as exc:
        raise BadInput("status", str(exc)) from None
    return op, audit.Filter(parsed, values.get("processor") or None,
                            values.get("related_id") or None,
                            api.duration(values.get("since") or None, "since"))


def _bulk_apply(ctx: Context, op: str, where: audit.Filter, dry_run: bool) -> int:
    if op == "retry":
        return admin.retry_matching(ctx.engine, where, dry_run=dry_run)
    return admin.cancel_matching(ctx.engine, where, dry_run=dry_run)


async def bulk_confirm(request: Request, ctx: Context, caller: Caller) -> Response:
    try:
        op, where = _bulk(request.query_params)
        count = await run_in_threadpool(_bulk_apply, ctx, op, where, True)
    except AsyncActionsError as exc:  # e.g. cancel of failed actions: say so on the page
        return error_page(request, ctx, caller, 400, str(exc))
    return render(request, ctx, caller, "bulk.html", page="actions", op=op, where=where,
                  count=count, since=request.query_params.get("since", ""))


async def bulk_apply(request: Request, ctx: Context, _caller: Caller) -> Response:
    form = await request.form()
    op, where = _bulk(form)
    count = await run_in_threadpool(_bulk_apply, ctx, op, where, False)
    base = request.scope.get("root_path", "")
    return RedirectResponse(_link(base, "/actions", status=",".join(where.statuses),
                                  processor=where.processor, related_id=where.related_id,
                                  since=form.get("since"),
                                  done=f"{op}: {count} action{'' if count == 1 else 's'}"),
                            status_code=303)


# --- processors, workers, schedules ------------------------------------------------------

async def processors_page(request: Request, ctx: Context, caller: Caller) -> Response:
    def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        rows = reports.processors(ctx.config, engine=ctx.engine)
        live = overview.overview(ctx.engine, "1h", ctx.backlog_history)
        return rows, reports.workers(ctx.engine), live.by_processor

    rows, workers, counts = await run_in_threadpool(run)
    # Names this server has no settings for (paused ones, ones with pending actions
    # nobody serves are rows already), but that live workers run or that have pending
    # or running actions.
    settled = [r for r in rows if "retries" in r]
    others = {r["name"]: r for r in rows if "retries" not in r}
    names = sorted(({p for w in workers for p in w["processors"]} | set(counts) |
                    set(others)) - {r["name"] for r in settled})
    served = [others.get(name, {"name": name, "state": "running"}) for name in names]
    return render(request, ctx, caller, "processors.html", page="processors", rows=settled,
                  served=served, counts=counts, done=request.query_params.get("done"),
                  problem=request.query_params.get("problem"))


def pause_or_resume(verb: str) -> Callable[..., Any]:
    async def handler(request: Request, ctx: Context, _caller: Caller) -> Response:
        base = request.scope.get("root_path", "")
        name = request.path_params["name"]

        def run() -> Any:
            if verb == "pause":
                return admin.pause(ctx.engine, name, by="web (cookie)")
            return admin.resume(ctx.engine, name)

        try:
            await run_in_threadpool(run)
        except AsyncActionsError as exc:
            return RedirectResponse(_link(base, "/processors", problem=str(exc)),
                                    status_code=303)
        past = "paused" if verb == "pause" else "resumed"
        return RedirectResponse(_link(base, "/processors", done=f"{name} {past}"),
                                status_code=303)

    return handler


async def workers_page(request: Request, ctx: Context, caller: Caller) -> Response:
    rows = await run_in_threadpool(reports.workers, ctx.engine)
    return render(request, ctx, caller, "workers.html", page="workers", rows=rows)


async def schedules_page(request: Request, ctx: Context, caller: Caller) -> Response:
    return render(request, ctx, caller, "schedules.html", page="schedules",
                  rows=reports.schedules(ctx.config))


def error_page(request: Request, ctx: Context, caller: Caller, status: int,
               message: str) -> Response:
    heading = {404: "Not found", 409: "Cannot do that", 503: "Database unavailable"}
    return render(request, ctx, caller, "missing.html", status=status, page="actions",
                  heading=heading.get(status, "Cannot do that"), problem=message)


def routes(route: Callable[..., Route], ctx: Context) -> list[Route]:
    ctx.error_page = error_page
    return [
        route("/login", login_page, public=True),
        route("/login", login, ("POST",), public=True),
        route("/logout", logout, ("POST",), write=False),
        route("/", overview_page),
        route("/partials/overview", overview_partial),
        route("/actions", actions_page),
        route("/actions/bulk", bulk_confirm),
        route("/actions/bulk", bulk_apply, ("POST",)),
        route("/actions/{id}", action_page),
        route("/actions/{id}/retry", change("retry"), ("POST",)),
        route("/actions/{id}/cancel", change("cancel"), ("POST",)),
        route("/processors", processors_page),
        route("/processors/{name}/pause", pause_or_resume("pause"), ("POST",)),
        route("/processors/{name}/resume", pause_or_resume("resume"), ("POST",)),
        route("/workers", workers_page),
        route("/schedules", schedules_page),
    ]
