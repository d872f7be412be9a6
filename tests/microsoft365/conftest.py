"""Postdesk connected to the sandbox identity platform: an admin, a registered app, a scripted browser."""

from __future__ import annotations

import itertools
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from postdesk.config import Settings
from postdesk.db.models import (
    Channel,
    DeliveryStatus,
    MicrosoftApp,
    OutboundMessage,
    Ticket,
    Transport,
    User,
)
from postdesk.db.session import transaction
from postdesk.ingest.fetch import FetchResult, fetch_channel
from postdesk.microsoft.clouds import CLOUDS, GRAPH_MAIL_PERMISSIONS
from postdesk.outbox.queue import Draft, queue_reply
from postdesk.runtime import Runtime, bootstrap
from postdesk.sandbox import CONTOSO_TENANT_ID, GraphMailStore, RegisteredApp, SandboxDirectory, SandboxServer
from postdesk.sandbox.submission import SubmissionServer
from postdesk.tickets.service import get_ticket
from postdesk.web.app import create_app
from tests.conftest import ADMIN_PASSWORD, add_user, sign_in
from tests.support.dovecot import DovecotServer, inbox
from tests.support.mailfactory import customer_mail
from tests.support.sandbox_browser import Browser
from tests.support.tls import ca_bundle

BASE_URL = "http://127.0.0.1:8025"
CALLBACK = f"{BASE_URL}/auth/microsoft365/callback"
ADELE = "adele.vance@contoso.onmicrosoft.com"
MEGAN = "megan.bowen@contoso.onmicrosoft.com"
ALEX = "alex.wilber@fabrikam.onmicrosoft.com"
SECRET_KEY = "test-secret-key-0123456789-abcdefghijklmnop"
QUESTION_ID = "<question-1@fabrikam.onmicrosoft.com>"
DELIVERY_DEADLINE_SECONDS = 20
_mailbox_numbers = itertools.count(1)
_customers = itertools.count(1)


@pytest.fixture
def entra_app(directory: SandboxDirectory) -> RegisteredApp:
    """A fresh app registration in the sandbox's Contoso tenant, as an admin makes in the Azure portal."""
    return directory.register_app(display_name="Postdesk", redirect_uris=[CALLBACK])


@pytest.fixture
def m365_settings(
    tmp_path: Path,
    sandbox: SandboxServer,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
    trusted_cas: Path,
) -> Settings:
    """A desk signing in at the sandbox, reading mail from the test Dovecot and sending through the
    test submission server."""
    return Settings(
        data_dir=tmp_path / "data",
        secret_key=SECRET_KEY,
        base_url=BASE_URL,
        microsoft_login_url=sandbox.base_url,
        ca_bundle=trusted_cas,
        microsoft_imap=f"127.0.0.1:{dovecot.port}",
        microsoft_smtp=f"127.0.0.1:{smtp_submission.port}",
        microsoft_graph_url=sandbox.base_url,  # the sandbox serves Graph's mail API too
    )


@pytest.fixture
def m365_runtime(m365_settings: Settings) -> Iterator[Runtime]:
    runtime = bootstrap(m365_settings, apply_migrations=True)
    yield runtime
    runtime.engine.dispose()


@pytest.fixture
def m365_admin(m365_runtime: Runtime) -> User:
    from postdesk.db.models import Role

    return add_user(m365_runtime, "admin@example.com", ADMIN_PASSWORD, role=Role.ADMIN)


def store_app(runtime: Runtime, app: RegisteredApp, *, tenant: str = "contoso.onmicrosoft.com") -> None:
    with transaction(runtime.sessions) as session:
        session.add(
            MicrosoftApp(client_id=app.client_id, tenant=tenant, client_secret=app.client_secrets[0].value)
        )


@pytest.fixture
def desk(m365_runtime: Runtime, m365_admin: User, entra_app: RegisteredApp) -> Iterator[TestClient]:
    """Postdesk with the app registration saved and an admin signed in."""
    store_app(m365_runtime, entra_app)
    with TestClient(create_app(m365_runtime), base_url=BASE_URL) as client:
        sign_in(client, m365_admin.email, ADMIN_PASSWORD)
        yield client


