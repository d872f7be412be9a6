"""The whole Microsoft 365 connection as an admin does it, in headless Chromium against the sandbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from postdesk.config import Settings
from postdesk.db.models import Role
from postdesk.runtime import Runtime, bootstrap
from postdesk.sandbox import RegisteredApp, SandboxDirectory, SandboxServer
from postdesk.web.app import create_app
from tests.conftest import ADMIN_PASSWORD, TEST_SECRET_KEY, add_user
from tests.support.live import serve_in_thread
from tests.support.postgres import free_port

pytestmark = pytest.mark.browser
ADELE = "adele.vance@contoso.onmicrosoft.com"
MEGAN = "megan.bowen@contoso.onmicrosoft.com"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    with SandboxServer(SandboxDirectory.default(), state_dir=tmp_path_factory.mktemp("sandbox")) as server:
        yield server


@pytest.fixture
def desk(tmp_path: Path, sandbox: SandboxServer) -> Iterator[tuple[str, Runtime]]:
    port = free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        secret_key=TEST_SECRET_KEY,
        base_url=f"http://127.0.0.1:{port}",
        microsoft_login_url=sandbox.base_url,
        ca_bundle=sandbox.ca_path,
    )
    runtime = bootstrap(settings, apply_migrations=True)
    add_user(runtime, "admin@example.com", ADMIN_PASSWORD, role=Role.ADMIN)
    with serve_in_thread(create_app(runtime), port=port) as url:
        yield url, runtime


@pytest.fixture
def entra_app(sandbox: SandboxServer, desk: tuple[str, Runtime]) -> RegisteredApp:
    url, _ = desk
    return sandbox.directory.register_app(
        display_name="Postdesk", redirect_uris=[f"{url}/auth/microsoft365/callback"]
    )


def sign_in_at_sandbox(page: Page, upn: str, *, consent: bool) -> None:
    expect(page.get_by_text("Postdesk sandbox — not Microsoft")).to_be_visible()
    page.get_by_role("button", name=upn).click()
    if consent:
        expect(page.get_by_role("heading", name="Permissions requested")).to_be_visible()
        page.get_by_role("button", name="Accept").click()


def test_an_admin_connects_the_app_and_two_mailboxes(
    page: Page, desk: tuple[str, Runtime], entra_app: RegisteredApp
) -> None:
    url, _ = desk
    page.goto(f"{url}/login")
    page.get_by_label("Email address").fill("admin@example.com")
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("link", name="Channels").click()

    expect(page.locator("#callback")).to_have_value(f"{url}/auth/microsoft365/callback")
    page.get_by_label("Application (client) ID").fill(entra_app.client_id)
    page.get_by_label("Directory (tenant) ID or domain").fill("contoso.onmicrosoft.com")
    page.get_by_label("Client secret value").fill(entra_app.client_secrets[0].value)
    page.get_by_role("button", name="Save app").click()
    expect(page.get_by_role("status")).to_have_text(
        "The app registration was saved. You can now add mailboxes."
    )

    page.get_by_role("link", name="Add account").click()
    sign_in_at_sandbox(page, ADELE, consent=True)
    expect(page.get_by_role("status")).to_have_text("The mailbox is connected.")
    adele_row = page.locator(f"tr[data-email='{ADELE}']")
    expect(adele_row).to_contain_text("Adele Vance")
    expect(adele_row).to_contain_text("Connected")

    page.get_by_role("link", name="Add account").click()
    sign_in_at_sandbox(page, MEGAN, consent=True)
    expect(page.locator(f"tr[data-email='{MEGAN}']")).to_contain_text("Connected")
    expect(page.locator("tr[data-email]")).to_have_count(2)

    adele_row.get_by_role("link", name="Re-authenticate").click()
    sign_in_at_sandbox(page, MEGAN, consent=False)
    expect(page.get_by_role("alert")).to_contain_text("You signed in as a different mailbox")
    expect(page.get_by_role("alert")).to_contain_text(
        f"This channel is {ADELE}, but you signed in as {MEGAN}"
    )
    expect(page.locator(f"tr[data-email='{ADELE}']")).to_contain_text("Connected")
    page.screenshot(
        path=str(Path(__file__).parent.parent.parent / ".pytest_cache" / "channels.png"), full_page=True
    )
