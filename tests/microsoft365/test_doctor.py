"""The connection doctor: each layer's failure produced for real, against the sandbox identity platform,
Dovecot and the submission server, and reported with its cause, fix and Exchange PowerShell command."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from postdesk.db.models import Channel, ChannelEvent, MicrosoftApp, Transport
from postdesk.db.session import transaction
from postdesk.doctor import CheckFailed, Diagnosis, check_token_claims, diagnose
from postdesk.microsoft.clouds import CLOUDS, GRAPH_MAIL_PERMISSIONS
from postdesk.microsoft.identity import MicrosoftIdentity, load_cache
from postdesk.runtime import Runtime
from postdesk.sandbox import CONTOSO_TENANT_ID, RegisteredApp, SandboxDirectory, SandboxServer
from postdesk.sandbox.submission import SubmissionServer
from tests.conftest import csrf_from
from tests.support.cli import run_postdesk
from tests.support.dovecot import DovecotServer, free_port
from tests.support.tls import ca_bundle

LAYERS = [
    "settings",
    "discovery",
    "token",
    "claims",
    "imap_connection",
    "smtp_connection",
    "imap_auth",
    "imap_folder",
    "smtp_auth",
    "test_message",
    "graph_mailbox",
]


def _statuses(diagnosis: Diagnosis) -> dict[str, str]:
    return {check.name: check.status for check in diagnosis.checks}


def _failed_at(diagnosis: Diagnosis, name: str) -> CheckFailed:
    """The failed check, after asserting that it is ``name`` and that nothing after it ran."""
    statuses = _statuses(diagnosis)
    assert list(statuses) == LAYERS
    assert diagnosis.failure is not None, diagnosis
    assert diagnosis.failure.name == name, diagnosis.failure
    position = LAYERS.index(name)
    assert all(statuses[earlier] in ("ok", "skipped") for earlier in LAYERS[:position]), statuses
    assert all(statuses[later] == "skipped" for later in LAYERS[position + 1 :]), statuses
    failure = diagnosis.failure
    assert failure.cause and failure.fix
    return CheckFailed(failure.cause, failure.fix, command=failure.command, detail=failure.detail)


def _change_channel(runtime: Runtime, channel_id: int, **values: Any) -> None:
    with transaction(runtime.sessions) as session:
        channel = session.get(Channel, channel_id)
        assert channel is not None
        for name, value in values.items():
            setattr(channel, name, value)


def _with_settings(runtime: Runtime, tmp_path: Path, **changes: Any) -> Runtime:
    """The same desk (database, key) with other settings, as after an operator changed the environment.
    Its own data dir, so the merged CA file of the original settings stays as it is."""
    data_dir = tmp_path / "changed-settings"
    data_dir.mkdir(exist_ok=True)
    settings = runtime.settings.model_copy(update={"data_dir": data_dir, **changes})
    return replace(runtime, settings=settings)


def test_a_working_mailbox_passes_every_layer_without_sending_anything(
    m365_runtime: Runtime, channel_id: int, mailbox_user: str, smtp_submission: SubmissionServer
) -> None:
    diagnosis = diagnose(m365_runtime, channel_id)
    assert diagnosis.ok, diagnosis
    statuses = _statuses(diagnosis)
    assert list(statuses) == LAYERS
    assert {name for name, status in statuses.items() if status != "ok"} == {"test_message", "graph_mailbox"}
    details = {check.name: check.detail for check in diagnosis.checks}
    assert "https://outlook.office.com" in details["claims"]
    assert "IMAP.AccessAsUser.All" in details["claims"] and "SMTP.Send" in details["claims"]
    assert mailbox_user in details["claims"]
    assert "INBOX" in details["imap_folder"]
    assert "nothing was sent" in details["smtp_auth"]
    assert smtp_submission.accepted == []


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        ("no app", "linked to no Microsoft 365 app registration"),
        ("no secret", "neither a client secret nor a certificate"),
        ("no sign-in", "holds no sign-in for this mailbox"),
    ],
)
def test_incomplete_settings_stop_the_test_before_microsoft_is_asked(
    m365_runtime: Runtime, channel_id: int, directory: SandboxDirectory, change: str, cause: str
) -> None:
    with transaction(m365_runtime.sessions) as session:
        channel = session.get(Channel, channel_id)
        assert channel is not None and channel.microsoft_app is not None
        if change == "no app":
            session.delete(channel.microsoft_app)  # the admin removed the app registration
        elif change == "no secret":
            channel.microsoft_app.client_secret = None
        else:
            channel.token_cache = None
    failure = _failed_at(diagnose(m365_runtime, channel_id), "settings")
    assert cause in failure.cause


def test_a_tenant_microsoft_does_not_know_fails_at_discovery_with_the_aadsts_code(
    m365_runtime: Runtime, channel_id: int
) -> None:
    with transaction(m365_runtime.sessions) as session:
        session.scalars(select(MicrosoftApp)).one().tenant = "contsoo.onmicrosoft.com"  # a typo
    failure = _failed_at(diagnose(m365_runtime, channel_id), "discovery")
    assert failure.cause.startswith("The tenant was not found")
    assert "contsoo.onmicrosoft.com" in failure.cause
    assert "Directory (tenant) ID" in failure.fix
    assert failure.detail.startswith("AADSTS90002")


@pytest.mark.parametrize("trouble", ["nobody listens", "untrusted certificate"])
def test_a_login_host_postdesk_cannot_reach_or_trust_fails_at_discovery(
    m365_runtime: Runtime,
    channel_id: int,
    tmp_path: Path,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
    trouble: str,
) -> None:
    if trouble == "nobody listens":
        runtime = _with_settings(
            m365_runtime, tmp_path, microsoft_login_url=f"https://127.0.0.1:{free_port()}"
        )
    else:
        without_sandbox = ca_bundle(tmp_path / "cas-without-sandbox.pem", dovecot, smtp_submission)
        runtime = _with_settings(m365_runtime, tmp_path, ca_bundle=without_sandbox)
    failure = _failed_at(diagnose(runtime, channel_id), "discovery")
    if trouble == "nobody listens":
        assert failure.cause.startswith("Postdesk cannot reach 127.0.0.1:")
        assert "Connection refused" in failure.cause
        assert "outbound HTTPS" in failure.fix
    else:
        assert "is not trusted (" in failure.cause and "certificate verify failed" in failure.cause
        assert "POSTDESK_CA_BUNDLE" in failure.fix


def test_a_refresh_token_expired_at_microsoft_fails_at_the_token(
    m365_runtime: Runtime, channel_id: int, directory: SandboxDirectory
) -> None:
    directory.fail_next(
        "token",
        error="invalid_grant",
        aadsts=70008,
        description="AADSTS70008: The provided authorization code or refresh token has expired due to "
        "inactivity. Send a new interactive authorization request for this user and resource.",
    )
    failure = _failed_at(diagnose(m365_runtime, channel_id), "token")
    assert failure.cause.startswith("The mailbox sign-in has expired")
    assert "Re-authenticate" in failure.fix
    assert failure.detail.startswith("AADSTS70008")


def test_a_revoked_sign_in_fails_at_the_token_even_while_an_access_token_is_cached(
    m365_runtime: Runtime, channel_id: int, directory: SandboxDirectory, mailbox_user: str
) -> None:
    assert diagnose(m365_runtime, channel_id).ok  # leaves a fresh access token in the cache
    directory.revoke_refresh_tokens(mailbox_user)
    failure = _failed_at(diagnose(m365_runtime, channel_id), "token")
    assert failure.detail.startswith("AADSTS50173")


def _token_for(runtime: Runtime, channel_id: int, scopes: list[str]) -> str:
    """An access token Microsoft (the sandbox) issues for the mailbox's sign-in and these scopes."""
    with runtime.sessions() as session:
        channel = session.get(Channel, channel_id)
        assert channel is not None and channel.microsoft_app is not None
        client = MicrosoftIdentity(runtime.settings, channel.microsoft_app).client(
            load_cache(channel.token_cache)
        )
        [account] = client.get_accounts()
        result = client.acquire_token_silent_with_error(scopes, account, force_refresh=True)
    assert result is not None and "access_token" in result, result
    return str(result["access_token"])


