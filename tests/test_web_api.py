"""SPEC §7 HTTP API, against a real `asyncactions web` process on PostgreSQL and SQLite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text

from asyncactions import cancel, init_action, migrate
from asyncactions.database import make_engine

from .conftest import TRUNCATE, cli, start_worker, track, wait_until
from .web_server import TOKEN, Server, free_port, serve

WRITES = [("POST", "/api/v1/actions", {"processor": "sync_invoice"}),
          ("POST", "/api/v1/actions/1/retry", None),
          ("POST", "/api/v1/actions/1/cancel", None),
          ("POST", "/api/v1/processors/sync_invoice/pause", None),
          ("POST", "/api/v1/processors/sync_invoice/resume", None),
          ("POST", "/api/v1/events/order.placed", {"data": {}}),
          ("POST", "/actions/1/retry", None), ("POST", "/actions/1/cancel", None),
          ("POST", "/actions/bulk", None)]
READS = ["/api/v1/actions", "/api/v1/actions/1", "/api/v1/stats", "/api/v1/workers",
         "/api/v1/processors", "/api/v1/schedules", "/openapi.json", "/", "/actions",
         "/actions/1", "/processors", "/workers", "/schedules", "/partials/overview"]


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> str:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_database")
        engine = make_engine(url)  # the session's database: what earlier tests left goes
        with engine.begin() as conn:
            conn.execute(text(TRUNCATE))
        engine.dispose()
        return url
    url = f"sqlite:///{tmp_path_factory.mktemp('web') / 'asyncactions.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(database_url, tmp_path_factory.mktemp("webserver")) as running:
        yield running


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM async_action")).scalar_one()


def test_enqueue_answers_202_with_the_action_which_get_and_list_find(
        api: httpx.Client, engine: Engine) -> None:
    init_action(engine, "sync_invoice", {"seed": True})  # the processor is known by its rows
    answer = api.post("/api/v1/actions", json={
        "processor": "sync_invoice", "data": {"order_id": 42}, "related_id": "order:42-a",
        "delay": "5m", "priority": -3, "unique_key": "invoice:42-a", "retries": 7})
    assert answer.status_code == 202
    action = answer.json()
    assert action["name"] == f"ASYNC-{action['id']:08d}"
    assert (action["status"], action["data"], action["priority"], action["retries"]) == \
        ("pending", {"order_id": 42}, -3, 7)
    by_name = api.get(f"/api/v1/actions/{action['name']}")
    assert by_name.status_code == 200 and by_name.json()["id"] == action["id"]
    listed = api.get("/api/v1/actions", params={"related_id": "order:42-a"}).json()
    assert [a["id"] for a in listed["actions"]] == [action["id"]]
    assert listed["next"] is None


def test_the_list_pages_newest_first_with_before(api: httpx.Client, engine: Engine) -> None:
    ids = [init_action(engine, "page_me", {"i": i}, related_id="paged").id for i in range(5)]
    seen, before = [], None
    while True:
        page = api.get("/api/v1/actions", params={
            "related_id": "paged", "limit": 2, **({"before": before} if before else {})}).json()
        seen += [a["id"] for a in page["actions"]]
        before = page["next"]
        if before is None:
            break
    assert seen == sorted(ids, reverse=True)
    only = api.get("/api/v1/actions", params={"processor": "page_me", "status": "canceled"})
    assert only.json() == {"actions": [], "next": None}


def test_an_action_reads_as_show_format_json_prints_it(api: httpx.Client, engine: Engine,
                                                       database_url: str) -> None:
    action = init_action(engine, "sync_invoice", {"when": "2026-01-01", "n": 1.5})
    shown = cli("show", str(action.id), "--format", "json",
                env={"ASYNCACTIONS_DATABASE_URL": database_url})
    assert shown.returncode == 0, shown.stderr
    expected = json.loads(shown.stdout)
    answered = api.get(f"/api/v1/actions/{action.id}").json()
    assert answered.pop("name") == action.display_id
    # Timings are measured when asked: equal fields, and the same set of them.
    for timing in ("queued", "run_time"):
        expected.pop(timing), answered.pop(timing)
    assert answered == expected


def test_retry_and_cancel_answer_the_action_or_409(api: httpx.Client, engine: Engine) -> None:
    action = init_action(engine, "sync_invoice")
    refused = api.post(f"/api/v1/actions/{action.id}/retry")
    assert refused.status_code == 409 and "pending" in refused.json()["error"]
    canceled = api.post(f"/api/v1/actions/{action.id}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert api.post(f"/api/v1/actions/{action.id}/cancel").status_code == 409
    again = api.post(f"/api/v1/actions/{action.display_id}/retry", json={"retries": 2})
    assert again.status_code == 200
    assert (again.json()["status"], again.json()["retries"]) == ("pending", 2)
    assert api.post("/api/v1/actions/999999999/retry").status_code == 404


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("POST", "/api/v1/actions", {"processor": "no_such_processor"}, "processor"),
    ("POST", "/api/v1/actions", {"data": {}}, "processor"),
    ("POST", "/api/v1/actions", b'{"processor": "sync_invoice", ', "body"),
    ("POST", "/api/v1/actions", b"[1, 2]", "body"),
    ("POST", "/api/v1/actions", {"processor": "sync_invoice", "delay": "soon"}, "delay"),
    ("POST", "/api/v1/actions", {"processor": "sync_invoice", "priority": 99999}, "priority"),
    ("POST", "/api/v1/actions", {"processor": "sync_invoice", "retries": -1}, "retries"),
    ("POST", "/api/v1/actions", {"processor": "sync_invoice", "colour": "red"}, "colour"),
    ("POST", "/api/v1/actions", {"processor": "sync_invoice", "data": "a\u0000b"}, "data"),
    ("POST", "/api/v1/actions?blocking=true&timeout=forever", {"processor": "sync_invoice"},
     "timeout"),
    ("GET", "/api/v1/actions?since=yesterday", None, "since"),
    ("GET", "/api/v1/actions?status=done", None, "status"),
    ("GET", "/api/v1/actions?limit=0", None, "limit"),
    ("GET", "/api/v1/actions?before=abc", None, "before"),
    ("GET", "/api/v1/stats?since=1y", None, "since"),
])
def test_bad_input_is_400_naming_the_field_and_changes_nothing(
        api: httpx.Client, engine: Engine, method: str, path: str, body: object,
        field: str) -> None:
    init_action(engine, "sync_invoice")
    before = count(engine)
    content = body if isinstance(body, bytes) else None
    answer = api.request(method, path, content=content,
                         json=None if content is not None or body is None else body,
                         headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"].startswith(f"{field}"), answer.json()
    assert count(engine) == before


def test_unknown_ids_are_404(api: httpx.Client) -> None:
    for path in ("/api/v1/actions/999999999", "/api/v1/actions/ASYNC-99999999",
                 "/api/v1/actions/x"):
        answer = api.get(path)
        assert answer.status_code == 404 and "error" in answer.json()


def test_blocking_enqueue_returns_the_final_action_or_202_with_its_id(
        server: Server, api: httpx.Client, database_url: str, tmp_path: Path) -> None:
    (tmp_path / "webprocs.py").write_text(textwrap.dedent("""
        from asyncactions import processor

        @processor("echo_web")
        def echo(action):
            return {"echo": action.data}
    """))
    worker = start_worker(tmp_path, database_url, "--import", "webprocs")
    wait_until(lambda: api.get("/api/v1/workers").json()["workers"], timeout=30,
               what="the worker to register")
    try:
        done = api.post("/api/v1/actions?blocking=true&timeout=30s",
                        json={"processor": "echo_web", "data": {"x": 1}})
    finally:
        worker.terminate()
        worker.wait()
    assert done.status_code == 200, done.text
    assert (done.json()["status"], done.json()["result"]) == ("completed", {"echo": {"x": 1}})
    waiting = api.post("/api/v1/actions?blocking=true&timeout=200ms",
                       json={"processor": "echo_web", "delay": "1h"})
    assert waiting.status_code == 202 and waiting.json()["status"] == "pending"


def test_stats_workers_processors_schedules_answer_the_cli_json(
        api: httpx.Client, engine: Engine) -> None:
    cancel(engine, init_action(engine, "stats_me").id)
    stats = api.get("/api/v1/stats", params={"since": "1h"}).json()["stats"]
    row = next(r for r in stats if r["processor"] == "stats_me")
    assert (row["total"], row["canceled"]) == (1, 1)
    assert api.get("/api/v1/workers").json() == {"workers": []}
    # None registered in the server, so each one listed is one with pending actions
    # that no live worker serves (as `processors` says).
    for row in api.get("/api/v1/processors").json()["processors"]:
        assert row["served"].startswith("no worker serves this"), row
    assert api.get("/api/v1/schedules").json() == {"schedules": []}


def test_pause_and_resume_answer_the_processors_state(api: httpx.Client,
                                                       engine: Engine) -> None:
    init_action(engine, "pausable", {})  # known by its rows
    paused = api.post("/api/v1/processors/pausable/pause")
    assert paused.status_code == 200
    assert (paused.json()["name"], paused.json()["state"]) == ("pausable", "paused")
    assert paused.json()["paused_by"] == "web (bearer)"
    listed = {r["name"]: r for r in api.get("/api/v1/processors").json()["processors"]}
    assert listed["pausable"]["state"] == "paused"
    resumed = api.post("/api/v1/processors/pausable/resume")
    assert (resumed.status_code, resumed.json()["state"]) == (200, "running")
    unknown = api.post("/api/v1/processors/no_such_processor/pause")
    assert unknown.status_code == 404 and "no_such_processor" in unknown.json()["error"]


def test_publishing_an_event_answers_202_with_the_actions_its_rules_created(
        api: httpx.Client, engine: Engine) -> None:
    from asyncactions.events import add_rule

    add_rule(engine, "order.paid", "send_receipt")
    add_rule(engine, "order.paid", "book_payment")
    answer = api.post("/api/v1/events/order.paid",
                      json={"data": {"order": 5}, "related_id": "order:5"})
    assert answer.status_code == 202
    created = answer.json()["actions"]
    assert sorted(a["processor"] for a in created) == ["book_payment", "send_receipt"]
    for action in created:  # each one can be asked about by its id
        got = api.get(f"/api/v1/actions/{action['id']}").json()
        assert (got["event"], got["data"], got["related_id"]) == (
            "order.paid", {"order": 5}, "order:5")
    nobody = api.post("/api/v1/events/nobody.listens", json={})
    assert (nobody.status_code, nobody.json()) == (202, {"actions": []})
    before = count(engine)
    bad = api.post("/api/v1/events/order.paid", json={"delay": "soon"})
    assert bad.status_code == 400 and "delay" in bad.json()["error"]
    assert count(engine) == before


# --- access ------------------------------------------------------------------------------

def test_healthz_needs_no_token_and_everything_else_does(server: Server) -> None:
    with server.client(token=None) as anonymous, server.client(token="wrong") as wrong:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        for path in READS:
            if path.startswith("/api/") or path == "/openapi.json":
                assert anonymous.get(path).status_code == 401, path
            else:
                assert anonymous.get(path).headers["location"].startswith("/login?next=")
            assert wrong.get(path).status_code == 401, path
        for method, path, body in WRITES:
            assert anonymous.request(method, path, json=body).status_code == 401, path
            assert wrong.request(method, path, json=body).status_code == 401, path


def test_read_only_refuses_every_write_with_403(database_url: str, engine: Engine,
                                                tmp_path: Path) -> None:
    action = init_action(engine, "sync_invoice")
    before = count(engine)
    with serve(database_url, tmp_path, "--read-only") as server, server.client() as api:
        for method, path, body in WRITES:
            path = path.replace("/1/", f"/{action.id}/")
            answer = api.request(method, path, json=body)
            assert answer.status_code == 403, (path, answer.text)
            assert "read-only" in answer.json()["error"]
        assert api.get(f"/api/v1/actions/{action.id}").json()["status"] == "pending"
    assert count(engine) == before


def sign_in(browser: httpx.Client) -> httpx.Client:
    answer = browser.post("/login", data={"token": TOKEN, "next": "/"})
    assert answer.status_code == 303
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    return browser


def test_a_cookie_session_changes_only_with_the_csrf_token(server: Server,
                                                           engine: Engine) -> None:
    action = init_action(engine, "sync_invoice")
    with server.client(token=None) as stranger:
        assert stranger.post("/login", data={"token": "guess"}).status_code == 401
    with server.client(token=None) as browser:
        sign_in(browser)
        page = browser.get(f"/actions/{action.id}")
        assert page.status_code == 200
        csrf = page.text.split('name="csrf_token" value="')[1].split('"')[0]
        refused = browser.post(f"/api/v1/actions/{action.id}/cancel")
        assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
        refused = browser.post(f"/actions/{action.id}/cancel", data={"csrf_token": "x" * 64})
        assert refused.status_code == 403
        assert browser.get(f"/api/v1/actions/{action.id}").json()["status"] == "pending"
        done = browser.post(f"/actions/{action.id}/cancel", data={"csrf_token": csrf})
        assert done.status_code == 303
        assert browser.get(f"/api/v1/actions/{action.id}").json()["status"] == "canceled"
        by_header = browser.post(f"/api/v1/actions/{action.id}/retry",
                                 headers={"x-csrf-token": csrf})
        assert by_header.status_code == 200


def test_cross_site_requests_are_refused(server: Server, api: httpx.Client,
                                         engine: Engine) -> None:
    action = init_action(engine, "sync_invoice")
    answer = api.post(f"/api/v1/actions/{action.id}/cancel",
                      headers={"origin": "https://evil.example"})
    assert answer.status_code == 403
    assert api.get(f"/api/v1/actions/{action.id}").json()["status"] == "pending"


def test_answers_carry_a_strict_content_security_policy(api: httpx.Client) -> None:
    headers = api.get("/").headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"


def test_web_refuses_a_public_host_without_a_token(database_url: str, tmp_path: Path) -> None:
    result = cli("web", "--host", "0.0.0.0", cwd=tmp_path,
                 env={"ASYNCACTIONS_DATABASE_URL": database_url, "ASYNCACTIONS_WEB_TOKEN": ""})
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "ASYNCACTIONS_WEB_TOKEN" in result.stderr


def test_without_a_token_only_loopback_names_get_in(database_url: str, tmp_path: Path) -> None:
    with serve(database_url, tmp_path, token=None) as server, \
            server.client(token=None) as local:
        assert local.get("/api/v1/actions").status_code == 200
        rebound = local.get("/api/v1/actions", headers={"host": "attacker.example"})
        assert rebound.status_code == 403
        form = local.post("/actions/1/cancel", data={})
        assert form.status_code == 403  # a dashboard form still needs its CSRF token


def test_no_page_or_answer_shows_the_database_password(pg_database: str,
                                                       tmp_path: Path) -> None:
    url = pg_database.replace("postgres@", "postgres:hunter2-secret@")
    with serve(url, tmp_path) as server, server.client() as api:
        init_action(make_engine(pg_database), "sync_invoice")
        for path in [*READS, "/login", "/healthz"]:
            answer = api.get(path)
            assert answer.status_code in (200, 404), (path, answer.status_code)
            assert "hunter2" not in answer.text, path


def test_mounted_inside_an_application_it_serves_under_its_prefix(
        database_url: str, engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "outer.py").write_text(textwrap.dedent(f"""
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Mount, Route

        from asyncactions.web import create_app

        async def home(request):
            return PlainTextResponse("the shop")

        app = Starlette(routes=[
            Route("/", home),
            Mount("/queue", app=create_app({database_url!r}, token={TOKEN!r})),
        ])
    """))
    port = free_port()
    process = track(subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "outer:app", "--port", str(port)], cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL))
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None
        try:
            return httpx.get(f"{base}/queue/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, timeout=30, what="the outer app")
    action = init_action(engine, "sync_invoice")
    with httpx.Client(base_url=base) as browser:
        assert browser.get("/").text == "the shop"
        assert browser.get("/queue/").headers["location"] == "/queue/login?next=%2Fqueue%2F"
        signed = browser.post("/queue/login", data={"token": TOKEN, "next": "/queue/"})
        assert "path=/queue/" in signed.headers["set-cookie"].lower()
        page = browser.get("/queue/actions")
        assert f'href="/queue/actions/{action.id}"' in page.text
        assert 'src="/queue/static/app.js"' in page.text
        assert browser.get("/queue/static/app.css").status_code == 200
        api = browser.get(f"/queue/api/v1/actions/{action.id}",
                          headers={"authorization": f"Bearer {TOKEN}"})
        assert api.json()["id"] == action.id


def test_bulk_cancel_states_the_count_then_changes_exactly_that_filter(
        server: Server, engine: Engine) -> None:
    for i in range(3):
        init_action(engine, "bulk_me", {"i": i})
    other = init_action(engine, "bulk_other")
    with server.client(token=None) as browser:
        sign_in(browser)
        confirm = browser.get("/actions/bulk", params={"op": "cancel", "processor": "bulk_me"})
        assert "Cancel 3 actions?" in confirm.text
        csrf = confirm.text.split('name="csrf_token" value="')[1].split('"')[0]
        form = {"op": "cancel", "status": "pending", "processor": "bulk_me", "csrf_token": csrf}
        assert browser.post("/actions/bulk", data={**form, "csrf_token": ""}).status_code == 403
        done = browser.post("/actions/bulk", data=form)
        assert done.status_code == 303 and "cancel%3A+3+actions" in done.headers["location"]
        refused = browser.get("/actions/bulk", params={"op": "cancel", "status": "failed"})
        assert refused.status_code == 400 and "only pending or running" in refused.text
    with engine.connect() as conn:
        statuses = dict(conn.execute(text(
            "SELECT processor, status FROM async_action WHERE processor LIKE 'bulk_%' "
            "GROUP BY processor, status")).all())
    assert statuses == {"bulk_me": "canceled", "bulk_other": "pending"}
    assert other.status == "pending"


def test_session_cookies_are_signed_expire_and_die_with_the_token() -> None:
    from asyncactions.web.access import SESSION_SECONDS, Access

    access = Access(token="one")
    cookie = access.new_session(now=1_000_000)
    assert access.session_nonce(cookie, now=1_000_001) is not None
    assert access.session_nonce(cookie, now=1_000_000 + SESSION_SECONDS + 1) is None
    expires, nonce, signature = cookie.split(".")
    assert access.session_nonce(f"{int(expires) + 999}.{nonce}.{signature}",
                                now=1_000_001) is None  # a longer life is not signed
    assert Access(token="two").session_nonce(cookie, now=1_000_001) is None
    assert Access(token=None).session_nonce(cookie, now=1_000_001) is None
    nonce = access.session_nonce(cookie, now=1_000_001)
    assert access.csrf_ok(nonce, access.csrf_token(nonce))
    assert not access.csrf_ok(nonce, access.csrf_token("another session"))
    assert not access.token_matches("on") and access.token_matches("one")


def test_a_forged_cookie_is_not_a_session(server: Server) -> None:
    with server.client(token=None) as browser:
        browser.cookies.set("asyncactions_session", "99999999999.abc.def")
        assert browser.get("/api/v1/actions").status_code == 401
        assert browser.get("/actions").headers["location"].startswith("/login")


def test_pages_explain_bad_requests_as_pages(server: Server) -> None:
    with server.client(token=None) as browser:
        sign_in(browser)
        missing = browser.get("/actions/999999999")
        assert missing.status_code == 404 and "text/html" in missing.headers["content-type"]
        assert "no action 999999999" in missing.text
        bad = browser.get("/?window=1y")
        assert bad.status_code == 400 and "window: &#39;1y&#39; is not one of" in bad.text
        listed = browser.get("/actions?since=soon")
        assert listed.status_code == 400 and "since: " in listed.text


def test_the_processors_page_lists_names_with_live_actions_it_has_no_settings_for(
        server: Server, engine: Engine) -> None:
    init_action(engine, "only_in_the_table")
    with server.client(token=None) as browser:
        sign_in(browser)
        page = browser.get("/processors")
    assert "Not registered here" in page.text
    assert 'href="/actions?processor=only_in_the_table&status=pending"' in page.text
