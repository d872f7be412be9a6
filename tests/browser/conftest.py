"""A Chromium browser per test module, and Postdesk served on a real port: signing in at the sandbox,
and for the desks that handle mail, reading the test Dovecot and sending through the submission server."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from postdesk.config import Settings
from postdesk.db.models import Role
from postdesk.runtime import Runtime, bootstrap
from postdesk.sandbox import SandboxDirectory, SandboxServer
from postdesk.sandbox.mailserver import DovecotServer
from postdesk.sandbox.submission import SubmissionServer
from postdesk.web.app import create_app
from tests.conftest import ADMIN_PASSWORD, TEST_SECRET_KEY, add_user, csrf_from
from tests.microsoft365 import conftest as m365
from tests.support.live import CHROMIUM, CHROMIUM_ARGS, serve_in_thread
from tests.support.postgres import free_port
from tests.support.sandbox_browser import Browser as SandboxBrowser

ADMIN = "admin@example.com"
# The Microsoft 365 tests' fixtures: the CA bundle trusting all three test servers, a mailbox of one's own.
trusted_cas = m365.trusted_cas
mailbox_user = m365.mailbox_user


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    yield tab
    context.close()


@dataclass
class LiveDesk:
    """Postdesk on a real port, with an admin (ADMIN, ADMIN_PASSWORD)."""

    url: str
    runtime: Runtime

    @property
    def callback(self) -> str:
        return f"{self.url}/auth/microsoft365/callback"

    def save_app(self, directory: SandboxDirectory) -> None:
        """Register an app for this desk in the sandbox's Contoso tenant and save it in Postdesk."""
        m365.store_app(
            self.runtime, directory.register_app(display_name="Postdesk", redirect_uris=[self.callback])
        )


@dataclass
class MailDesk(LiveDesk):
    """A live desk with one mailbox connected."""

    mailbox: str
    channel_id: int


@contextmanager
def live_desk(
    tmp_path: Path,
    sandbox: SandboxServer,
    *,
    ca_bundle: Path,
    dovecot: DovecotServer | None = None,
    submission: SubmissionServer | None = None,
) -> Iterator[LiveDesk]:
    """Postdesk on a real port signing in at ``sandbox``, reading mail from ``dovecot`` and sending it
    through ``submission`` (where given), with an admin."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = Settings(
        data_dir=tmp_path / "data",
        secret_key=TEST_SECRET_KEY,
        base_url=url,
        microsoft_login_url=sandbox.base_url,
        ca_bundle=ca_bundle,
        microsoft_imap=f"127.0.0.1:{dovecot.port}" if dovecot else None,
        microsoft_smtp=f"127.0.0.1:{submission.port}" if submission else None,
    )
    runtime = bootstrap(settings, apply_migrations=True)
    try:
        add_user(runtime, ADMIN, ADMIN_PASSWORD, role=Role.ADMIN)
        with serve_in_thread(create_app(runtime), port=port):
            yield LiveDesk(url, runtime)
    finally:
        runtime.engine.dispose()


def connect_mailbox(desk: LiveDesk, sandbox: SandboxServer, mailbox: str) -> int:
    """The admin adds the mailbox through the real sign-in: Postdesk → the sandbox's pages → callback.
    The desk's one channel."""
    with httpx.Client(base_url=desk.url, follow_redirects=False, timeout=10) as client:
        login = client.get("/login")
        signed_in = client.post(
            "/login",
            data={"email": ADMIN, "password": ADMIN_PASSWORD, "csrf_token": csrf_from(login.text)},
        )
        assert signed_in.status_code == 303, signed_in.text
        start = client.get("/auth/microsoft365/start")
        assert start.status_code == 302, start.text
        context = ssl.create_default_context(cafile=str(sandbox.ca_path))
        with httpx.Client(
            verify=context, trust_env=False, follow_redirects=False, timeout=10
        ) as at_microsoft:
            microsoft = SandboxBrowser(at_microsoft, redirect_uri=desk.callback)
            params = microsoft.sign_in(start.headers["location"], upn=mailbox)
        connected = client.get("/auth/microsoft365/callback", params=params)
        assert connected.status_code == 303, connected.text
    [channel] = m365.channels(desk.runtime)
    return channel.id


@pytest.fixture
def app_desk(
    tmp_path: Path,
    sandbox: SandboxServer,
    directory: SandboxDirectory,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
    trusted_cas: Path,
) -> Iterator[LiveDesk]:
    """Postdesk on a real port, reading the test Dovecot and sending through the test submission server,
    with the app registration saved and no mailbox connected yet."""
    with live_desk(
        tmp_path, sandbox, ca_bundle=trusted_cas, dovecot=dovecot, submission=smtp_submission
    ) as desk:
        desk.save_app(directory)
        yield desk


@pytest.fixture
def mail_desk(app_desk: LiveDesk, sandbox: SandboxServer, mailbox_user: str) -> MailDesk:
    """The app desk with a mailbox of its own connected."""
    channel_id = connect_mailbox(app_desk, sandbox, mailbox_user)
    return MailDesk(app_desk.url, app_desk.runtime, mailbox_user, channel_id)


def sign_in_page(page: Page, url: str, email: str = ADMIN, password: str = ADMIN_PASSWORD) -> None:
    """Sign in on Postdesk's login page, as a person does."""
    page.goto(f"{url}/login")
    page.get_by_label("Email address").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def add_user_mailbox(page: Page) -> None:
    """On the Channels page: Add account, keep the defaults (a user's mailbox, IMAP and SMTP), and go
    to Microsoft's sign-in: one click on the form, which the page's CSP lets redirect to the sign-in."""
    page.get_by_role("link", name="Add account").click()
    page.get_by_role("button", name="Sign in with Microsoft").click()


def pick_account(page: Page, upn: str, *, consent: bool) -> None:
    """On the sandbox's sign-in page: pick the account, and accept the permissions if asked to."""
    expect(page.get_by_text("Postdesk sandbox — not Microsoft")).to_be_visible()
    page.get_by_role("button", name=upn).click()
    if consent:
        expect(page.get_by_role("heading", name="Permissions requested")).to_be_visible()
        page.get_by_role("button", name="Accept").click()
