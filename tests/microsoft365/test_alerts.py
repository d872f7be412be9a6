"""Mail never stops silently: admins hear about a mailbox that stopped or went quiet, and about an app
credential that is about to expire — once, through a route that works, and again when it is resolved."""

from __future__ import annotations

import json
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from postdesk.alerts.notify import NO_ROUTE
from postdesk.alerts.service import AlertReport, evaluate_alerts
from postdesk.config import Settings
from postdesk.db.models import Alert, Channel, ChannelStatus, MicrosoftApp, Role
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.runtime import Runtime, bootstrap
from postdesk.sandbox import CONTOSO_TENANT_ID, SandboxDirectory
from postdesk.sandbox.submission import SubmissionServer
from postdesk.sandbox.tls import ensure_server_certificate
from postdesk.worker.heartbeat import refresh_stale_tokens
from tests.conftest import ADMIN_PASSWORD, add_user, csrf_from, sign_in
from tests.microsoft365.conftest import BASE_URL, SignIn, fetch
from tests.support.cli import run_postdesk
from tests.support.dovecot import DovecotServer
from tests.support.mailfactory import customer_mail, parse_mail
from tests.support.postgres import free_port

ADMIN = "admin@example.com"
RELAY_USER = "postdesk-alerts"
RELAY_PASSWORD = "relay-password-123"


# -- helpers --------------------------------------------------------------------------------------


def second_mailbox(signin: SignIn, directory: SandboxDirectory, runtime: Runtime) -> tuple[int, str]:
    upn = directory.add_user(
        upn=f"other-{uuid.uuid4().hex[:8]}@contoso.onmicrosoft.com",
        display_name="Other desk",
        tenant_id=CONTOSO_TENANT_ID,
    ).upn
    assert signin.connect(upn).status_code == 303
    with runtime.sessions() as session:
        channel_id = session.scalar(select(Channel.id).where(Channel.email == upn))
    assert channel_id is not None
    return channel_id, upn


def lose_sign_in(runtime: Runtime, directory: SandboxDirectory, upn: str) -> None:
    """The user's sessions are revoked in Entra ID; the weekly heartbeat is the first to notice."""
    directory.revoke_refresh_tokens(upn)
    refresh_stale_tokens(runtime, now=utcnow() + timedelta(days=8))


def channel(runtime: Runtime, channel_id: int) -> Channel:
    with runtime.sessions() as session:
        found = session.get(Channel, channel_id)
        assert found is not None
        return found


def alerts(runtime: Runtime) -> list[Alert]:
    with runtime.sessions() as session:
        return list(session.scalars(select(Alert).order_by(Alert.id)))


def with_settings(runtime: Runtime, **changes: Any) -> Runtime:
    """The same desk (same database) started with other POSTDESK_ALERT_* settings."""
    return bootstrap(runtime.settings.model_copy(update=changes))


# -- a mailbox that needs sign-in ------------------------------------------------------------------


