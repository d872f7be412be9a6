"""An admin sees a broken mailbox on every page, with the fix one click away, in headless Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from postdesk.alerts.service import evaluate_alerts
from postdesk.db.models import Channel, ChannelStatus
from postdesk.db.types import utcnow
from postdesk.runtime import Runtime
from postdesk.sandbox import SandboxDirectory, SandboxServer
from postdesk.worker.heartbeat import refresh_stale_tokens
from tests.browser.conftest import add_user_mailbox, live_desk, pick_account, sign_in_page

pytestmark = pytest.mark.browser
SCREENSHOTS = Path(__file__).parent.parent.parent / ".pytest_cache"


@pytest.fixture
def desk(
    tmp_path: Path, sandbox: SandboxServer, directory: SandboxDirectory
) -> Iterator[tuple[str, Runtime]]:
    """Postdesk on a real port with the app registration saved, signing in at the sandbox."""
    with live_desk(tmp_path, sandbox, ca_bundle=sandbox.ca_path) as live:
        live.save_app(directory)
        yield live.url, live.runtime


def test_a_mailbox_that_needs_sign_in_shows_in_the_banner_until_it_is_re_authenticated(
    page: Page, desk: tuple[str, Runtime], directory: SandboxDirectory, mailbox_user: str
) -> None:
    url, runtime = desk
    upn = mailbox_user
    sign_in_page(page, url)
    page.goto(f"{url}/channels")
    add_user_mailbox(page)
    pick_account(page, upn, consent=True)
    expect(page.get_by_role("status")).to_have_text("The mailbox is connected.")
    expect(page.locator("#attention")).to_have_count(0)

    # Someone revokes the mailbox's sessions in Entra ID; the heartbeat finds out.
    directory.revoke_refresh_tokens(upn)
    refresh_stale_tokens(runtime, now=utcnow() + timedelta(days=8))
    evaluate_alerts(runtime)
    with runtime.sessions() as session:
        channel = session.query(Channel).one()
    assert channel.status is ChannelStatus.NEEDS_REAUTH

    page.goto(f"{url}/tickets")
    banner = page.get_by_role("region", name="Needs attention")
    expect(banner).to_be_visible()
    expect(banner.get_by_role("listitem")).to_have_count(1)  # the alert and the live status are one item
    expect(banner).to_contain_text(f"{upn} needs sign-in — Re-authenticate")
    fix = banner.get_by_role("link", name="Re-authenticate")
    expect(fix).to_have_attribute("href", f"/auth/microsoft365/start?channel={channel.id}")

    banner.get_by_role("link", name=f"{upn} needs sign-in").click()
    expect(page.get_by_role("heading", name=upn)).to_be_visible()
    expect(page.locator("#last-error")).to_contain_text("AADSTS50173")

    page.screenshot(path=str(SCREENSHOTS / "alerts-banner.png"), full_page=True)
    page.get_by_role("region", name="Needs attention").get_by_role("link", name="Re-authenticate").click()
    pick_account(page, upn, consent=False)
    expect(page.get_by_role("status")).to_contain_text("re-authenticated")
    expect(page.locator("#attention")).to_have_count(0)
