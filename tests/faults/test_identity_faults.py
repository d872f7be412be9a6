"""Faults of Microsoft's identity platform while a mailbox's token is refreshed (issue #9).

Each fault hits the refresh that a mail fetch (or the sender) needs because the mailbox's access token
has expired. Every test checks the same promises: the fetch fails as a passing failure (counted on the
token status, the mailbox not sent to re-authentication), the status and the log say in words what
happened (no traceback), mail that arrived before the fault becomes exactly one ticket once the fault
clears, and that first good fetch resets the failure count.
"""

# ruff: noqa: F811 - the desk's fixtures are imported from tests/microsoft365 and then requested by name

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Literal

import httpx
import pytest
import trustme

from postdesk.config import Settings
from postdesk.db.models import ChannelStatus, DeliveryStatus
from postdesk.db.types import utcnow
from postdesk.ingest.fetch import FetchResult, fetch_channel
from postdesk.microsoft import identity as identity_module
from postdesk.microsoft import tokens as tokens_module
from postdesk.outbox.queue import Draft
from postdesk.outbox.sender import send_due
from postdesk.runtime import Runtime
from postdesk.sandbox import CONTOSO_TENANT_ID, RegisteredApp, SandboxDirectory, SandboxServer
from postdesk.sandbox.mailserver import DovecotServer

# The desk of tests/microsoft365: its fixtures are imported so these tests can use them from here.
from tests.microsoft365.conftest import (  # noqa: F401 - fixtures, requested by name
    Inbox,
    browser,
    channel_id,
    channels,
    customer,
    customer_inbox,
    delivery_of,
    desk,
    entra_app,
    fetch,
    m365_admin,
    m365_runtime,
    m365_settings,
    mailbox_user,
    question_cc,
    queue_draft,
    signin,
    ticket_number,
    tickets,
    trusted_cas,
)
from tests.microsoft365.test_inbound_tokens import _grants
from tests.microsoft365.test_token_lifecycle import _expire_cached_access_tokens
from tests.support.mailfactory import customer_mail

# Microsoft's own words for throttling (AADSTS90055, "TenantThrottlingError").
THROTTLED = "AADSTS90055: TenantThrottlingError - There are too many incoming requests."
PROXY_PAGE = "<!DOCTYPE html><html><head><title>Access denied</title></head><body>Blocked</body></html>"


@pytest.fixture(autouse=True)
def _no_retry_after_left_over() -> Iterator[None]:
    """A Retry-After is remembered per channel id, and every test's database starts again at id 1."""
    tokens_module._not_before.clear()
    yield
    tokens_module._not_before.clear()


def _mail_waiting(dovecot: DovecotServer, mailbox: str, subject: str) -> None:
    """A customer's mail lands in the mailbox before the fault, and the desk's access token has expired."""
    dovecot.deliver(mailbox, customer_mail(to=mailbox, subject=subject))


def _failed_fetch(runtime: Runtime, channel_id: int) -> FetchResult:
    result = fetch_channel(runtime, channel_id)
    assert result.error is not None, "the fetch should have failed"
    return result


def _assert_passing_failure(
    runtime: Runtime, result: FetchResult, caplog: pytest.LogCaptureFixture, *words: str
) -> None:
    """Transient, counted once, said in words on the channel and in the log, and no mail taken yet."""
    assert result.error is not None
    assert result.error.endswith("retrying later")
    for word in words:
        assert word in result.error
    [channel] = channels(runtime)
    assert channel.status is ChannelStatus.OK  # not "needs re-authentication", not an error yet
    assert channel.token_failures == 1
    assert channel.token_failing_since is not None
    assert channel.last_error == result.error
    assert "Traceback" not in result.error
    assert not [record for record in caplog.records if record.exc_info]
    assert any(result.error in record.getMessage() for record in caplog.records)
    assert tickets(runtime) == []