def test_a_graph_token_is_the_classic_mistake_the_claims_check_names(
    m365_runtime: Runtime,
    channel_id: int,
    directory: SandboxDirectory,
    entra_app: RegisteredApp,
    mailbox_user: str,
) -> None:
    user = directory.find_user(mailbox_user)
    assert user is not None
    directory.grant_consent(user.oid, entra_app.client_id, ["https://graph.microsoft.com/Mail.Read"])
    graph_token = _token_for(m365_runtime, channel_id, ["https://graph.microsoft.com/Mail.Read"])
    with pytest.raises(CheckFailed) as refused:
        check_token_claims(graph_token, CLOUDS["global"])
    assert "for Microsoft Graph (https://graph.microsoft.com), not for Exchange Online" in refused.value.cause
    assert "https://outlook.office.com/IMAP.AccessAsUser.All" in refused.value.fix
    assert graph_token not in str(refused.value.__dict__)


def test_a_token_without_smtp_send_fails_the_claims_check(m365_runtime: Runtime, channel_id: int) -> None:
    imap_only = _token_for(m365_runtime, channel_id, ["https://outlook.office.com/IMAP.AccessAsUser.All"])
    with pytest.raises(CheckFailed) as refused:
        check_token_claims(imap_only, CLOUDS["global"])
    assert "lacks the permission SMTP.Send" in refused.value.cause
    outlook = _token_for(
        m365_runtime,
        channel_id,
        ["https://outlook.office.com/IMAP.AccessAsUser.All", "https://outlook.office.com/SMTP.Send"],
    )
    assert "Exchange Online" in check_token_claims(outlook, CLOUDS["global"])


