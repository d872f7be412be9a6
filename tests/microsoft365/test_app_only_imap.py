"""App-only mailboxes over IMAP and SMTP (issue #7, "App-only (no user sign-in)"): the app signs in to
the mailbox as itself, with IMAP.AccessAsApp and SMTP.SendAsApp and FullAccess on the mailbox, as
Microsoft documents for client credentials. Against the sandbox identity platform, a real Dovecot that
validates the app's token by introspection, and the SMTP submission stand-in; a mailbox the app has no
FullAccess on is refused with the PowerShell that grants it.

Tests that provoke refused IMAP logins come last: Dovecot slows down later logins from the same address,
and this module has its own mail servers so that this stays here."""

from __future__ import annotations

import base64
import smtplib
import ssl
from email import message_from_bytes, policy
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from postdesk.db.models import DeliveryStatus, Transport, User
from postdesk.microsoft.app_only import (
    OBJECT_ID_PLACEHOLDER,
    add_app_only_mailbox,
    mailbox_permission_powershell,
)
from postdesk.outbox.queue import Draft
from postdesk.outbox.sender import send_due
from postdesk.runtime import Runtime
from postdesk.sandbox import CONTOSO_TENANT_ID, RegisteredApp, SandboxDirectory, SandboxServer
from postdesk.sandbox.identity import introspect
from postdesk.sandbox.submission import SubmissionServer
from postdesk.web.app import create_app
from tests.conftest import ADMIN_PASSWORD, csrf_from, sign_in
from tests.microsoft365 import own_mail_servers
from tests.microsoft365.conftest import (
    BASE_URL,
    QUESTION_ID,
    channels,
    delivery_of,
    fetch,
    queue_draft,
    tickets,
)
from tests.microsoft365.test_app_only import (
    CUSTOMER,
    other_mailbox,
    postdesk_command,
    register_daemon,
    service_principal,
)
from tests.support.dovecot import DovecotServer
from tests.support.mailfactory import customer_mail

# Refused logins here must not slow down other modules' logins: this module has its own servers.
dovecot = own_mail_servers.dovecot
submission = own_mail_servers.submission

OUTLOOK = "https://outlook.office.com"
IMAP_AND_SMTP = (f"{OUTLOOK}/IMAP.AccessAsApp", f"{OUTLOOK}/SMTP.SendAsApp")


def app_token(sandbox: SandboxServer, app: RegisteredApp, resource: str = OUTLOOK) -> str:
    """The app's own token for ``resource``, straight from the sandbox's token endpoint (client secret)."""
    context = ssl.create_default_context(cafile=str(sandbox.ca_path))
    with httpx.Client(verify=context, trust_env=False, timeout=10) as client:
        response = client.post(
            f"{sandbox.base_url}/{CONTOSO_TENANT_ID}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": app.client_id,
                "client_secret": app.client_secrets[0].value,
                "scope": f"{resource}/.default",
            },
        )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def smtp_auth(server: SubmissionServer, mailbox: str, token: str) -> tuple[int, bytes]:
    """``AUTH XOAUTH2`` as ``mailbox`` after STARTTLS: the server's code and text."""
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("desk.example.test")
        client.starttls(context=ssl.create_default_context(cafile=str(server.ca_path)))
        client.ehlo("desk.example.test")
        blob = base64.b64encode(f"user={mailbox}\x01auth=Bearer {token}\x01\x01".encode()).decode()
        return client.docmd("AUTH", f"XOAUTH2 {blob}")


@pytest.fixture
def imap_app(m365_runtime: Runtime, directory: SandboxDirectory) -> RegisteredApp:
    """An app registration with IMAP.AccessAsApp and SMTP.SendAsApp, consented in Contoso and saved in
    Postdesk with a certificate."""
    return register_daemon(m365_runtime, directory, IMAP_AND_SMTP)


@pytest.fixture
def channel_id(
    m365_runtime: Runtime, directory: SandboxDirectory, imap_app: RegisteredApp, mailbox_user: str
) -> int:
    """``mailbox_user`` added app-only over IMAP, the app holding FullAccess on it (what
    ``Add-MailboxPermission -AccessRights FullAccess`` for its service principal does)."""
    directory.grant_mailbox_rights(mailbox_user, imap_app.client_id, send_as=False)
    outcome = add_app_only_mailbox(m365_runtime, mailbox_user, transport=Transport.IMAP)
    assert outcome.ok, outcome
    assert outcome.channel_id is not None
    return outcome.channel_id


