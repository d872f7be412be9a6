"""Shared mailboxes (issue #7): a delegate signs in, Postdesk reads and answers as the shared address.

Real Dovecot decides whether the delegate's token opens the shared mailbox and the submission server
whether it may send as it, both from the rights in the sandbox directory, as Exchange Online does.
Refused logins make Dovecot slow down later logins from the same address, so this module has a Dovecot
(and a submission server filing into it) of its own.
"""

from __future__ import annotations

import itertools

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from postdesk.db.models import Channel, ChannelEvent, ChannelStatus, DeliveryStatus
from postdesk.outbox.queue import Draft
from postdesk.outbox.sender import send_due
from postdesk.runtime import Runtime
from postdesk.sandbox import CONTOSO_TENANT_ID, SandboxDirectory, SandboxServer
from postdesk.sandbox.graph import MailboxRight
from postdesk.sandbox.submission import SubmissionServer
from tests.conftest import csrf_from
from tests.microsoft365 import own_mail_servers
from tests.microsoft365.conftest import (
    Inbox,
    SignIn,
    channels,
    delivery_of,
    fetch,
    queue_draft,
    receive_mail,
)
from tests.support.dovecot import DovecotServer

_numbers = itertools.count(1)
dovecot = own_mail_servers.dovecot
submission = own_mail_servers.submission


@pytest.fixture
def shared(directory: SandboxDirectory) -> str:
    """A shared mailbox of its own for the test, with nobody allowed in yet."""
    return directory.add_shared_mailbox(f"help{next(_numbers)}@contoso.onmicrosoft.com", "Help desk")


def _delegate(directory: SandboxDirectory, name: str) -> str:
    number = next(_numbers)
    return directory.add_user(
        upn=f"{name}{number}@contoso.onmicrosoft.com",
        display_name=f"{name.title()} {number}",
        tenant_id=CONTOSO_TENANT_ID,
    ).upn


@pytest.fixture
def delegate(directory: SandboxDirectory) -> str:
    return _delegate(directory, "dana")


def _as_shared(address: str) -> str:
    return f"?mailbox=shared&shared_address={address}"


def _channel(runtime: Runtime) -> Channel:
    [channel] = channels(runtime)
    return channel


def _events(runtime: Runtime, channel_id: int) -> list[ChannelEvent]:
    with runtime.sessions() as session:
        return list(session.scalars(select(ChannelEvent).where(ChannelEvent.channel_id == channel_id)))


def test_a_delegate_connects_a_shared_mailbox_whose_mail_becomes_tickets_and_replies_leave_from_it(
    signin: SignIn,
    m365_runtime: Runtime,
    directory: SandboxDirectory,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
    shared: str,
    delegate: str,
    customer: str,
    customer_inbox: Inbox,
) -> None:
    directory.grant_mailbox_rights(shared, delegate, full_access=True, send_as=True)

    response = signin.connect(delegate, query=_as_shared(shared))

    assert response.status_code == 303, response.text
    assert response.headers["location"].startswith("/channels?notice=connected")
    channel = _channel(m365_runtime)
    assert (channel.email, channel.shared, channel.account_username) == (shared, True, delegate)
    assert channel.status is ChannelStatus.OK
    ticket = receive_mail(
        m365_runtime, dovecot, channel.id, shared, sender=f"Jana <{customer}>", subject="Invoice question"
    )
    assert ticket.title == "Invoice question"

    queue_draft(m365_runtime, ticket.number, Draft(kind="reply", body_text="Here is your invoice."))
    report = send_due(m365_runtime)

    assert (report.sent, report.failed) == (1, 0), report.problems
    [accepted] = smtp_submission.accepted
    assert accepted.user == delegate  # SMTP AUTH as the delegate ...
    assert accepted.mail_from == shared  # ... sending as the shared mailbox
    [reply] = customer_inbox()
    assert reply["From"].addresses[0].addr_spec == shared


def test_without_full_access_the_admin_is_shown_the_commands_and_can_check_again(
    signin: SignIn,
    desk: TestClient,
    m365_runtime: Runtime,
    directory: SandboxDirectory,
    shared: str,
    delegate: str,
) -> None:
    response = signin.connect(delegate, query=_as_shared(shared))

    assert response.status_code == 409
    assert (
        f"Add-MailboxPermission -Identity {shared} -User {delegate} "
        "-AccessRights FullAccess -AutoMapping $false" in response.text
    )
    assert (
        f"Add-RecipientPermission -Identity {shared} -Trustee {delegate} -AccessRights SendAs"
        in response.text
    )
    channel = _channel(m365_runtime)
    assert (channel.email, channel.status) == (shared, ChannelStatus.ERROR)
    assert channel.last_error is not None and delegate in channel.last_error

    directory.grant_mailbox_rights(shared, delegate)
    checked = desk.post(
        f"/channels/{channel.id}/check-delegation",
        data={"csrf_token": csrf_from(response.text)},
        follow_redirects=False,
    )

    assert checked.status_code == 303, checked.text
    assert _channel(m365_runtime).status is ChannelStatus.OK
    fetch(m365_runtime, channel.id)