def test_a_mailbox_that_needs_sign_in_is_announced_once_through_another_mailbox_and_its_recovery_too(
    signin: SignIn,
    m365_runtime: Runtime,
    channel_id: int,
    mailbox_user: str,
    directory: SandboxDirectory,
    smtp_submission: SubmissionServer,
) -> None:
    other_id, other = second_mailbox(signin, directory, m365_runtime)
    assert evaluate_alerts(m365_runtime) == AlertReport()

    lose_sign_in(m365_runtime, directory, mailbox_user)
    assert channel(m365_runtime, channel_id).status is ChannelStatus.NEEDS_REAUTH
    assert channel(m365_runtime, other_id).status is ChannelStatus.OK

    report = evaluate_alerts(m365_runtime)
    assert report.opened == [f"channel:{channel_id}:attention"]
    assert (report.notified, report.failed) == (1, 0)
    [sent] = smtp_submission.accepted
    assert sent.user == other  # never only through the mailbox that is in trouble
    assert sent.rcpt_tos == (ADMIN,)
    message = parse_mail(sent.raw)
    assert message["Subject"] == f"[Postdesk] {mailbox_user} needs sign-in"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["From"].addresses[0].addr_spec == other
    body = message.get_body(("plain",))
    assert body is not None
    text = body.get_content()
    assert f"Fix: Re-authenticate: {BASE_URL}/auth/microsoft365/start?channel={channel_id}" in text
    assert "AADSTS50173" in text  # the stored last error, in plain words
    [alert] = alerts(m365_runtime)
    assert (alert.kind, alert.severity, alert.channel_id) == ("needs_reauth", "critical", channel_id)
    assert alert.notified_at is not None and alert.notify_error is None

    page = signin.desk.get("/tickets").text
    assert 'id="attention"' in page
    assert f"{mailbox_user} needs sign-in" in page
    assert f'href="/auth/microsoft365/start?channel={channel_id}">Re-authenticate</a>' in page
    listed = run_postdesk(m365_runtime.settings, "alerts", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [shown] = json.loads(listed.stdout)
    assert (shown["key"], shown["channel"], shown["resolved_at"]) == (alert.key, mailbox_user, None)

    again = evaluate_alerts(m365_runtime)
    assert (again.opened, again.notified) == ([], 0)
    assert len(smtp_submission.accepted) == 1  # not announced twice

    assert signin.connect(mailbox_user, query=f"?channel={channel_id}").status_code == 303
    assert channel(m365_runtime, channel_id).status is ChannelStatus.OK
    assert "needs sign-in" not in signin.desk.get("/tickets").text

    recovered = evaluate_alerts(m365_runtime)
    assert recovered.resolved == [alert.key]
    assert recovered.notified == 1
    recovery = parse_mail(smtp_submission.accepted[-1].raw)
    assert recovery["Subject"] == f"[Postdesk] Resolved: {mailbox_user} needs sign-in"
    [alert] = alerts(m365_runtime)
    assert alert.resolved_at is not None and alert.notified_at is not None
    assert evaluate_alerts(m365_runtime) == AlertReport()
    assert len(smtp_submission.accepted) == 2


def test_agents_see_no_banner(
    signin: SignIn, m365_runtime: Runtime, channel_id: int, mailbox_user: str, directory: SandboxDirectory
) -> None:
    lose_sign_in(m365_runtime, directory, mailbox_user)
    add_user(m365_runtime, "agent@example.com", ADMIN_PASSWORD, role=Role.AGENT)
    with TestClient(signin.desk.app, base_url=BASE_URL) as agent:
        sign_in(agent, "agent@example.com", ADMIN_PASSWORD)
        tickets = agent.get("/tickets")
    assert tickets.status_code == 200 and "Tickets" in tickets.text
    assert 'id="attention"' not in tickets.text
    assert 'id="attention"' in signin.desk.get("/tickets").text


# -- when no other mailbox works -------------------------------------------------------------------


@dataclass
class Relay:
    """A company mail relay: STARTTLS required, then AUTH PLAIN or LOGIN."""

    tls: ssl.SSLContext
    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        good = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
            RELAY_USER.encode(),
            RELAY_PASSWORD.encode(),
        )
        return AuthResult(success=good, handled=False)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        raw = envelope.original_content or b""
        self.received.append((envelope.mail_from or "", list(envelope.rcpt_tos), raw))
        return "250 2.0.0 queued"


@pytest.fixture
def relay(smtp_submission: SubmissionServer) -> Iterator[tuple[Relay, str]]:
    # The submission server's certificate, so the desk's CA bundle already trusts it.
    files = ensure_server_certificate(smtp_submission.state_dir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert_path, files.key_path)
    relay = Relay(context)
    port = free_port()
    controller = Controller(
        relay,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        authenticator=relay.authenticate,
        auth_require_tls=True,
    )
    controller.start()
    try:
        yield relay, f"127.0.0.1:{port}"
    finally:
        controller.stop()


