"""The ASGI application: routes, access checks and error answers.

Handlers run the synchronous API in a worker thread (run_in_threadpool), so a slow
query never blocks the event loop that serves everyone else.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
from sqlalchemy import Engine, event
from sqlalchemy import exc as sa_exc
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..config import Config, load_config
from ..database import make_engine
from ..errors import ActionNotFound, AsyncActionsError, UnknownProcessor
from .access import COOKIE, Access, is_loopback, token_from_env

log = logging.getLogger("asyncactions.web")
HERE = Path(__file__).parent

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


class JSONAnswer(Response):
    """JSON as `show --format json` writes it: values it cannot name become strings."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=str, ensure_ascii=False).encode()


class BadInput(AsyncActionsError):
    """A request field is wrong: 400, naming the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")


class Conflict(AsyncActionsError):
    """The action's status does not allow the change: 409."""


def error(status: int, message: str) -> JSONAnswer:
    return JSONAnswer({"error": message}, status_code=status)


@dataclass
class Context:
    """Everything a handler needs; one per app, no process-wide globals."""

    engine: Engine
    config: Config
    access: Access
    # Backlog samples (time, count, oldest age in seconds) for the overview's chart.
    backlog_history: deque[tuple[float, int, float]] = field(
        default_factory=lambda: deque(maxlen=360))
    # Blocking enqueues wait in threads of their own, so many long waits cannot take
    # every thread the pages and the API need.
    waits: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(16))
    # How the dashboard shows a refused request (set by pages); the API answers JSON.
    error_page: Callable[..., Response] | None = None


@dataclass(frozen=True)
class Caller:
    """How a request was let in."""

    via: str  # "bearer", "cookie" or "open" (no token: loopback only)
    nonce: str | None = None

    def csrf(self, access: Access) -> str:
        return access.csrf_token(self.nonce)


Handler = Callable[[Request, Context, Caller], Awaitable[Response]]


def _is_api(request: Request) -> bool:
    path = request.url.path.removeprefix(request.scope.get("root_path", ""))
    return path.startswith("/api/") or path == "/openapi.json"


def _deny(request: Request, status: int, message: str) -> Response:
    if _is_api(request) or request.method != "GET" or status != 401:
        return error(status, message)
    base = request.scope.get("root_path", "")
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    from urllib.parse import quote

    return RedirectResponse(f"{base}/login?next={quote(target, safe='')}", status_code=303)


def _cross_site(request: Request) -> bool:
    """A browser says where a request comes from; refuse changes sent by another site."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:  # browsers since 2020-2023 say it outright
        return site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    return origin is not None and urlsplit(origin).netloc != request.headers.get("host")


async def admit(request: Request, ctx: Context, *, write: bool) -> Caller | Response:
    """Let the request in (a Caller) or answer it (401, 403) here."""
    access = ctx.access
    if access.token is None:
        client = request.client.host if request.client else ""
        host = (request.headers.get("host") or "").rsplit(":", 1)[0]
        if not is_loopback(client) or not is_loopback(host):
            # Without a token only this machine gets in; checking the Host header too
            # keeps DNS-rebinding pages out.
            return error(403, "no token is set, so only loopback clients may connect; set "
                              "ASYNCACTIONS_WEB_TOKEN to serve other hosts")
        caller = Caller("open")
    else:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if header and scheme.lower() == "bearer" and access.token_matches(given.strip()):
            caller = Caller("bearer")
        elif header:
            return error(401, "wrong token; send Authorization: Bearer TOKEN")
        else:
            nonce = access.session_nonce(request.cookies.get(COOKIE))
            if nonce is None:
                return _deny(request, 401, "sign in at /login or send Authorization: "
                                           "Bearer TOKEN")
            caller = Caller("cookie", nonce)
    if write:
        if access.read_only:
            return error(403, "this server is read-only (--read-only); nothing was changed")
        if _cross_site(request):
            return error(403, "cross-site request refused; nothing was changed")
        if caller.via == "cookie" or (caller.via == "open" and not _is_api(request)):
            given = request.headers.get("x-csrf-token")
            if given is None and request.headers.get("content-type", "").startswith(
                    "application/x-www-form-urlencoded"):
                given = (await request.form()).get("csrf_token")  # type: ignore[assignment]
            if not access.csrf_ok(caller.nonce, given if isinstance(given, str) else None):
                return error(403, "missing or wrong CSRF token; reload the page and try "
                                  "again; nothing was changed")
    return caller


def endpoint(ctx: Context, handler: Handler, *, write: bool = False,
             public: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler: access first, then errors mapped to their status codes."""

    async def run(request: Request) -> Response:
        if public:
            caller: Caller | Response = Caller("open")
        else:
            caller = await admit(request, ctx, write=write)
        if isinstance(caller, Response):
            return caller
        try:
            return await handler(request, ctx, caller)
        except BadInput as exc:
            return problem(request, caller, 400, str(exc))
        except UnknownProcessor as exc:
            return problem(request, caller, 400, f"processor: {exc}")
        except ActionNotFound as exc:
            return problem(request, caller, 404, str(exc))
        except Conflict as exc:
            return problem(request, caller, 409, str(exc))
        except AsyncActionsError as exc:  # ConfigError, UnserializableData, ImportFailed
            return problem(request, caller, 400, str(exc))
        except (sa_exc.OperationalError, sa_exc.InterfaceError):
            log.warning("database unavailable", exc_info=True)
            return problem(request, caller, 503,
                           "the database does not answer; try again later")

    def problem(request: Request, caller: Caller, status: int, message: str) -> Response:
        """JSON for the API; a page saying the same for people."""
        if _is_api(request) or ctx.error_page is None:
            return error(status, message)
        return ctx.error_page(request, ctx, caller, status, message)

    return run


def security_headers(app: Any) -> Any:
    """ASGI middleware adding the security headers to every answer."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.decode().lower() not in SECURITY_HEADERS]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_with_headers)

    return wrapped


def _engine(url: str) -> Engine:
    """The app's own engine. On PostgreSQL its transactions run without JIT: the
    planner prices some filters (the bulk retry's unique_key checks) far above what they
    cost, and compiling that plan took most of a second of a 10 ms page (SET LOCAL:
    nothing leaks into a pooled server session)."""
    engine = make_engine(url)
    if engine.dialect.name == "postgresql":
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("SET LOCAL jit = off"))
    return engine


def create_app(database_url: str | None = None, *, config: Config | str | os.PathLike[str]
               | None = None, token: str | None = None, read_only: bool = False) -> Any:
    """The dashboard and the HTTP API as one ASGI app, standalone or mounted.

    `token` (default: ASYNCACTIONS_WEB_TOKEN) guards every request but /healthz; with
    none, only loopback clients get in. `read_only` refuses every change with 403.
    """
    from . import api, pages

    if config is None or not isinstance(config, Config):
        config = load_config(config, database_url)
    elif database_url:
        config = config.with_overrides(database_url=database_url)
    token = token or token_from_env()
    ctx = Context(_engine(config.effective_database_url), config,
                  Access(token=token, read_only=read_only))

    def route(path: str, handler: Handler, methods: tuple[str, ...] = ("GET",),
              **kw: Any) -> Route:
        write = kw.pop("write", "POST" in methods)
        return Route(path, endpoint(ctx, handler, write=write, **kw),
                     methods=list(methods))

    routes = [
        *api.routes(route),
        *pages.routes(route, ctx),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> Any:
        yield
        await run_in_threadpool(ctx.engine.dispose)

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.context = ctx
    return security_headers(app)