def test_an_app_only_token_is_checked_for_the_application_permissions() -> None:
    def app_token(*roles: str) -> str:
        # Only the claims are read; Exchange verifies the signature.
        claims = {"aud": "https://outlook.office.com", "roles": list(roles), "oid": "sp-object-id"}
        return jwt.encode(claims, "not-verified-here-" + "k" * 32, algorithm="HS256")

    with pytest.raises(CheckFailed) as refused:
        check_token_claims(app_token("IMAP.AccessAsApp"), CLOUDS["global"])
    assert "lacks the application permission SMTP.SendAsApp" in refused.value.cause
    assert "Application permissions" in refused.value.fix
    granted = check_token_claims(app_token("IMAP.AccessAsApp", "SMTP.SendAsApp"), CLOUDS["global"])
    assert granted == (
        "For https://outlook.office.com (Exchange Online), app-only, roles: IMAP.AccessAsApp SMTP.SendAsApp."
    )


def test_an_imap_host_nobody_listens_on_fails_at_tcp(
    m365_runtime: Runtime, channel_id: int, tmp_path: Path
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    runtime = _with_settings(m365_runtime, tmp_path, microsoft_imap=closed)
    failure = _failed_at(diagnose(runtime, channel_id), "imap_connection")
    assert failure.cause.startswith(f"The TCP connection to {closed} (127.0.0.1) failed: Connection refused")
    assert "POSTDESK_MICROSOFT_IMAP" in failure.fix


def test_an_imap_certificate_from_an_untrusted_ca_fails_at_tls(
    m365_runtime: Runtime,
    channel_id: int,
    tmp_path: Path,
    sandbox: SandboxServer,
    smtp_submission: SubmissionServer,
) -> None:
    without_dovecot = ca_bundle(tmp_path / "cas-without-dovecot.pem", sandbox, smtp_submission)
    runtime = _with_settings(m365_runtime, tmp_path, ca_bundle=without_dovecot)
    failure = _failed_at(diagnose(runtime, channel_id), "imap_connection")
    assert failure.cause.startswith("The TLS certificate of 127.0.0.1:")
    assert "not trusted" in failure.cause
    assert "POSTDESK_CA_BUNDLE" in failure.fix


@pytest.fixture
def from_spare_address(monkeypatch: pytest.MonkeyPatch, dovecot: DovecotServer) -> Iterator[None]:
    """Connections to Dovecot come from an address of their own: after a refused login, Dovecot slows
    down every later login from the same address, which would slow the rest of the run."""
    spare = dovecot.spare_source_address()
    connect: Callable[..., socket.socket] = socket.create_connection

    def from_spare(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        if address[1] == dovecot.port:
            kwargs["source_address"] = (spare, 0)
            args = args[:1]
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", from_spare)
    yield


def test_a_shared_mailbox_without_full_access_fails_at_imap_authenticate_with_the_commands(
    m365_runtime: Runtime, channel_id: int, mailbox_user: str, from_spare_address: None
) -> None:
    # The mailbox's sign-in is a delegate's (mailbox_user), and Exchange does not let it open the
    # shared address: the test Dovecot refuses any token whose user is not the mailbox.
    shared = f"shared-{channel_id}-{mailbox_user}"
    _change_channel(m365_runtime, channel_id, email=shared)
    failure = _failed_at(diagnose(m365_runtime, channel_id), "imap_auth")
    assert "refused the sign-in" in failure.cause
    assert f"lacks Full Access to it, or IMAP is off for {shared}" in failure.cause
    assert failure.command == (
        f"Add-MailboxPermission -Identity {shared} -User {mailbox_user} -AccessRights FullAccess "
        f"-InheritanceType All\nSet-CASMailbox -Identity {shared} -ImapEnabled $true"
    )


def test_a_folder_that_is_gone_fails_at_select_and_lists_the_folders_there_are(
    m365_runtime: Runtime, channel_id: int
) -> None:
    _change_channel(m365_runtime, channel_id, folder="Tickets/Gone")
    failure = _failed_at(diagnose(m365_runtime, channel_id), "imap_folder")
    assert "cannot open the folder 'Tickets/Gone'" in failure.cause
    assert "Choose the folder again" in failure.fix
    assert "INBOX" in failure.detail and "Sent Items" in failure.detail


@pytest.mark.parametrize("scope", ["mailbox", "tenant"])
def test_smtp_auth_turned_off_fails_at_smtp_auth_with_the_powershell_fix(
    m365_runtime: Runtime,
    channel_id: int,
    mailbox_user: str,
    smtp_submission: SubmissionServer,
    scope: str,
) -> None:
    if scope == "mailbox":
        smtp_submission.set_smtp_auth_disabled(mailbox_user, True)
    else:
        smtp_submission.set_tenant_smtp_auth_disabled(CONTOSO_TENANT_ID, True)
    failure = _failed_at(diagnose(m365_runtime, channel_id), "smtp_auth")
    assert failure.cause.startswith("SMTP AUTH is turned off for this mailbox or the whole tenant.")
    assert "535 5.7.139 Authentication unsuccessful" in failure.cause
    mailbox_command = f"Set-CASMailbox -Identity {mailbox_user} -SmtpClientAuthenticationDisabled $false"
    assert failure.command is not None
    assert failure.command.splitlines()[0] == mailbox_command
    tenant_command = "Set-TransportConfig -SmtpClientAuthenticationDisabled $false"
    assert (tenant_command in failure.command) is (scope == "tenant")


def test_a_test_message_is_sent_only_when_asked_and_arrives(
    m365_runtime: Runtime,
    channel_id: int,
    directory: SandboxDirectory,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
    mailbox_user: str,
) -> None:
    recipient = directory.add_user(
        upn=f"doctor-recipient-{channel_id}-{mailbox_user}",
        display_name="Test recipient",
        tenant_id=CONTOSO_TENANT_ID,
    ).upn
    diagnosis = diagnose(m365_runtime, channel_id, send_test_to=recipient)
    assert diagnosis.ok, diagnosis
    [sent] = [check for check in diagnosis.checks if check.name == "test_message"]
    assert sent.status == "ok"
    assert sent.detail.startswith(f"Sent to {recipient}; the server answered “250")
    [accepted] = smtp_submission.accepted
    assert (accepted.mail_from, accepted.rcpt_tos) == (mailbox_user, (recipient,))
    [delivered] = dovecot.messages(recipient)
    assert b"Subject: Postdesk connection test" in delivered
    assert b"Auto-Submitted: auto-generated" in delivered


def test_a_graph_mailbox_checks_the_sign_in_and_the_mailbox_and_skips_imap_and_smtp(
    m365_runtime: Runtime, channel_id: int, mailbox_user: str, directory: SandboxDirectory
) -> None:
    _change_channel(m365_runtime, channel_id, transport=Transport.GRAPH)
    user = directory.find_user(mailbox_user)
    assert user is not None
    with m365_runtime.sessions() as session:
        client_id = session.scalars(select(MicrosoftApp.client_id)).one()
    # Without consent to Graph's mail permissions the token layer fails and says so.
    refused = diagnose(m365_runtime, channel_id)
    assert _statuses(refused)["token"] == "failed"
    directory.grant_consent(
        user.oid, client_id, [f"https://graph.microsoft.com/{name}" for name in GRAPH_MAIL_PERMISSIONS]
    )
    diagnosis = diagnose(m365_runtime, channel_id)
    assert diagnosis.ok
    statuses = _statuses(diagnosis)
    assert [name for name in LAYERS if statuses[name] == "ok"] == [
        "settings",
        "discovery",
        "token",
        "graph_mailbox",
    ]
    details = {check.name: check.detail for check in diagnosis.checks}
    assert details["imap_auth"] == "This mailbox is read through Microsoft Graph, not IMAP and SMTP."
    assert details["graph_mailbox"] == f"Graph opened {mailbox_user}: the folder 'INBOX' is there."


def test_the_test_connection_button_shows_the_result_and_logs_who_ran_it(
    desk: TestClient,
    m365_runtime: Runtime,
    channel_id: int,
    mailbox_user: str,
    smtp_submission: SubmissionServer,
) -> None:
    page = desk.get(f"/channels/{channel_id}")
    assert "Test connection" in page.text
    smtp_submission.set_smtp_auth_disabled(mailbox_user, True)
    swapped = desk.post(
        f"/channels/{channel_id}/doctor",
        data={"csrf_token": csrf_from(page.text), "send_test_to": ""},
        headers={"HX-Request": "true"},
    )
    assert swapped.status_code == 200
    assert swapped.text.lstrip().startswith('<section class="card" id="doctor">')
    assert 'data-check="smtp_auth" data-status="failed"' in swapped.text
    assert f"Set-CASMailbox -Identity {mailbox_user} -SmtpClientAuthenticationDisabled $false" in swapped.text

    without_javascript = desk.post(
        f"/channels/{channel_id}/doctor", data={"csrf_token": csrf_from(page.text)}
    )
    assert "<h1>Connection test</h1>" in without_javascript.text
    assert 'data-check="smtp_auth" data-status="failed"' in without_javascript.text

    with m365_runtime.sessions() as session:
        events = list(session.scalars(select(ChannelEvent).where(ChannelEvent.kind == "doctor")))
        assert len(events) == 2
        assert all(event.actor is not None and event.actor.email == "admin@example.com" for event in events)
        assert events[0].message.startswith("Connection test failed at “SMTP AUTH”")
    assert "Connection test failed at" in desk.get(f"/channels/{channel_id}").text  # the event log


def test_the_button_refuses_a_bad_address_and_a_missing_csrf_token(
    desk: TestClient, channel_id: int, smtp_submission: SubmissionServer
) -> None:
    page = desk.get(f"/channels/{channel_id}")
    refused = desk.post(
        f"/channels/{channel_id}/doctor",
        data={"csrf_token": csrf_from(page.text), "send_test_to": "not an address"},
        headers={"HX-Request": "true"},
    )
    assert refused.status_code == 422
    assert "is not an email address" in refused.text
    assert desk.post(f"/channels/{channel_id}/doctor", data={}).status_code == 403
    assert smtp_submission.accepted == []


def test_the_doctor_command_reports_in_words_and_json_with_its_exit_codes(
    m365_runtime: Runtime,
    channel_id: int,
    mailbox_user: str,
    smtp_submission: SubmissionServer,
) -> None:
    settings = m365_runtime.settings
    passed = run_postdesk(settings, "doctor", str(channel_id), "--json")
    assert passed.returncode == 0, passed.stderr
    [report] = json.loads(passed.stdout)
    assert (report["channel_id"], report["email"], report["ok"], report["failed_check"]) == (
        channel_id,
        mailbox_user,
        True,
        None,
    )
    assert [check["name"] for check in report["checks"]] == LAYERS
    assert set(report["checks"][0]) == {"name", "label", "status", "detail", "cause", "fix", "command"}
    assert "eyJ" not in passed.stdout  # no token (a JWT starts so) in the report

    smtp_submission.set_smtp_auth_disabled(mailbox_user, True)
    failed = run_postdesk(settings, "doctor")
    assert failed.returncode == 1, failed.stderr
    assert "✓ IMAP AUTHENTICATE" in failed.stdout
    assert "✗ SMTP AUTH" in failed.stdout
    assert (
        f"Set-CASMailbox -Identity {mailbox_user} -SmtpClientAuthenticationDisabled $false" in failed.stdout
    )
    # The server reply is printed as it came, not read as Rich markup: "[host time id]" stays.
    assert "[sandbox-smtp.postdesk.invalid " in " ".join(failed.stdout.split())

    assert run_postdesk(settings, "doctor", "999").returncode == 2
    assert run_postdesk(settings, "doctor", "--send-test-to", "nobody").returncode == 2
    with m365_runtime.sessions() as session:
        kinds = list(session.scalars(select(ChannelEvent.kind).where(ChannelEvent.kind == "doctor")))
    assert len(kinds) == 2