def test_when_the_only_mailbox_fails_the_alert_waits_and_then_goes_through_the_fallback_relay(
    m365_runtime: Runtime,
    channel_id: int,
    mailbox_user: str,
    directory: SandboxDirectory,
    smtp_submission: SubmissionServer,
    relay: tuple[Relay, str],
) -> None:
    lose_sign_in(m365_runtime, directory, mailbox_user)
    report = evaluate_alerts(m365_runtime)
    assert (report.opened, report.notified, report.failed) == ([f"channel:{channel_id}:attention"], 0, 1)
    [alert] = alerts(m365_runtime)
    assert alert.notified_at is None
    assert alert.notify_error == f"email: {NO_ROUTE}"

    server, endpoint = relay
    relayed = with_settings(
        m365_runtime,
        alert_smtp=endpoint,
        alert_smtp_username=RELAY_USER,
        alert_smtp_password=SecretStr("wrong"),
        alert_from="postdesk@example.com",
        alert_emails=("oncall@example.net",),
    )
    try:
        refused = evaluate_alerts(relayed)
        assert (refused.notified, refused.failed) == (0, 1)
        [alert] = alerts(m365_runtime)
        assert alert.notify_error is not None and "535" in alert.notify_error
        assert "wrong" not in alert.notify_error  # never the password

        fixed = with_settings(relayed, alert_smtp_password=SecretStr(RELAY_PASSWORD))
        try:
            retried = evaluate_alerts(fixed)  # tried again at the next evaluation, without a new alert
        finally:
            fixed.engine.dispose()
    finally:
        relayed.engine.dispose()
    assert (retried.opened, retried.notified) == ([], 1)
    [(mail_from, rcpt_tos, raw)] = server.received
    assert mail_from == "postdesk@example.com"
    assert rcpt_tos == [ADMIN, "oncall@example.net"]
    assert parse_mail(raw)["Subject"] == f"[Postdesk] {mailbox_user} needs sign-in"
    assert smtp_submission.accepted == []
    [alert] = alerts(m365_runtime)
    assert alert.notified_at is not None and alert.notify_error is None


# -- webhook --------------------------------------------------------------------------------------


@dataclass
class Hook:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    status: int = 204


@pytest.fixture
def hook() -> Iterator[tuple[Hook, str]]:
    received = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            assert self.headers["Content-Type"] == "application/json"
            received.bodies.append(json.loads(self.rfile.read(length)))
            received.paths.append(self.path)
            self.send_response(received.status)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield received, f"http://127.0.0.1:{server.server_address[1]}/hooks/postdesk?sig=s3cr3t"
    finally:
        server.shutdown()
        server.server_close()


def store_app(runtime: Runtime, *, secret_expires_at: datetime | None) -> int:
    with transaction(runtime.sessions) as session:
        app = MicrosoftApp(
            client_id="11111111-2222-3333-4444-555555555555",
            tenant="contoso.onmicrosoft.com",
            client_secret="a-client-secret-value",
            client_secret_expires_at=secret_expires_at,
        )
        session.add(app)
        session.flush()
        return app.id