@pytest.fixture
def browser(sandbox: SandboxServer) -> Iterator[Browser]:
    context = ssl.create_default_context(cafile=str(sandbox.ca_path))
    with httpx.Client(verify=context, trust_env=False, follow_redirects=False, timeout=10) as client:
        yield Browser(client, redirect_uri=CALLBACK)


@dataclass
class SignIn:
    """One trip through Microsoft's sign-in: start in Postdesk, sign in at the sandbox, come back."""

    desk: TestClient
    browser: Browser

    def authorize_url(self, query: str = "") -> str:
        start = self.desk.get(f"/auth/microsoft365/start{query}", follow_redirects=False)
        assert start.status_code == 302, start.text
        location: str = start.headers["location"]
        return location

    def at_microsoft(self, upn: str, *, query: str = "", consent: str | None = "accept") -> dict[str, str]:
        return self.browser.sign_in(self.authorize_url(query), upn=upn, consent=consent)

    def back_at_postdesk(self, params: dict[str, str]) -> httpx.Response:
        response: httpx.Response = self.desk.get(
            "/auth/microsoft365/callback", params=params, follow_redirects=False
        )
        return response

    def connect(self, upn: str, *, query: str = "") -> httpx.Response:
        return self.back_at_postdesk(self.at_microsoft(upn, query=query))


@pytest.fixture
def signin(desk: TestClient, browser: Browser) -> SignIn:
    return SignIn(desk, browser)


def channels(runtime: Runtime) -> list[Channel]:
    with runtime.sessions() as session:
        return list(session.query(Channel).order_by(Channel.id))


