"""An admin adds a shared mailbox in headless Chromium: a delegate signs in, Postdesk opens the mailbox.

Dovecot refuses the delegate until the sandbox directory grants FullAccess; refused logins slow later
ones from the same address, so the module has its own Dovecot and submission server.
"""

from __future__ import annotations

import itertools

import pytest
from playwright.sync_api import Page, expect

from postdesk.sandbox import CONTOSO_TENANT_ID, SandboxDirectory
from tests.browser.conftest import LiveDesk, pick_account, sign_in_page
from tests.microsoft365 import own_mail_servers

pytestmark = pytest.mark.browser
_numbers = itertools.count(1)
dovecot = own_mail_servers.dovecot
submission = own_mail_servers.submission


def _shared_and_delegate(directory: SandboxDirectory) -> tuple[str, str]:
    number = next(_numbers)
    shared = directory.add_shared_mailbox(f"orders{number}@contoso.onmicrosoft.com", "Orders")
    delegate = directory.add_user(
        upn=f"paula{number}@contoso.onmicrosoft.com",
        display_name=f"Paula {number}",
        tenant_id=CONTOSO_TENANT_ID,
    ).upn
    return shared, delegate


def _add_shared_mailbox(page: Page, desk: LiveDesk, shared: str, delegate: str) -> None:
    sign_in_page(page, desk.url)
    page.get_by_role("link", name="Channels").click()
    page.get_by_role("link", name="Add account").click()
    page.get_by_label("A shared mailbox (a delegate signs in)").check()
    page.get_by_label("Shared mailbox address").fill(shared)
    expect(page.get_by_label("IMAP and SMTP (recommended)")).to_be_checked()
    page.get_by_role("button", name="Sign in with Microsoft").click()
    pick_account(page, delegate, consent=True)


def test_an_admin_adds_a_shared_mailbox_a_delegate_signs_in_for(
    page: Page, app_desk: LiveDesk, directory: SandboxDirectory
) -> None:
    shared, delegate = _shared_and_delegate(directory)
    directory.grant_mailbox_rights(shared, delegate, full_access=True, send_as=True)

    _add_shared_mailbox(page, app_desk, shared, delegate)

    expect(page.get_by_role("status")).to_have_text("The mailbox is connected.")
    row = page.locator(f"tr[data-email='{shared}']")
    expect(row).to_contain_text(f"shared, via {delegate}")
    expect(row).to_contain_text("Connected")


def test_without_the_rights_the_page_shows_the_commands_and_check_again_connects_it(
    page: Page, app_desk: LiveDesk, directory: SandboxDirectory
) -> None:
    shared, delegate = _shared_and_delegate(directory)

    _add_shared_mailbox(page, app_desk, shared, delegate)

    expect(page.get_by_role("alert")).to_contain_text(f"tried to open the shared mailbox {shared}")
    commands = page.locator("#powershell")
    expect(commands).to_contain_text(
        f"Add-MailboxPermission -Identity {shared} -User {delegate} "
        "-AccessRights FullAccess -AutoMapping $false"
    )
    expect(commands).to_contain_text(
        f"Add-RecipientPermission -Identity {shared} -Trustee {delegate} -AccessRights SendAs"
    )

    directory.grant_mailbox_rights(shared, delegate)
    page.get_by_role("button", name="Check again").click()

    expect(page.get_by_role("status")).to_contain_text("The shared mailbox opens with the delegate's sign-in")
    expect(page.locator(f"tr[data-email='{shared}']")).to_contain_text("Connected")