def test_the_webhook_gets_a_json_post_for_each_alert_and_its_resolution(
    make_settings: Any, hook: tuple[Hook, str]
) -> None:
    received, url = hook
    runtime = bootstrap(make_settings(alert_webhook_url=SecretStr(url)), apply_migrations=True)
    try:
        add_user(runtime, ADMIN, ADMIN_PASSWORD, role=Role.ADMIN)
        expires = utcnow() + timedelta(days=10)
        app_id = store_app(runtime, secret_expires_at=expires)
        received.status = 500
        failed = evaluate_alerts(runtime)
        [alert] = alerts(runtime)
        assert (failed.notified, failed.failed) == (0, 1)
        assert (
            alert.notify_error is not None and "webhook: the webhook answered HTTP 500" in alert.notify_error
        )
        assert "s3cr3t" not in alert.notify_error

        received.status = 204
        assert evaluate_alerts(runtime).notified == 1  # retried
        [alert] = alerts(runtime)
        assert alert.notified_at is not None
        assert alert.notify_error == f"email: {NO_ROUTE}"  # the webhook told them; email could not
        body = received.bodies[-1]
        assert received.paths[-1] == "/hooks/postdesk?sig=s3cr3t"
        assert body["event"] == "alert.opened"
        assert body["alert"] == {
            "id": alert.id,
            "key": f"secret:{app_id}:14d",
            "kind": "secret_expiry",
            "severity": "warning",
            "title": f"The Microsoft 365 client secret expires on {expires:%Y-%m-%d} (in 10 days)",
            "message": alert.message,
            "channel": None,
            "fix": {
                "label": "Renew the secret or switch to a certificate",
                "url": "http://127.0.0.1:8025/channels#app",
                "page": "http://127.0.0.1:8025/channels#app",
            },
            "created_at": alert.created_at.isoformat(),
            "resolved_at": None,
        }
        assert body["postdesk"]["url"] == "http://127.0.0.1:8025"
        assert body["text"].startswith("[Postdesk] Warning: The Microsoft 365 client secret expires on")

        with transaction(runtime.sessions) as session:  # a new secret, valid for two years
            app = session.get(MicrosoftApp, app_id)
            assert app is not None
            app.client_secret_expires_at = utcnow() + timedelta(days=730)
        assert evaluate_alerts(runtime).resolved == [f"secret:{app_id}:14d"]
        resolved = received.bodies[-1]
        assert resolved["event"] == "alert.resolved"
        assert resolved["alert"]["resolved_at"] is not None
        assert resolved["text"].startswith("[Postdesk] Resolved: The Microsoft 365 client secret")
        assert len(received.bodies) == 3
    finally:
        runtime.engine.dispose()


# -- the no-mail watchdog -------------------------------------------------------------------------


def save_watchdog(desk: TestClient, channel_id: int, hours: str | None) -> None:
    page = desk.get(f"/channels/{channel_id}")
    assert "Alert when no mail arrives for … hours (empty: off)" in page.text
    form = {"csrf_token": csrf_from(page.text), "folder": "INBOX"}
    if hours is not None:
        form |= {"watchdog_hours": hours, "watchdog_in_form": "true"}
    response = desk.post(f"/channels/{channel_id}/settings", data=form, follow_redirects=False)
    assert response.status_code == 303, response.text


def test_the_watchdog_fires_after_n_hours_without_mail_not_before_and_clears_when_mail_arrives(
    signin: SignIn,
    m365_runtime: Runtime,
    channel_id: int,
    mailbox_user: str,
    dovecot: DovecotServer,
) -> None:
    fetch(m365_runtime, channel_id)  # the folder's starting point
    save_watchdog(signin.desk, channel_id, "6")
    assert channel(m365_runtime, channel_id).watchdog_hours == 6
    save_watchdog(signin.desk, channel_id, None)  # a form from before the watchdog leaves it alone
    assert channel(m365_runtime, channel_id).watchdog_hours == 6
    connected_at = channel(m365_runtime, channel_id).connected_at
    assert connected_at is not None

    assert evaluate_alerts(m365_runtime, now=connected_at + timedelta(hours=5, minutes=59)).opened == []
    fired = evaluate_alerts(m365_runtime, now=connected_at + timedelta(hours=6, minutes=1))
    assert fired.opened == [f"channel:{channel_id}:watchdog"]
    [alert] = alerts(m365_runtime)
    assert alert.title == f"{mailbox_user} has received no mail for 6 hours"
    assert alert.severity == "warning"
    # The only mailbox is the one gone quiet, and no relay is set: the admin is told why not.
    assert alert.notify_error == f"email: {NO_ROUTE}"
    assert f"{mailbox_user} has received no mail for 6 hours" in signin.desk.get("/channels").text

    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Anyone there?"))
    assert fetch(m365_runtime, channel_id).fetched == 1
    last_mail_at = channel(m365_runtime, channel_id).last_mail_at
    assert last_mail_at is not None
    cleared = evaluate_alerts(m365_runtime, now=last_mail_at + timedelta(hours=1))
    assert cleared.resolved == [alert.key]
    assert "has received no mail" not in signin.desk.get("/channels").text

    save_watchdog(signin.desk, channel_id, "")  # empty: off
    assert channel(m365_runtime, channel_id).watchdog_hours is None
    assert evaluate_alerts(m365_runtime, now=last_mail_at + timedelta(days=30)).opened == []


