"""App-only mailboxes (issue #7, "App-only (no user sign-in)"): Postdesk reads and answers a mailbox as
the app itself through Microsoft Graph, with a certificate and application permissions, against the
sandbox's identity platform and Graph; a mailbox outside the app's Exchange scope is refused with the
PowerShell that fixes it."""

from __future__ import annotations

import subprocess
import sys
import uuid
from email import message_from_bytes, policy

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from postdesk.config import Settings
from postdesk.db.models import Channel, DeliveryStatus, MicrosoftApp, Transport, User
from postdesk.db.session import transaction
from postdesk.microsoft.app_only import OBJECT_ID_PLACEHOLDER, add_app_only_mailbox, rbac_powershell
from postdesk.microsoft.certificates import generate_certificate
from postdesk.outbox.queue import Draft
from postdesk.outbox.sender import send_due
from postdesk.runtime import Runtime
from postdesk.sandbox import CONTOSO_TENANT_ID, GraphMailStore, RegisteredApp, SandboxDirectory
from postdesk.web.app import create_app
from tests.conftest import ADMIN_PASSWORD, csrf_from, sign_in
from tests.microsoft365.conftest import (
    BASE_URL,
    QUESTION_ID,
    channels,
    delivery_of,
    fetch,
    queue_draft,
    tickets,
)
from tests.support.cli import environment_for
from tests.support.mailfactory import customer_mail

GRAPH = "https://graph.microsoft.com"
BOTH = (f"{GRAPH}/Mail.ReadWrite", f"{GRAPH}/Mail.Send")
CUSTOMER = "jana@fabrikam.example"


def register_daemon(
    runtime: Runtime,
    directory: SandboxDirectory,
    permissions: tuple[str, ...] = BOTH,
    *,
    certificate: bool = True,
) -> RegisteredApp:
    """An app registration with application permissions and admin consent in Contoso, saved in
    Postdesk with a generated certificate (uploaded to Entra ID) or its client secret."""
    app = directory.register_app(display_name="Postdesk", application_permissions=permissions)
    directory.grant_admin_consent(CONTOSO_TENANT_ID, app.client_id)
    row = MicrosoftApp(client_id=app.client_id, tenant="contoso.onmicrosoft.com")
    if certificate:
        generated = generate_certificate("Postdesk")
        directory.add_certificate(app.client_id, generated.certificate_pem)
        row.certificate_pem = generated.certificate_pem
        row.certificate_private_key = generated.private_key_pem
        row.certificate_thumbprint = generated.thumbprint
        row.use_certificate = True
    else:
        row.client_secret = app.client_secrets[0].value
    with transaction(runtime.sessions) as session:
        session.add(row)
    return app