@pytest.fixture(scope="module")
def trusted_cas(
    sandbox: SandboxServer,
    dovecot: DovecotServer,
    submission: SubmissionServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """POSTDESK_CA_BUNDLE for a desk that talks to the sandbox, Dovecot and the submission server: one
    per module, so that it trusts a module's own servers (tests/microsoft365/own_mail_servers.py)."""
    return ca_bundle(tmp_path_factory.mktemp("cas") / "cas.pem", sandbox, dovecot, submission)


@pytest.fixture
def mailbox_user(directory: SandboxDirectory) -> str:
    """A sandbox user (and so a Dovecot mailbox) of its own for one test."""
    number = next(_mailbox_numbers)
    return directory.add_user(
        upn=f"desk{number}@contoso.onmicrosoft.com",
        display_name=f"Help Desk {number}",
        tenant_id=CONTOSO_TENANT_ID,
    ).upn


@pytest.fixture
def channel_id(signin: SignIn, m365_runtime: Runtime, mailbox_user: str) -> int:
    """A mailbox of its own for the test, connected through the real sign-in."""
    assert signin.connect(mailbox_user).status_code == 303
    [channel] = channels(m365_runtime)
    return channel.id


def fetch(runtime: Runtime, channel_id: int) -> FetchResult:
    """One fetch pass that must succeed."""
    result = fetch_channel(runtime, channel_id)
    assert result.error is None, result.error
    return result


def tickets(runtime: Runtime) -> list[Ticket]:
    with runtime.sessions() as session:
        return list(session.scalars(select(Ticket).order_by(Ticket.id)))


# -- a customer writes in, the desk answers --------------------------------------------------------


@pytest.fixture
def customer() -> str:
    """A customer whose mailbox is in the test Dovecot (another tenant's domain, like a real customer)."""
    return f"customer{next(_customers)}@fabrikam.onmicrosoft.com"


Inbox = Callable[[], list[EmailMessage]]


@pytest.fixture
def customer_inbox(dovecot: DovecotServer, customer: str) -> Inbox:
    """The customer's inbox in the test Dovecot, read afresh at each call."""
    return lambda: inbox(dovecot, customer)


@pytest.fixture
def colleague(customer: str) -> str:
    return f"colleague-of-{customer}"


@pytest.fixture
def question_cc() -> tuple[str, ...]:
    """Whom the customer's first mail copies (nobody, unless a test module overrides this)."""
    return ()


@pytest.fixture
def ticket_number(
    channel_id: int,
    m365_runtime: Runtime,
    dovecot: DovecotServer,
    mailbox_user: str,
    customer: str,
    question_cc: tuple[str, ...],
) -> int:
    """A ticket opened by the customer's mail "Printer on fire" (QUESTION_ID) to the connected mailbox."""
    return receive_mail(
        m365_runtime,
        dovecot,
        channel_id,
        mailbox_user,
        sender=f"Jana Novák <{customer}>",
        subject="Printer on fire",
        message_id=QUESTION_ID,
        extra_headers={"Cc": ", ".join(question_cc)} if question_cc else None,
    ).number


def receive_mail(
    runtime: Runtime,
    dovecot: DovecotServer,
    channel_id: int,
    mailbox: str,
    *,
    sender: str,
    subject: str,
    message_id: str | None = None,
    in_reply_to: str | None = None,
    extra_headers: dict[str, str] | None = None,
) -> Ticket:
    """A customer's mail arrives in the connected ``mailbox`` and is fetched: the desk's one ticket."""
    dovecot.deliver(
        mailbox,
        customer_mail(
            to=mailbox,
            sender=sender,
            subject=subject,
            message_id=message_id,
            in_reply_to=in_reply_to,
            extra_headers=extra_headers,
        ),
    )
    fetch(runtime, channel_id)
    [ticket] = tickets(runtime)
    return ticket


def queue_draft(runtime: Runtime, number: int, draft: Draft) -> int:
    """Queue a reply (or note) to ticket ``number`` outside the web, as nobody: its article's id."""
    with transaction(runtime.sessions) as session:
        ticket = get_ticket(session, number)
        assert ticket is not None
        return queue_reply(session, runtime.settings, ticket, draft, author=None).id


def find_delivery(runtime: Runtime, article_id: int) -> OutboundMessage | None:
    with runtime.sessions() as session:
        return session.scalar(select(OutboundMessage).where(OutboundMessage.article_id == article_id))


def delivery_of(runtime: Runtime, article_id: int) -> OutboundMessage:
    """The outbound message of the article, which must have one."""
    row = find_delivery(runtime, article_id)
    assert row is not None
    return row


@contextmanager
def changing_delivery(runtime: Runtime, article_id: int) -> Iterator[OutboundMessage]:
    """The article's outbound message, for the block to change and the transaction to save."""
    with transaction(runtime.sessions) as session:
        row = session.scalar(select(OutboundMessage).where(OutboundMessage.article_id == article_id))
        assert row is not None
        yield row


def wait_for_delivery(runtime: Runtime, article_id: int, *statuses: DeliveryStatus) -> OutboundMessage:
    """Wait for the background sender the reply route started to finish with the article's mail."""
    deadline = time.monotonic() + DELIVERY_DEADLINE_SECONDS
    while True:
        row = find_delivery(runtime, article_id)
        if row is not None and row.status in statuses:
            return row
        if time.monotonic() > deadline:
            pytest.fail(f"article {article_id} still {row.status if row else 'unqueued'} after the deadline")
        time.sleep(0.1)


@pytest.fixture
def store(sandbox: SandboxServer) -> Iterator[GraphMailStore]:
    """The sandbox's Graph mailboxes, emptied of faults, holds and limits before and after the test."""
    sandbox.graph.reset()
    yield sandbox.graph
    sandbox.graph.reset()


def signin_client_id(runtime: Runtime) -> str:
    with runtime.sessions() as session:
        return session.scalars(select(MicrosoftApp.client_id)).one()


@pytest.fixture
def graph_channel(
    signin: SignIn,
    m365_runtime: Runtime,
    mailbox_user: str,
    directory: SandboxDirectory,
    store: GraphMailStore,
) -> int:
    """A mailbox connected through the real sign-in, then switched to Graph, with the account's consent
    to Graph's mail permissions granted in the directory as a consent screen for them would."""
    assert signin.connect(mailbox_user).status_code == 303
    [channel] = channels(m365_runtime)
    user = directory.find_user(mailbox_user)
    assert user is not None
    graph = CLOUDS["global"].graph_url
    directory.grant_consent(
        user.oid, signin_client_id(m365_runtime), [f"{graph}/{name}" for name in GRAPH_MAIL_PERMISSIONS]
    )
    with transaction(m365_runtime.sessions) as session:
        row = session.get(Channel, channel.id)
        assert row is not None
        row.transport = Transport.GRAPH
    return channel.id