# -- the sandbox: Exchange's rules for app tokens ------------------------------------------------------


def test_an_imap_app_tokens_introspection_lists_the_mailboxes_the_app_has_fullaccess_on(
    sandbox: SandboxServer, directory: SandboxDirectory, mailbox_user: str
) -> None:
    app = directory.register_app(display_name="Postdesk", application_permissions=IMAP_AND_SMTP)
    ceo = other_mailbox(directory)
    directory.grant_mailbox_rights(mailbox_user, app.client_id, send_as=False)
    directory.grant_mailbox_rights(ceo, app.client_id, full_access=False, send_as=True)

    answer: dict[str, Any] = introspect(directory, app_token(sandbox, app))

    assert answer["active"] is True
    assert answer["username"] == app.client_id  # the client is the resource owner; no address matches
    assert "upn" not in answer
    assert answer["mailboxes"] == f",{mailbox_user},"  # SendAs alone opens nothing


def test_an_app_token_without_imap_accessasapp_lists_no_mailboxes(
    sandbox: SandboxServer, directory: SandboxDirectory, mailbox_user: str
) -> None:
    smtp_only = directory.register_app(display_name="Postdesk", application_permissions=IMAP_AND_SMTP[1:])
    directory.grant_mailbox_rights(mailbox_user, smtp_only.client_id, send_as=False)

    answer = introspect(directory, app_token(sandbox, smtp_only))

    assert answer["active"] is True
    assert "mailboxes" not in answer


def test_smtp_takes_an_app_token_only_for_a_mailbox_the_app_has_fullaccess_on(
    sandbox: SandboxServer, directory: SandboxDirectory, smtp_submission: SubmissionServer, mailbox_user: str
) -> None:
    app = directory.register_app(display_name="Postdesk", application_permissions=IMAP_AND_SMTP)
    token = app_token(sandbox, app)
    ceo = other_mailbox(directory)
    directory.grant_mailbox_rights(mailbox_user, app.client_id, send_as=False)

    code, text = smtp_auth(smtp_submission, mailbox_user, token)
    refused_code, refused_text = smtp_auth(smtp_submission, ceo, token)

    assert (code, text) == (235, b"2.7.0 Authentication successful")
    assert refused_code == 535
    assert refused_text.startswith(b"5.7.3 Authentication unsuccessful")


def test_smtp_refuses_an_app_token_without_smtp_sendasapp_with_exchanges_wording(
    sandbox: SandboxServer, directory: SandboxDirectory, smtp_submission: SubmissionServer, mailbox_user: str
) -> None:
    imap_only = directory.register_app(display_name="Postdesk", application_permissions=IMAP_AND_SMTP[:1])
    directory.grant_mailbox_rights(mailbox_user, imap_only.client_id, send_as=False)

    code, text = smtp_auth(smtp_submission, mailbox_user, app_token(sandbox, imap_only))

    assert code == 535
    assert text.startswith(b"5.7.3 Authentication unsuccessful")


# -- Postdesk: an app-only mailbox over IMAP and SMTP -------------------------------------------------


def test_mail_to_an_app_only_imap_mailbox_becomes_a_ticket(
    m365_runtime: Runtime, dovecot: DovecotServer, channel_id: int, mailbox_user: str
) -> None:
    [channel] = channels(m365_runtime)
    assert (channel.email, channel.transport, channel.app_only) == (mailbox_user, Transport.IMAP, True)
    assert channel.token_cache is None and channel.account_username is None  # nothing per mailbox
    dovecot.deliver(
        mailbox_user,
        customer_mail(
            to=mailbox_user, sender=f"Jana <{CUSTOMER}>", subject="Printer on fire", message_id=QUESTION_ID
        ),
    )

    result = fetch(m365_runtime, channel_id)

    assert result.fetched == 1
    [ticket] = tickets(m365_runtime)
    assert ticket.title == "Printer on fire"