def postdesk_command(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``postdesk`` command, with Graph at the sandbox."""
    env = environment_for(settings)
    env["POSTDESK_MICROSOFT_GRAPH_URL"] = str(settings.microsoft_graph_url)
    return subprocess.run(
        [sys.executable, "-m", "postdesk", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def service_principal(app: RegisteredApp) -> str:
    """The app's enterprise application in Contoso, as the sandbox names it in app-only tokens."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{app.client_id}/{CONTOSO_TENANT_ID}"))


def other_mailbox(directory: SandboxDirectory) -> str:
    return directory.add_user(
        upn=f"ceo-{uuid.uuid4().hex[:8]}@contoso.onmicrosoft.com",
        display_name="The CEO",
        tenant_id=CONTOSO_TENANT_ID,
    ).upn


def test_an_app_only_mailbox_turns_mail_into_tickets_and_sends_replies_through_graph(
    m365_runtime: Runtime, directory: SandboxDirectory, store: GraphMailStore, mailbox_user: str
) -> None:
    app = register_daemon(m365_runtime, directory)
    store.restrict_app(app.client_id, [mailbox_user])

    outcome = add_app_only_mailbox(m365_runtime, mailbox_user)

    assert outcome.ok, outcome
    assert outcome.warnings == ()
    assert outcome.powershell == ""
    [channel] = channels(m365_runtime)
    assert (channel.email, channel.transport, channel.app_only) == (mailbox_user, Transport.GRAPH, True)
    assert channel.token_cache is None  # nothing per mailbox to store: no refresh token exists
    assert channel.account_username is None
    store.deliver(
        mailbox_user,
        customer_mail(
            to=mailbox_user, sender=f"Jana <{CUSTOMER}>", subject="Printer on fire", message_id=QUESTION_ID
        ),
    )
    fetch(m365_runtime, channel.id)
    [ticket] = tickets(m365_runtime)
    assert ticket.title == "Printer on fire"

    article_id = queue_draft(m365_runtime, ticket.number, Draft(kind="reply", body_text="On our way."))
    report = send_due(m365_runtime)

    assert report.sent == 1, report.problems
    [sent] = [sent for sent in store.sent if sent.mailbox == mailbox_user]
    assert sent.recipients == (CUSTOMER,)
    assert message_from_bytes(sent.raw, policy=policy.default)["In-Reply-To"] == QUESTION_ID
    assert delivery_of(m365_runtime, article_id).status is DeliveryStatus.SENT


def test_a_mailbox_outside_the_apps_exchange_scope_is_refused_with_the_powershell_naming_it(
    m365_runtime: Runtime, directory: SandboxDirectory, store: GraphMailStore, mailbox_user: str
) -> None:
    app = register_daemon(m365_runtime, directory)
    store.restrict_app(app.client_id, [mailbox_user])
    assert add_app_only_mailbox(m365_runtime, mailbox_user).ok
    ceo = other_mailbox(directory)

    outcome = add_app_only_mailbox(m365_runtime, ceo)

    assert not outcome.ok
    assert "ErrorAccessDenied" in outcome.problem
    assert f"does not let the app open {ceo}" in outcome.fix
    # One scope for every app-only mailbox: the one already added and the refused one.
    assert outcome.powershell == rbac_powershell(
        app.client_id, sorted([mailbox_user, ceo]), object_id=service_principal(app)
    )
    assert f"PrimarySmtpAddress -eq '{ceo}'" in outcome.powershell
    assert (
        f"Test-ServicePrincipalAuthorization -Identity {app.client_id} -Resource {ceo}" in outcome.powershell
    )
    assert f"-ObjectId {service_principal(app)}" in outcome.powershell
    assert [channel.email for channel in channels(m365_runtime)] == [mailbox_user]


def test_an_app_without_admin_consented_permissions_is_told_which_to_grant(
    m365_runtime: Runtime, directory: SandboxDirectory, store: GraphMailStore, mailbox_user: str
) -> None:
    register_daemon(m365_runtime, directory, permissions=())

    outcome = add_app_only_mailbox(m365_runtime, mailbox_user)

    assert not outcome.ok
    assert "401" in outcome.problem
    assert "application permissions Mail.ReadWrite and Mail.Send" in outcome.fix
    assert "Grant admin consent" in outcome.fix
    assert channels(m365_runtime) == []


def test_a_missing_send_permission_is_named_and_replies_are_refused_naming_it_too(
    m365_runtime: Runtime, directory: SandboxDirectory, store: GraphMailStore, mailbox_user: str
) -> None:
    register_daemon(m365_runtime, directory, permissions=(f"{GRAPH}/Mail.ReadWrite",))

    outcome = add_app_only_mailbox(m365_runtime, mailbox_user)

    assert outcome.ok
    [warning] = outcome.warnings
    assert "application permission Mail.Send" in warning and "replies cannot be sent" in warning
    assert '-Role "Application Mail.Send"' in outcome.powershell
    store.deliver(mailbox_user, customer_mail(to=mailbox_user, sender=CUSTOMER, subject="Hello"))
    [channel] = channels(m365_runtime)
    fetch(m365_runtime, channel.id)
    [ticket] = tickets(m365_runtime)
    article_id = queue_draft(m365_runtime, ticket.number, Draft(kind="reply", body_text="Hi"))
    send_due(m365_runtime)
    row = delivery_of(m365_runtime, article_id)
    assert row.status is DeliveryStatus.FAILED
    assert "Mail.Send" in (row.last_error or "")


def test_a_wrong_client_secret_is_explained_and_a_secret_draws_a_certificate_recommendation(
    m365_runtime: Runtime, directory: SandboxDirectory, store: GraphMailStore, mailbox_user: str
) -> None:
    register_daemon(m365_runtime, directory, certificate=False)
    added = add_app_only_mailbox(m365_runtime, mailbox_user)
    assert added.ok
    assert any("recommends a certificate" in warning for warning in added.warnings)

    with transaction(m365_runtime.sessions) as session:
        session.scalars(select(MicrosoftApp)).one().client_secret = "not-the-secret-value"
    refused = add_app_only_mailbox(m365_runtime, other_mailbox(directory))

    assert not refused.ok
    assert "AADSTS7000215" in refused.problem
    assert "The client secret is wrong" in refused.problem


def test_the_powershell_for_three_mailboxes_makes_one_scope_for_them_all() -> None:
    client_id = "11111111-2222-3333-4444-555555555555"
    script = rbac_powershell(
        client_id,
        ["Support@Contoso.com", "sales@contoso.com", "o'brien@contoso.com"],
        object_id="99999999-8888-7777-6666-555555555555",
    )

    assert script == (
        "# In Exchange Online PowerShell (Connect-ExchangeOnline), as an Exchange administrator:\n"
        "New-ServicePrincipal -AppId 11111111-2222-3333-4444-555555555555 "
        '-ObjectId 99999999-8888-7777-6666-555555555555 -DisplayName "Postdesk"\n'
        'New-ManagementScope -Name "Postdesk mailboxes" -RecipientRestrictionFilter '
        "\"PrimarySmtpAddress -eq 'support@contoso.com' -or PrimarySmtpAddress -eq 'sales@contoso.com' "
        "-or PrimarySmtpAddress -eq 'o''brien@contoso.com'\"\n"
        "New-ManagementRoleAssignment -App 11111111-2222-3333-4444-555555555555 "
        '-Role "Application Mail.ReadWrite" -CustomResourceScope "Postdesk mailboxes"\n'
        "New-ManagementRoleAssignment -App 11111111-2222-3333-4444-555555555555 "
        '-Role "Application Mail.Send" -CustomResourceScope "Postdesk mailboxes"\n'
        "Test-ServicePrincipalAuthorization -Identity 11111111-2222-3333-4444-555555555555 "
        "-Resource support@contoso.com\n"
        "Test-ServicePrincipalAuthorization -Identity 11111111-2222-3333-4444-555555555555 "
        "-Resource sales@contoso.com\n"
        "Test-ServicePrincipalAuthorization -Identity 11111111-2222-3333-4444-555555555555 "
        "-Resource o'brien@contoso.com"
    )


@pytest.mark.parametrize(
    "address", ['x"; Remove-Mailbox -Identity ceo@contoso.com; "', "$(whoami)@contoso.com"]
)
def test_anything_but_a_plain_address_never_reaches_the_powershell(address: str) -> None:
    with pytest.raises(ValueError, match="not a mailbox address"):
        rbac_powershell("11111111-2222-3333-4444-555555555555", [address])


def test_the_cli_prints_the_powershell_with_the_apps_real_ids(
    m365_runtime: Runtime, directory: SandboxDirectory, store: GraphMailStore
) -> None:
    app = register_daemon(m365_runtime, directory)
    addresses = ["a@contoso.onmicrosoft.com", "b@contoso.onmicrosoft.com"]

    result = postdesk_command(m365_runtime.settings, "channel", "app-only-powershell", *addresses)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == rbac_powershell(
        app.client_id, addresses, object_id=service_principal(app)
    )
    assert OBJECT_ID_PLACEHOLDER not in result.stdout


def test_the_cli_refuses_an_out_of_scope_mailbox_and_prints_the_powershell(
    m365_runtime: Runtime, directory: SandboxDirectory, store: GraphMailStore, mailbox_user: str
) -> None:
    app = register_daemon(m365_runtime, directory)
    store.restrict_app(app.client_id, [])

    result = postdesk_command(
        m365_runtime.settings, "channel", "add-app-only", mailbox_user, "--transport", "graph"
    )

    assert result.returncode == 1
    assert "ErrorAccessDenied" in result.stderr
    assert f"-Resource {mailbox_user}" in result.stdout
    assert channels(m365_runtime) == []


def test_the_channels_page_form_adds_an_app_only_mailbox(
    m365_runtime: Runtime,
    m365_admin: User,
    directory: SandboxDirectory,
    store: GraphMailStore,
    mailbox_user: str,
) -> None:
    app = register_daemon(m365_runtime, directory)
    store.restrict_app(app.client_id, [mailbox_user])
    ceo = other_mailbox(directory)
    with TestClient(create_app(m365_runtime), base_url=BASE_URL) as desk:
        sign_in(desk, m365_admin.email, ADMIN_PASSWORD)
        page = desk.get("/channels")
        assert 'id="app-only"' in page.text
        token = csrf_from(page.text)

        refused = desk.post("/channels/app-only", data={"csrf_token": token, "address": ceo})
        added = desk.post(
            "/channels/app-only",
            data={"csrf_token": token, "address": mailbox_user},
            headers={"HX-Request": "true"},
        )

    assert refused.status_code == 422
    assert "<html" in refused.text  # without htmx, a page of its own
    assert f"-Resource {ceo}" in refused.text
    assert added.status_code == 200
    assert "<html" not in added.text  # with htmx, only the section
    assert f"Added {mailbox_user}" in added.text
    assert [channel.email for channel in channels(m365_runtime)] == [mailbox_user]
    with m365_runtime.sessions() as session:
        assert session.scalar(select(Channel.app_only).where(Channel.email == mailbox_user)) is True


def test_a_mailbox_is_added_once(
    m365_runtime: Runtime, directory: SandboxDirectory, store: GraphMailStore, mailbox_user: str
) -> None:
    register_daemon(m365_runtime, directory)
    assert add_app_only_mailbox(m365_runtime, mailbox_user).ok

    again = add_app_only_mailbox(m365_runtime, mailbox_user.upper())
    over_imap = add_app_only_mailbox(m365_runtime, mailbox_user, transport=Transport.IMAP)

    assert again.problem == over_imap.problem == f"{mailbox_user} is already connected to Postdesk."
    assert len(channels(m365_runtime)) == 1