def _assert_recovers(runtime: Runtime, channel_id: int, subject: str) -> None:
    """The next fetch succeeds, resets the failure state, and the waiting mail is one ticket, once."""
    fetch(runtime, channel_id)
    fetch(runtime, channel_id)
    assert [ticket.title for ticket in tickets(runtime)] == [subject]
    [channel] = channels(runtime)
    assert (channel.status, channel.last_error) == (ChannelStatus.OK, None)
    assert (channel.token_failures, channel.token_failing_since) == (0, None)


# -- the sandbox's fault injection itself ---------------------------------------------------------


def test_the_sandbox_queues_errors_with_retry_after_raw_answers_and_hangs(
    sandbox: SandboxServer, directory: SandboxDirectory
) -> None:
    control = f"{sandbox.base_url}/_sandbox"
    token_url = f"{sandbox.base_url}/{CONTOSO_TENANT_ID}/oauth2/v2.0/token"
    unknown_grant = {"grant_type": "telepathy"}
    context = ssl.create_default_context(cafile=str(sandbox.ca_path))
    with httpx.Client(verify=context, trust_env=False, timeout=10) as client:
        throttle = {"endpoint": "token", "error": "temporarily_unavailable", "status": 429, "retry_after": 30}
        assert client.post(f"{control}/fail-next", json=throttle).status_code == 202
        assert (
            client.post(f"{control}/answer-next", json={"status": 502, "body": PROXY_PAGE}).status_code == 202
        )
        assert client.post(f"{control}/delay-next", json={"seconds": 0.5}).status_code == 202
        throttled = client.post(token_url, data=unknown_grant)
        assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "30")
        assert throttled.json()["error"] == "temporarily_unavailable"
        proxied = client.post(token_url, data=unknown_grant)
        assert (proxied.status_code, proxied.text) == (502, PROXY_PAGE)
        assert proxied.headers["Content-Type"].startswith("text/html")
        started = time.monotonic()
        late = client.post(token_url, data=unknown_grant)
        assert time.monotonic() - started >= 0.5
        assert late.json()["error"] == "unsupported_grant_type"  # answered as usual, only late
    with pytest.raises(ValueError, match="'token'"):
        directory.delay_next("authorize", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'token'"):
        directory.fail_next("authorize", error="x", aadsts=None, description="", retry_after=5)


# -- a hang ----------------------------------------------------------------------------------------


def test_a_token_endpoint_that_hangs_is_given_up_after_the_timeout_and_nothing_is_lost(
    m365_runtime: Runtime,
    channel_id: int,
    directory: SandboxDirectory,
    entra_app: RegisteredApp,
    dovecot: DovecotServer,
    mailbox_user: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(identity_module, "HTTP_TIMEOUT", 1.5)
    _mail_waiting(dovecot, mailbox_user, "Sent while Microsoft hung")
    _expire_cached_access_tokens(m365_runtime)
    grants = _grants(directory, entra_app)
    directory.delay_next("token", 5)
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        result = _failed_fetch(m365_runtime, channel_id)
    assert time.monotonic() - started < 4.5  # the timeout, not the hang, ended the wait
    _assert_passing_failure(m365_runtime, result, caplog, "no answer within 1.5 seconds")
    # The slow answer still comes: Microsoft redeemed the refresh token for an answer nobody read.
    deadline = time.monotonic() + 15
    while _grants(directory, entra_app) == grants and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _grants(directory, entra_app) == grants + 1
    # Postdesk kept its refresh token, which stays valid after that redemption.
    _assert_recovers(m365_runtime, channel_id, "Sent while Microsoft hung")


# -- server errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"), [(500, "server_error"), (503, "temporarily_unavailable")], ids=["500", "503"]
)
def test_a_server_error_from_the_token_endpoint_is_a_passing_failure(
    m365_runtime: Runtime,
    channel_id: int,
    directory: SandboxDirectory,
    dovecot: DovecotServer,
    mailbox_user: str,
    caplog: pytest.LogCaptureFixture,
    status: int,
    error: str,
) -> None:
    _mail_waiting(dovecot, mailbox_user, f"Sent during a {status}")
    _expire_cached_access_tokens(m365_runtime)
    directory.fail_next("token", error=error, aadsts=None, description="Try again later.", status=status)
    with caplog.at_level(logging.INFO):
        result = _failed_fetch(m365_runtime, channel_id)
    _assert_passing_failure(m365_runtime, result, caplog, "could not be reached", f"HTTP Error: {status}")
    _assert_recovers(m365_runtime, channel_id, f"Sent during a {status}")


# -- throttling ------------------------------------------------------------------------------------


def test_throttling_with_retry_after_is_waited_out_without_asking_microsoft_again(
    m365_runtime: Runtime,
    channel_id: int,
    directory: SandboxDirectory,
    entra_app: RegisteredApp,
    dovecot: DovecotServer,
    mailbox_user: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _mail_waiting(dovecot, mailbox_user, "Sent while throttled")
    _expire_cached_access_tokens(m365_runtime)
    directory.fail_next(
        "token",
        error="temporarily_unavailable",
        aadsts=90055,
        description=THROTTLED,
        status=429,
        retry_after=120,
    )
    with caplog.at_level(logging.INFO):
        result = _failed_fetch(m365_runtime, channel_id)
    _assert_passing_failure(m365_runtime, result, caplog, "throttling", "AADSTS90055", "Retry-After 120 s")
    # Fetching again within the two minutes (IDLE news, "Fetch now") does not ask Microsoft: had it
    # asked, the sandbox would have issued a token and the fetch would have gone through.
    grants = _grants(directory, entra_app)
    waiting = _failed_fetch(m365_runtime, channel_id)
    assert waiting.error is not None and "asked Postdesk to wait" in waiting.error
    assert _grants(directory, entra_app) == grants
    [channel] = channels(m365_runtime)
    assert (channel.status, channel.token_failures) == (ChannelStatus.OK, 1)  # waiting is no new failure
    later = utcnow() + timedelta(seconds=121)
    monkeypatch.setattr(tokens_module, "utcnow", lambda: later)
    _assert_recovers(m365_runtime, channel_id, "Sent while throttled")
    assert _grants(directory, entra_app) == grants + 1


def test_the_sender_waits_out_a_passing_failure_and_sends_the_reply_once(
    m365_runtime: Runtime,
    ticket_number: int,
    directory: SandboxDirectory,
    customer_inbox: Inbox,
) -> None:
    article_id = queue_draft(m365_runtime, ticket_number, Draft(kind="reply", body_text="On our way."))
    _expire_cached_access_tokens(m365_runtime)
    directory.fail_next(
        "token", error="temporarily_unavailable", aadsts=None, description="Try later.", status=503
    )
    first = send_due(m365_runtime)
    assert (first.sent, first.failed, first.retrying) == (0, 0, 1)
    waiting = delivery_of(m365_runtime, article_id)
    assert waiting.status is DeliveryStatus.QUEUED
    assert waiting.attempts == 0  # the mailbox's trouble does not use up the reply's attempts
    assert waiting.last_error is not None and "HTTP Error: 503" in waiting.last_error
    [channel] = channels(m365_runtime)
    assert (channel.status, channel.token_failures) == (ChannelStatus.OK, 1)
    assert customer_inbox() == []
    assert send_due(m365_runtime, include_waiting=True).sent == 1
    assert len(customer_inbox()) == 1
    assert delivery_of(m365_runtime, article_id).status is DeliveryStatus.SENT
    assert channels(m365_runtime)[0].token_failures == 0


# -- answers that are not Microsoft's JSON ---------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "content_type", "words"),
    [
        (
            200,
            PROXY_PAGE,
            "text/html; charset=utf-8",
            ("could not read", "HTTP 200 (text/html) with something other than Microsoft's JSON"),
        ),
        (200, '{"token_type": "Bearer", "access_tok', "application/json", ("could not read", "HTTP 200")),
        (200, "null", "application/json", ("could not read", "HTTP 200")),
        (
            200,
            "{}",
            "application/json",
            ("could not read", "HTTP 200 (application/json) with JSON without access_token"),
        ),
        (200, "", "application/json", ("could not read", "HTTP 200")),
        (400, PROXY_PAGE, "text/html", ("could not read", "HTTP 400 (text/html)")),
        (429, "Too Many Requests", "text/plain", ("could not read", "HTTP 429 (text/plain)")),
        (502, PROXY_PAGE, "text/html", ("could not be reached", "HTTP Error: 502")),
    ],
    ids=["html-200", "cut-json", "json-null", "json-empty", "empty", "html-400", "text-429", "html-502"],
)
def test_an_answer_that_is_not_microsofts_json_is_a_passing_failure(
    m365_runtime: Runtime,
    channel_id: int,
    directory: SandboxDirectory,
    dovecot: DovecotServer,
    mailbox_user: str,
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: str,
    content_type: str,
    words: tuple[str, ...],
) -> None:
    _mail_waiting(dovecot, mailbox_user, "Sent behind a broken proxy")
    _expire_cached_access_tokens(m365_runtime)
    directory.answer_next("token", status=status, body=body, content_type=content_type)
    with caplog.at_level(logging.INFO):
        result = _failed_fetch(m365_runtime, channel_id)
    _assert_passing_failure(m365_runtime, result, caplog, *words)
    _assert_recovers(m365_runtime, channel_id, "Sent behind a broken proxy")


# -- TLS -------------------------------------------------------------------------------------------

GateMode = Literal["relay", "untrusted", "cut"]


class TlsGate:
    """A TCP relay in front of the sandbox. For each new connection it relays bytes (the sandbox's own
    TLS), presents a certificate from a CA nobody trusts, or cuts the handshake after the ClientHello."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode: GateMode = "relay"
        certificate = trustme.CA().issue_cert("127.0.0.1")
        self._untrusted = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certificate.configure_cert(self._untrusted)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="tls-gate", daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client, self.mode), daemon=True).start()

    def _serve(self, client: socket.socket, mode: GateMode) -> None:
        with client:
            client.settimeout(10)
            try:
                if mode == "cut":
                    client.recv(4096)
                elif mode == "untrusted":
                    self._untrusted.wrap_socket(client, server_side=True).close()
                else:
                    with socket.create_connection(self.upstream, timeout=10) as upstream:
                        _relay(client, upstream)
            except OSError:
                pass  # the desk refused our certificate, or hung up: what the test wants


def _relay(one: socket.socket, other: socket.socket) -> None:
    peers = {one: other, other: one}
    while True:
        readable, _, _ = select.select(list(peers), [], [], 10)
        if not readable:
            return
        for source in readable:
            data = source.recv(65536)
            if not data:
                return
            peers[source].sendall(data)


class TestTlsFailures:
    """The desk reaches the identity platform through a TlsGate from the sign-in on."""

    @pytest.fixture
    def gate(self, sandbox: SandboxServer) -> Iterator[TlsGate]:
        gate = TlsGate((sandbox.host, sandbox.port))
        yield gate
        gate.close()

    @pytest.fixture
    def m365_settings(self, m365_settings: Settings, gate: TlsGate) -> Settings:
        return m365_settings.model_copy(update={"microsoft_login_url": gate.base_url})

    @pytest.mark.parametrize(
        ("mode", "words"),
        [
            (
                "untrusted",
                "the server's TLS certificate is not trusted: unable to get local issuer certificate",
            ),
            ("cut", "the TLS handshake failed"),
        ],
    )
    def test_a_tls_failure_at_the_identity_platform_is_a_passing_failure(
        self,
        gate: TlsGate,
        m365_runtime: Runtime,
        channel_id: int,
        dovecot: DovecotServer,
        mailbox_user: str,
        caplog: pytest.LogCaptureFixture,
        mode: GateMode,
        words: str,
    ) -> None:
        _mail_waiting(dovecot, mailbox_user, f"Sent while TLS was {mode}")
        _expire_cached_access_tokens(m365_runtime)
        gate.mode = mode
        with caplog.at_level(logging.INFO):
            result = _failed_fetch(m365_runtime, channel_id)
        _assert_passing_failure(m365_runtime, result, caplog, "could not be reached", words)
        gate.mode = "relay"
        _assert_recovers(m365_runtime, channel_id, f"Sent while TLS was {mode}")