def test_a_reply_from_an_app_only_imap_mailbox_goes_out_over_smtp_as_the_mailbox(
    m365_runtime: Runtime,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
    channel_id: int,
    mailbox_user: str,
) -> None:
    dovecot.deliver(
        mailbox_user,
        customer_mail(to=mailbox_user, sender=CUSTOMER, subject="Printer on fire", message_id=QUESTION_ID),
    )
    fetch(m365_runtime, channel_id)
    [ticket] = tickets(m365_runtime)
    article_id = queue_draft(m365_runtime, ticket.number, Draft(kind="reply", body_text="On our way."))

    report = send_due(m365_runtime)

    assert report.sent == 1, report.problems
    [sent] = smtp_submission.accepted
    assert (sent.user, sent.mail_from, sent.rcpt_tos) == (mailbox_user, mailbox_user, (CUSTOMER,))
    assert message_from_bytes(sent.raw, policy=policy.default)["In-Reply-To"] == QUESTION_ID
    assert sent.sent_items == (mailbox_user,)  # filed in the mailbox's own Sent Items, as Exchange does
    assert delivery_of(m365_runtime, article_id).status is DeliveryStatus.SENT


def test_without_smtp_sendasapp_the_mailbox_is_added_with_a_warning_naming_it(
    m365_runtime: Runtime, directory: SandboxDirectory, mailbox_user: str
) -> None:
    app = register_daemon(m365_runtime, directory, IMAP_AND_SMTP[:1])
    directory.grant_mailbox_rights(mailbox_user, app.client_id, send_as=False)

    outcome = add_app_only_mailbox(m365_runtime, mailbox_user, transport=Transport.IMAP)

    assert outcome.ok, outcome
    [warning] = outcome.warnings
    assert "SMTP.SendAsApp" in warning and "replies cannot be sent" in warning
    assert "Office 365 Exchange Online" in warning
    assert f"Add-MailboxPermission -Identity '{mailbox_user}'" in outcome.powershell


def test_the_cli_adds_an_app_only_imap_mailbox(
    m365_runtime: Runtime, directory: SandboxDirectory, imap_app: RegisteredApp, mailbox_user: str
) -> None:
    directory.grant_mailbox_rights(mailbox_user, imap_app.client_id, send_as=False)

    result = postdesk_command(
        m365_runtime.settings, "channel", "add-app-only", mailbox_user, "--transport", "imap"
    )

    assert result.returncode == 0, result.stderr
    assert "IMAP and SMTP" in " ".join(result.stdout.split())  # Rich may wrap the line
    [channel] = channels(m365_runtime)
    assert (channel.email, channel.transport, channel.app_only) == (mailbox_user, Transport.IMAP, True)


def test_the_channels_page_form_adds_an_app_only_mailbox_over_imap(
    m365_runtime: Runtime,
    m365_admin: User,
    directory: SandboxDirectory,
    imap_app: RegisteredApp,
    mailbox_user: str,
) -> None:
    directory.grant_mailbox_rights(mailbox_user, imap_app.client_id, send_as=False)
    with TestClient(create_app(m365_runtime), base_url=BASE_URL) as desk:
        sign_in(desk, m365_admin.email, ADMIN_PASSWORD)
        page = desk.get("/channels")
        assert '<option value="imap">IMAP and SMTP</option>' in page.text
        added = desk.post(
            "/channels/app-only",
            data={"csrf_token": csrf_from(page.text), "address": mailbox_user, "transport": "imap"},
            headers={"HX-Request": "true"},
        )

    assert added.status_code == 200, added.text
    assert f"Added {mailbox_user}" in added.text and "over IMAP" in added.text
    [channel] = channels(m365_runtime)
    assert (channel.email, channel.transport) == (mailbox_user, Transport.IMAP)


# -- what an admin runs -----------------------------------------------------------------------------


