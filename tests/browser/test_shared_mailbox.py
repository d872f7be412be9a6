"""An admin adds a shared mailbox in headless Chromium: a delegate signs in, Postdesk opens the mailbox.

Dovecot refuses the delegate until the sandbox directory grants FullAccess; refused logins slow later
ones from the same address, so the module has its own Dovecot and submission server.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from postdesk.sandbox import CONTOSO_TENANT_ID, SandboxDirectory, SandboxServer
from postdesk.sandbox.mailserver import DovecotServer
from postdesk.sandbox.submission import SubmissionServer
from tests.browser.conftest import LiveDesk, live_desk, pick_account, sign_in_page
from tests.support.tls import ca_bundle

pytestmark = pytest.mark.browser
_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def dovecot(sandbox: SandboxServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotServer]:
    server = DovecotServer(
        tmp_path_factory.mktemp("dovecot-shared"),
        sandbox_base_url=sandbox.base_url,
        sandbox_ca=sandbox.ca_path,
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def submission(
    sandbox: SandboxServer, dovecot: DovecotServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SubmissionServer]:
    server = SubmissionServer(
        sandbox.directory, tmp_path_factory.mktemp("submission-shared"), dovecot=dovecot
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def trusted_cas(
    sandbox: SandboxServer,
    dovecot: DovecotServer,
    submission: SubmissionServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    return ca_bundle(tmp_path_factory.mktemp("cas-shared") / "cas.pem", sandbox, dovecot, submission)


@pytest.fixture
def desk(
    tmp_path: Path,
    sandbox: SandboxServer,
    directory: SandboxDirectory,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
    trusted_cas: Path,
) -> Iterator[LiveDesk]:
    with live_desk(
        tmp_path, sandbox, ca_bundle=trusted_cas, dovecot=dovecot, submission=smtp_submission
    ) as live:
        live.save_app(directory)
        yield live


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
    page.get_by_role("button", name="Continue").click()
    expect(page.locator("#sign-in-next")).to_contain_text(f"Sign in as a delegate of {shared}")
    page.get_by_role("link", name="Sign in with Microsoft").click()
    pick_account(page, delegate, consent=True)


def test_an_admin_adds_a_shared_mailbox_a_delegate_signs_in_for(
    page: Page, desk: LiveDesk, directory: SandboxDirectory
) -> None:
    shared, delegate = _shared_and_delegate(directory)
    directory.grant_mailbox_rights(shared, delegate, full_access=True, send_as=True)

    _add_shared_mailbox(page, desk, shared, delegate)

    expect(page.get_by_role("status")).to_have_text("The mailbox is connected.")
    row = page.locator(f"tr[data-email='{shared}']")
    expect(row).to_contain_text(f"shared, via {delegate}")
    expect(row).to_contain_text("Connected")


def test_without_the_rights_the_page_shows_the_commands_and_check_again_connects_it(
    page: Page, desk: LiveDesk, directory: SandboxDirectory
) -> None:
    shared, delegate = _shared_and_delegate(directory)

    _add_shared_mailbox(page, desk, shared, delegate)

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
