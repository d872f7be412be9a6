"""The whole Microsoft 365 connection as an admin does it, in headless Chromium against the sandbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from postdesk.runtime import Runtime
from postdesk.sandbox import RegisteredApp, SandboxDirectory, SandboxServer
from tests.browser.conftest import add_user_mailbox, live_desk, pick_account, sign_in_page

pytestmark = pytest.mark.browser
ADELE = "adele.vance@contoso.onmicrosoft.com"
MEGAN = "megan.bowen@contoso.onmicrosoft.com"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    with SandboxServer(SandboxDirectory.default(), state_dir=tmp_path_factory.mktemp("sandbox")) as server:
        yield server


@pytest.fixture
def desk(tmp_path: Path, sandbox: SandboxServer) -> Iterator[tuple[str, Runtime]]:
    with live_desk(tmp_path, sandbox, ca_bundle=sandbox.ca_path) as live:
        yield live.url, live.runtime


@pytest.fixture
def entra_app(sandbox: SandboxServer, desk: tuple[str, Runtime]) -> RegisteredApp:
    url, _ = desk
    return sandbox.directory.register_app(
        display_name="Postdesk", redirect_uris=[f"{url}/auth/microsoft365/callback"]
    )


def test_an_admin_connects_the_app_and_two_mailboxes(
    page: Page, desk: tuple[str, Runtime], entra_app: RegisteredApp
) -> None:
    url, _ = desk
    sign_in_page(page, url)
    page.get_by_role("link", name="Channels").click()

    expect(page.locator("#callback")).to_have_value(f"{url}/auth/microsoft365/callback")
    page.get_by_label("Application (client) ID").fill(entra_app.client_id)
    page.get_by_label("Directory (tenant) ID or domain").fill("contoso.onmicrosoft.com")
    page.get_by_label("Client secret value").fill(entra_app.client_secrets[0].value)
    page.get_by_role("button", name="Save app").click()
    expect(page.get_by_role("status")).to_have_text(
        "The app registration was saved. You can now add mailboxes."
    )

    add_user_mailbox(page)
    pick_account(page, ADELE, consent=True)
    expect(page.get_by_role("status")).to_have_text("The mailbox is connected.")
    adele_row = page.locator(f"tr[data-email='{ADELE}']")
    expect(adele_row).to_contain_text("Adele Vance")
    expect(adele_row).to_contain_text("Connected")

    add_user_mailbox(page)
    pick_account(page, MEGAN, consent=True)
    expect(page.locator(f"tr[data-email='{MEGAN}']")).to_contain_text("Connected")
    expect(page.locator("tr[data-email]")).to_have_count(2)

    adele_row.get_by_role("link", name="Re-authenticate").click()
    pick_account(page, MEGAN, consent=False)
    expect(page.get_by_role("alert")).to_contain_text("You signed in as a different mailbox")
    expect(page.get_by_role("alert")).to_contain_text(
        f"This channel is {ADELE}, but you signed in as {MEGAN}"
    )
    expect(page.locator(f"tr[data-email='{ADELE}']")).to_contain_text("Connected")
    # The app-only form's address field takes the row's room, not its transport menu.
    address = page.get_by_label("Mailbox address").bounding_box()
    transport = page.get_by_label("Read and send through").bounding_box()
    assert address is not None and transport is not None
    assert address["width"] > 2 * transport["width"], (address, transport)
    page.screenshot(
        path=str(Path(__file__).parent.parent.parent / ".pytest_cache" / "channels.png"), full_page=True
    )