def test_the_powershell_registers_the_service_principal_and_grants_fullaccess_per_mailbox() -> None:
    script = mailbox_permission_powershell(
        "11111111-2222-3333-4444-555555555555",
        ["Support@Contoso.com", "o'brien@contoso.com"],
        object_id="99999999-8888-7777-6666-555555555555",
        admin_consent_url="https://login.microsoftonline.com/contoso.com/adminconsent"
        "?client_id=11111111-2222-3333-4444-555555555555",
    )

    assert script == (
        "# First, in Entra ID: App registrations > your app > API permissions > Add a permission > APIs my "
        "organization uses > Office 365 Exchange Online > Application permissions > IMAP.AccessAsApp and "
        "SMTP.SendAsApp, then “Grant admin consent” (or open https://login.microsoftonline.com/contoso.com/"
        "adminconsent?client_id=11111111-2222-3333-4444-555555555555 as an administrator).\n"
        "# Then in Exchange Online PowerShell (Connect-ExchangeOnline), as an Exchange administrator:\n"
        "New-ServicePrincipal -AppId 11111111-2222-3333-4444-555555555555 "
        '-ObjectId 99999999-8888-7777-6666-555555555555 -DisplayName "Postdesk"\n'
        "Add-MailboxPermission -Identity 'support@contoso.com' -User 99999999-8888-7777-6666-555555555555 "
        "-AccessRights FullAccess\n"
        "Add-MailboxPermission -Identity 'o''brien@contoso.com' -User 99999999-8888-7777-6666-555555555555 "
        "-AccessRights FullAccess"
    )


def test_the_powershell_without_a_known_object_id_says_where_to_find_it() -> None:
    script = mailbox_permission_powershell("11111111-2222-3333-4444-555555555555", ["support@contoso.com"])

    assert f"-ObjectId {OBJECT_ID_PLACEHOLDER}" in script
    assert f"-User {OBJECT_ID_PLACEHOLDER} -AccessRights FullAccess" in script
    assert "or open" not in script


@pytest.mark.parametrize("address", ["x'; Remove-Mailbox ceo@contoso.com; '", "$(whoami)@contoso.com"])
def test_anything_but_a_plain_address_never_reaches_the_mailbox_permission_powershell(address: str) -> None:
    with pytest.raises(ValueError, match="not a mailbox address"):
        mailbox_permission_powershell("11111111-2222-3333-4444-555555555555", [address])


# -- refusals (last: refused logins slow down the logins after them) -----------------------------------


def test_a_mailbox_without_the_apps_fullaccess_is_refused_with_the_powershell_naming_it(
    m365_runtime: Runtime, sandbox: SandboxServer, directory: SandboxDirectory, imap_app: RegisteredApp
) -> None:
    ceo = other_mailbox(directory)

    outcome = add_app_only_mailbox(m365_runtime, ceo, transport=Transport.IMAP)

    assert not outcome.ok
    assert "AUTHENTICATIONFAILED" in outcome.problem
    assert f"did not let the app sign in to {ceo} over IMAP" in outcome.fix
    principal = service_principal(imap_app)
    consent = f"{sandbox.base_url}/{CONTOSO_TENANT_ID}/adminconsent?client_id={imap_app.client_id}"
    assert outcome.powershell == mailbox_permission_powershell(
        imap_app.client_id, [ceo], object_id=principal, admin_consent_url=consent
    )
    grant = f"Add-MailboxPermission -Identity '{ceo}' -User {principal} -AccessRights FullAccess"
    assert grant in outcome.powershell
    assert channels(m365_runtime) == []


def test_an_app_without_the_exchange_permissions_is_told_which_to_grant(
    m365_runtime: Runtime, directory: SandboxDirectory, mailbox_user: str
) -> None:
    app = register_daemon(m365_runtime, directory, permissions=())
    directory.grant_mailbox_rights(mailbox_user, app.client_id, send_as=False)

    outcome = add_app_only_mailbox(m365_runtime, mailbox_user, transport=Transport.IMAP)

    assert not outcome.ok
    assert "application permissions IMAP.AccessAsApp and SMTP.SendAsApp" in outcome.fix
    assert "Office 365 Exchange Online" in outcome.fix
    assert channels(m365_runtime) == []


def test_the_cli_refuses_a_mailbox_without_fullaccess_and_prints_the_powershell(
    m365_runtime: Runtime, directory: SandboxDirectory, imap_app: RegisteredApp, mailbox_user: str
) -> None:
    result = postdesk_command(
        m365_runtime.settings, "channel", "add-app-only", mailbox_user, "--transport", "imap"
    )

    assert result.returncode == 1
    assert "AUTHENTICATIONFAILED" in result.stderr
    assert f"Add-MailboxPermission -Identity '{mailbox_user}'" in result.stdout
    assert channels(m365_runtime) == []