# -- the app's credential expiring -----------------------------------------------------------------


def test_a_client_secret_is_announced_at_30_14_7_and_1_days_each_once_and_critical_when_expired(
    db_runtime: Runtime,
) -> None:
    expires = utcnow().replace(microsecond=0) + timedelta(days=60)
    app_id = store_app(db_runtime, secret_expires_at=expires)

    def at(days_before: float) -> AlertReport:
        return evaluate_alerts(db_runtime, now=expires - timedelta(days=days_before))

    assert at(31).opened == []
    opened = []
    for days_before in (29.9, 25, 20, 15, 13.5, 10, 8, 6.5, 3, 2, 0.5, 0.1, -0.5, -3):
        report = at(days_before)
        opened += report.opened
    assert opened == [f"secret:{app_id}:{stage}" for stage in ("30d", "14d", "7d", "1d", "expired")]
    by_key = {alert.key: alert for alert in alerts(db_runtime)}
    assert [key for key, alert in by_key.items() if alert.resolved_at is None] == [f"secret:{app_id}:expired"]
    # A newer threshold replaces the older one without a "resolved" notice: nothing was resolved.
    assert all(alert.notified_at is not None for alert in by_key.values() if alert.resolved_at is not None)
    assert by_key[f"secret:{app_id}:30d"].severity == "warning"
    assert by_key[f"secret:{app_id}:1d"].severity == "critical"
    expired = by_key[f"secret:{app_id}:expired"]
    assert expired.severity == "critical"
    assert expired.title == f"The Microsoft 365 client secret expired on {expires:%Y-%m-%d}"
    assert "AADSTS7000222" in expired.message
    assert "Recommended instead: use a certificate" in by_key[f"secret:{app_id}:30d"].message


def test_the_certificate_in_use_is_watched_instead_of_the_secret(db_runtime: Runtime) -> None:
    now = utcnow()
    app_id = store_app(db_runtime, secret_expires_at=now + timedelta(days=3))
    with transaction(db_runtime.sessions) as session:
        app = session.get(MicrosoftApp, app_id)
        assert app is not None
        app.certificate_pem = "-----BEGIN CERTIFICATE-----"
        app.certificate_private_key = "-----BEGIN PRIVATE KEY-----"
        app.certificate_expires_at = now + timedelta(days=5)
        app.use_certificate = True
    report = evaluate_alerts(db_runtime, now=now)
    assert report.opened == [f"certificate:{app_id}:7d"]
    [alert] = alerts(db_runtime)
    assert alert.title.startswith("The Microsoft 365 app certificate expires on")
    assert "Replace certificate" in alert.message


def test_alert_settings_fail_fast_with_the_variable_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from postdesk.config import ConfigError, load_settings

    for name in [name for name in os.environ if name.startswith("POSTDESK_")]:
        monkeypatch.delenv(name)
    for name, value in {
        "POSTDESK_ALERT_SMTP": "relay.example.com:587",
        "POSTDESK_ALERT_SMTP_USERNAME": "postdesk",
        "POSTDESK_ALERT_EMAILS": "oncall@example.net, not-an-address",
    }.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    words = str(refused.value)
    assert (
        "POSTDESK_ALERT_SMTP_PASSWORD: set POSTDESK_ALERT_SMTP_USERNAME and POSTDESK_ALERT_SMTP_PASSWORD"
        in words
    )
    assert "POSTDESK_ALERT_FROM: required with POSTDESK_ALERT_SMTP" in words
    assert "POSTDESK_ALERT_EMAILS: expected an email address" in words
    monkeypatch.setenv("POSTDESK_ALERT_SMTP_PASSWORD", "pw")
    monkeypatch.setenv("POSTDESK_ALERT_FROM", "postdesk@example.com")
    monkeypatch.setenv("POSTDESK_ALERT_EMAILS", "oncall@example.net, ops@example.org")
    settings: Settings = load_settings()
    assert settings.alert_emails == ("oncall@example.net", "ops@example.org")
