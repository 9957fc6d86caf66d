"""The dashboard in real headless Chromium (Debian's package, driven by Playwright):
sign in, overview, filter, detail, retry, cancel, bulk retry, a live count, escaping.
Screenshots of each page go to $ASYNCACTIONS_SCREENSHOTS (docs/screenshots for the
README) or the test's tmp dir."""

from __future__ import annotations

import os
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from asyncactions import init_action, processor
from asyncactions.database import make_engine

from .conftest import Db, drain, start_worker, wait_until
from .web_server import TOKEN, serve

CHROMIUM = Path("/usr/bin/chromium")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
XSS = "<script>alert(1)</script>"

CONFIG = textwrap.dedent("""
    imports = ["shopprocs"]

    [processors.sync_invoice]
    retries = 0

    [schedules.nightly_report]
    processor = "send_welcome_email"
    cron = "0 2 * * *"
    data = { kind = "daily" }
""")
PROCESSORS = textwrap.dedent("""
    from asyncactions import processor

    @processor("sync_invoice", retries=0)
    def sync_invoice(action):
        return {"invoice": action.data["order_id"]}

    @processor("send_welcome_email")
    def send_welcome_email(action):
        return None

    @processor("notify_warehouse", timeout=None)
    def notify_warehouse(action):
        return None
""")


@pytest.fixture
def db(sqlite: Db) -> Db:
    """SQLite only: one backend is enough for the browser; the API tests run on both."""
    return sqlite


def seed(db: Db) -> dict[str, int]:
    """Orders 41..45: two invoice syncs that failed with a traceback, emails that went
    out, one warehouse notice waiting an hour, and data a user typed in."""

    @processor("sync_invoice", retries=0)
    def sync_invoice(action):
        if action.data["order_id"] in (42, 43):
            raise TimeoutError(f"ERP did not answer for order {action.data['order_id']}")
        return {"invoice": f"INV-{action.data['order_id']}"}

    @processor("send_welcome_email")
    def send_welcome_email(action):
        return {"sent_to": f"user{action.data['user_id']}@example.com"}

    for order in range(41, 46):
        init_action(db.engine, "sync_invoice", {"order_id": order}, related_id=f"order:{order}")
        init_action(db.engine, "send_welcome_email", {"user_id": order})
    drain(db)
    later = timedelta(hours=1)
    return {"waiting": init_action(db.engine, "notify_warehouse", {"order_id": 44},
                                   related_id="order:44", delay=later).id,
            "xss": init_action(db.engine, "notify_warehouse", {"note": XSS},
                               related_id=XSS, delay=later).id}