def test_another_delegate_may_reauthenticate_and_the_event_log_names_both(
    signin: SignIn, m365_runtime: Runtime, directory: SandboxDirectory, shared: str, delegate: str
) -> None:
    colleague = _delegate(directory, "erin")
    for person in (delegate, colleague):
        directory.grant_mailbox_rights(shared, person)
    assert signin.connect(delegate, query=_as_shared(shared)).status_code == 303
    channel_id = _channel(m365_runtime).id

    response = signin.connect(colleague, query=f"?channel={channel_id}")

    assert response.status_code == 303, response.text
    channel = _channel(m365_runtime)
    assert (channel.email, channel.account_username, channel.status) == (shared, colleague, ChannelStatus.OK)
    [change] = [event for event in _events(m365_runtime, channel_id) if event.kind == "delegate"]
    assert delegate in change.message and colleague in change.message
    fetch(m365_runtime, channel_id)


def test_someone_who_is_not_a_delegate_cannot_reauthenticate_and_nothing_changes(
    signin: SignIn, m365_runtime: Runtime, directory: SandboxDirectory, shared: str, delegate: str
) -> None:
    outsider = _delegate(directory, "olaf")
    directory.grant_mailbox_rights(shared, delegate)
    assert signin.connect(delegate, query=_as_shared(shared)).status_code == 303
    before = _channel(m365_runtime)

    response = signin.connect(outsider, query=f"?channel={before.id}")

    assert response.status_code == 409
    assert f"-Identity {shared} -User {outsider}" in response.text
    assert "Nothing was changed" in response.text
    after = _channel(m365_runtime)
    assert (after.email, after.account_username, after.account_oid) == (shared, delegate, before.account_oid)
    assert after.token_cache == before.token_cache
    assert after.status is ChannelStatus.OK


def test_a_shared_mailbox_is_never_taken_over_by_a_user_mailbox_sign_in(
    signin: SignIn, m365_runtime: Runtime, directory: SandboxDirectory, shared: str, delegate: str
) -> None:
    directory.grant_mailbox_rights(shared, delegate)
    assert signin.connect(delegate, query=_as_shared(shared)).status_code == 303

    response = signin.connect(delegate)  # "a user's mailbox": the delegate's own, a second channel

    assert response.status_code == 303
    assert {(c.email, c.shared) for c in channels(m365_runtime)} == {(shared, True), (delegate, False)}


def test_without_send_as_a_reply_is_refused_with_the_send_as_explanation(
    signin: SignIn,
    m365_runtime: Runtime,
    directory: SandboxDirectory,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
    shared: str,
    delegate: str,
    customer: str,
) -> None:
    directory.grant_mailbox_rights(shared, delegate, full_access=True, send_as=False)
    assert signin.connect(delegate, query=_as_shared(shared)).status_code == 303
    channel = _channel(m365_runtime)
    ticket = receive_mail(m365_runtime, dovecot, channel.id, shared, sender=customer, subject="Refund")

    article_id = queue_draft(m365_runtime, ticket.number, Draft(kind="reply", body_text="Refunded."))

    assert send_due(m365_runtime).failed == 1
    failed = delivery_of(m365_runtime, article_id)
    assert failed.status is DeliveryStatus.FAILED
    assert "SendAsDenied" in (failed.server_reply or "")
    assert "Send as" in (failed.last_error or "")


def test_the_add_account_page_asks_whose_mailbox_and_checks_the_shared_address(
    desk: TestClient, sandbox: SandboxServer
) -> None:
    page = desk.get("/channels/add")
    assert "A shared mailbox (a delegate signs in)" in page.text
    assert "Microsoft Graph" in page.text

    refused = desk.get("/auth/microsoft365/start?mailbox=shared&shared_address=not-an-address")
    assert refused.status_code == 422
    assert "Enter the shared mailbox" in refused.text

    # The form goes straight to the sign-in, and the page lets it follow the redirect to Microsoft.
    assert 'action="/auth/microsoft365/start"' in page.text
    form_action = next(
        rule for rule in page.headers["content-security-policy"].split("; ") if rule.startswith("form-action")
    )
    assert form_action.split()[1] == "'self'"
    assert sandbox.base_url.rstrip("/") in form_action.split()  # the sign-in this desk is set up for
    assert "https://login.microsoftonline.com" in form_action.split()

    prefilled = desk.get("/channels/add?mailbox=shared&shared_address=Help@Contoso.com&transport=graph")
    assert 'value="Help@Contoso.com"' in prefilled.text


def test_graph_sign_in_asks_for_graph_permissions(desk: TestClient) -> None:
    start = desk.get("/auth/microsoft365/start?transport=graph", follow_redirects=False)

    assert start.status_code == 302
    assert "Mail.ReadWrite.Shared" in start.headers["location"]
    assert "IMAP.AccessAsUser.All" not in start.headers["location"]


def test_one_table_of_rights_serves_imap_smtp_and_graph(
    sandbox: SandboxServer, directory: SandboxDirectory, shared: str, delegate: str
) -> None:
    directory.grant_mailbox_rights(shared, delegate, full_access=True, send_as=False)
    sandbox.graph.grant(shared, delegate, MailboxRight.SEND_AS)

    assert directory.rights_on(shared, delegate) == {"FullAccess", "SendAs"}
    assert sandbox.graph.rights(shared, delegate) == {MailboxRight.FULL_ACCESS, MailboxRight.SEND_AS}
    assert directory.mailboxes_openable_by(delegate) == [delegate, shared]

    directory.revoke_mailbox_rights(shared, delegate)

    assert sandbox.graph.rights(shared, delegate) == set()
    assert directory.mailboxes_openable_by(delegate) == [delegate]
