"""A real Dovecot IMAP server for the session, trusting the session's sandbox identity platform."""

from __future__ import annotations

import itertools

import pytest

from postdesk.sandbox import CONTOSO_TENANT_ID, RegisteredApp, SandboxDirectory, SandboxServer
from tests.support.dovecot import IMAP_SCOPE, IssueToken, access_token_for

_mailbox_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def imap_app(sandbox: SandboxServer) -> RegisteredApp:
    return sandbox.directory.register_app(display_name="Postdesk (IMAP tests)")


@pytest.fixture
def issue_token(directory: SandboxDirectory, imap_app: RegisteredApp) -> IssueToken:
    """`issue_token(upn, scope=...)`: an Outlook access token for a sandbox user."""

    def issue(upn: str, *, scope: str = IMAP_SCOPE) -> str:
        return access_token_for(directory, imap_app, upn, scope=scope)

    return issue


@pytest.fixture
def new_mailbox(directory: SandboxDirectory) -> str:
    """A sandbox user of its own for one test, so mail delivered elsewhere never shows up in it."""
    number = next(_mailbox_numbers)
    user = directory.add_user(
        upn=f"imap-test-{number}@contoso.onmicrosoft.com",
        display_name=f"IMAP Test {number}",
        tenant_id=CONTOSO_TENANT_ID,
    )
    return user.upn