def test_an_operator_finds_and_fixes_failed_work_in_the_browser(
        db: Db, tmp_path: Path) -> None:
    shots = Path(os.environ.get("ASYNCACTIONS_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    ids = seed(db)
    (tmp_path / "shopprocs.py").write_text(PROCESSORS)
    failed_42 = db.scalar("SELECT id FROM async_action WHERE related_id = 'order:42'")

    def failed_invoices() -> int:
        return db.scalar("SELECT count(*) FROM async_action WHERE processor = 'sync_invoice' "
                         "AND status = 'failed'")

    with serve(db.url, tmp_path, config=CONFIG) as server, \
            playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        problems: list[str] = []
        page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
        # Script errors and Content-Security-Policy refusals (a 401 answer is not one).
        page.on("console", lambda m: problems.append(m.text) if m.type == "error"
                and "Failed to load resource" not in m.text else None)
        expect = playwright.expect
        # Chromium, the server and a worker share a loaded CI machine's two cores: each
        # expectation polls for up to 30 s, not Playwright's default 5.
        expect.set_options(timeout=30_000)
        page.set_default_timeout(30_000)

        # Sign in.
        page.goto(server.url + "/")
        expect(page).to_have_url(server.url + "/login?next=%2F")
        page.screenshot(path=shots / "login.png")
        page.fill("input[name=token]", "not the token")
        page.click("button.primary")
        expect(page.locator(".problem")).to_have_text("That token is not right.")
        page.fill("input[name=token]", TOKEN)
        page.click("button.primary")
        expect(page).to_have_url(server.url + "/")

        # The overview counts what happened, and every number links to its list.
        expect(page.locator("#count-failed")).to_have_text("2")
        expect(page.locator("#count-completed")).to_have_text("8")
        expect(page.locator("#count-pending")).to_have_text("2")
        page.screenshot(path=shots / "overview.png", full_page=True)

        # A live count: enqueue elsewhere, the open page follows without a reload.
        init_action(make_engine(db.url), "send_welcome_email", {"user_id": 99})
        expect(page.locator("#count-pending")).to_have_text("3")

        # Filter the list from the failed count.
        page.click("a.stat.failed")
        expect(page.locator("table.list tbody tr")).to_have_count(2)
        page.select_option("select[name=status]", "failed")
        page.fill("input[name=processor]", "sync_invoice")
        page.fill("input[name=since]", "")
        page.click("form.filters button")
        expect(page).to_have_url(server.url + "/actions?status=failed&processor=sync_invoice"
                                 "&related_id=&since=")
        expect(page.locator("table.list tbody tr")).to_have_count(2)
        page.screenshot(path=shots / "actions.png", full_page=True)

        # Open the failed invoice sync of order 42: its traceback; run it again.
        page.click(f"text=ASYNC-{failed_42:08d}")
        expect(page.locator("#status")).to_have_text("failed")
        expect(page.locator("pre.traceback")).to_contain_text("ERP did not answer for order 42")
        page.screenshot(path=shots / "action.png", full_page=True)
        page.click("text=Retry now")
        expect(page.locator("#status")).to_have_text("pending")
        expect(page.locator(".done")).to_contain_text("Retried")
        assert db.scalar("SELECT status FROM async_action WHERE id = :i", i=failed_42) == \
            "pending"

        # Cancel the waiting warehouse notice.
        page.goto(f"{server.url}/actions/{ids['waiting']}")
        page.click("button.danger")
        expect(page.locator("#status")).to_have_text("canceled")

        # Bulk-retry what is left of the filter, after a confirmation stating the count.
        page.goto(f"{server.url}/actions?status=failed&processor=sync_invoice")
        page.click("text=Retry all matching…")
        expect(page.locator("h1")).to_have_text("Retry 1 action?")
        page.screenshot(path=shots / "bulk.png")
        page.click("form button.primary")
        expect(page.locator(".done")).to_have_text("retry: 1 action")
        assert failed_invoices() == 0

        # What a user stored is shown as text, never run.
        page.goto(f"{server.url}/actions/{ids['xss']}")
        expect(page.locator("#data")).to_contain_text(XSS)
        page.goto(f"{server.url}/actions?related_id=" + XSS.replace("<", "%3C"))
        expect(page.locator("table.list tbody tr")).to_have_count(1)
        page.goto(f"{server.url}/actions/{ids['xss']}")
        page.screenshot(path=shots / "escaped.png", full_page=True)

        # Processors (from the config's imports), workers, schedules.
        worker = start_worker(tmp_path, db.url, "--import", "shopprocs")
        page.goto(server.url + "/processors")
        expect(page.locator("#registered tbody tr")).to_have_count(3)
        # Pause one cluster-wide, then resume it.
        row = page.locator("#processor-sync_invoice")
        row.locator("button", has_text="Pause").click()
        expect(page.locator(".done")).to_have_text("sync_invoice paused.")
        expect(row.locator(".badge")).to_have_text("paused")
        assert db.scalar("SELECT paused_by FROM async_action_processor "
                         "WHERE name = 'sync_invoice' AND paused_at IS NOT NULL") == \
            "web (cookie)"
        page.screenshot(path=shots / "processors.png", full_page=True)
        row.locator("button", has_text="Resume").click()
        expect(row.locator(".badge")).to_have_text("running")
        assert db.scalar("SELECT paused_at FROM async_action_processor "
                         "WHERE name = 'sync_invoice'") is None
        wait_until(lambda: db.scalar("SELECT count(*) FROM async_action_worker"), timeout=30,
                   what="the worker to register")
        page.goto(server.url + "/workers")
        expect(page.locator("table.grid tbody")).to_contain_text("sync_invoice")
        page.screenshot(path=shots / "workers.png", full_page=True)
        page.goto(server.url + "/schedules")
        expect(page.locator("table.grid tbody")).to_contain_text("nightly_report")
        page.screenshot(path=shots / "schedules.png", full_page=True)
        worker.terminate()
        worker.wait()
        browser.close()
    assert problems == []
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM async_action")).scalar() == 13
