"""The sandbox's stand-in for smtp.office365.com:587, driven by the standard library's smtplib over real
STARTTLS, with real sandbox access tokens, filing mail into the session's real Dovecot."""

from __future__ import annotations

import base64
import itertools
import smtplib
import ssl
from collections.abc import Callable
from datetime import timedelta
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import make_msgid

import pytest

from postdesk.sandbox import CONTOSO_TENANT_ID, RegisteredApp, SandboxDirectory, SandboxServer
from postdesk.sandbox.mailserver import IMAP_SCOPE, DovecotServer, access_token_for
from postdesk.sandbox.submission import SMTP_SCOPE, SubmissionServer

TokenFor = Callable[..., str]
NewMailbox = Callable[[], str]
GRAPH_MAIL_SEND = "https://graph.microsoft.com/Mail.Send"
OUTSIDER = "customer@example.org"
_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def smtp_app(sandbox: SandboxServer) -> RegisteredApp:
    return sandbox.directory.register_app(display_name="Postdesk (SMTP tests)")


@pytest.fixture
def token_for(directory: SandboxDirectory, smtp_app: RegisteredApp) -> TokenFor:
    """`token_for(upn, scope=SMTP_SCOPE)`: an access token as the sandbox issues it after a sign-in."""

    def issue(upn: str, *, scope: str = SMTP_SCOPE) -> str:
        return access_token_for(directory, smtp_app, upn, scope=scope)

    return issue


@pytest.fixture
def new_mailbox(directory: SandboxDirectory) -> NewMailbox:
    """Fresh Contoso users, so Dovecot folders and per-mailbox switches never carry over between tests."""

    def create() -> str:
        number = next(_numbers)
        user = directory.add_user(
            upn=f"smtp-test-{number}@contoso.onmicrosoft.com",
            display_name=f"SMTP Test {number}",
            tenant_id=CONTOSO_TENANT_ID,
        )
        return user.upn

    return create


class xoauth2:  # noqa: N801 (reads as the function smtplib wants)
    """smtplib's auth object: the unencoded XOAUTH2 response, for the AUTH line and for any challenge;
    it remembers the challenges it answered (None for the AUTH line)."""

    def __init__(self, user: str, token: str) -> None:
        self.response = f"user={user}\x01auth=Bearer {token}\x01\x01"
        self.challenges: list[bytes | None] = []

    def __call__(self, challenge: bytes | None = None) -> str:
        self.challenges.append(challenge)
        return self.response


def connect(server: SubmissionServer, *, starttls: bool = True) -> smtplib.SMTP:
    client = smtplib.SMTP(server.host, server.port, timeout=10)
    client.ehlo("desk.example.test")
    if starttls:
        client.starttls(context=ssl.create_default_context(cafile=str(server.ca_path)))
        client.ehlo("desk.example.test")
    return client


def signed_in(server: SubmissionServer, user: str, token: str) -> smtplib.SMTP:
    client = connect(server)
    code, _ = client.auth("XOAUTH2", xoauth2(user, token))
    assert code == 235
    return client


def message(sender: str, recipient: str, *, subject: str = "Re: the printer", body: str = "Fixed.") -> bytes:
    mail = EmailMessage(policy=SMTP_POLICY)
    mail["From"] = sender
    mail["To"] = recipient
    mail["Subject"] = subject
    mail["Message-ID"] = make_msgid(domain="desk.example.test")
    mail.set_content(body)
    return mail.as_bytes()


@pytest.fixture
def sender(new_mailbox: NewMailbox) -> str:
    return new_mailbox()


def assert_refused(error: smtplib.SMTPResponseException, code: int, text: str) -> None:
    reply = error.smtp_error.decode() if isinstance(error.smtp_error, bytes) else error.smtp_error
    assert (error.smtp_code, reply[: len(text)]) == (code, text)


# -- AUTH XOAUTH2 ------------------------------------------------------------------------------


def test_it_accepts_the_token_on_the_auth_line(
    smtp_submission: SubmissionServer, sender: str, token_for: TokenFor
) -> None:
    auth = xoauth2(sender, token_for(sender))
    with connect(smtp_submission) as client:
        assert len(auth.response) > 1536  # so the base64 on the AUTH line is over 2 KB
        code, reply = client.auth("XOAUTH2", auth)
        assert (code, reply) == (235, b"2.7.0 Authentication successful")
        client.sendmail(sender, [OUTSIDER], message(sender, OUTSIDER))
    assert [m.user for m in smtp_submission.accepted] == [sender]


def test_it_accepts_the_token_after_an_empty_334_challenge(
    smtp_submission: SubmissionServer, sender: str, token_for: TokenFor
) -> None:
    auth = xoauth2(sender, token_for(sender))
    with connect(smtp_submission) as client:
        code, _ = client.auth("XOAUTH2", auth, initial_response_ok=False)
    assert code == 235
    assert auth.challenges == [b""]


def test_in_challenge_only_mode_a_token_on_the_auth_line_is_too_long_and_the_client_can_fall_back(
    smtp_submission: SubmissionServer, sender: str, token_for: TokenFor
) -> None:
    smtp_submission.challenge_only = True
    auth = xoauth2(sender, token_for(sender))
    with connect(smtp_submission) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("XOAUTH2", auth)
        assert_refused(refused.value, 500, "5.5.2 Line too long")
        code, _ = client.auth("XOAUTH2", auth, initial_response_ok=False)
    assert code == 235


@pytest.mark.parametrize("problem", ["expired", "another user", "graph token", "no SMTP.Send", "garbage"])
def test_a_token_that_does_not_fit_gets_535_5_7_3(
    smtp_submission: SubmissionServer,
    directory: SandboxDirectory,
    new_mailbox: NewMailbox,
    token_for: TokenFor,
    problem: str,
) -> None:
    user, other = new_mailbox(), new_mailbox()
    tokens: dict[str, Callable[[], str]] = {
        "expired": lambda: token_for(user),
        "another user": lambda: token_for(other),
        "graph token": lambda: token_for(user, scope=GRAPH_MAIL_SEND),
        "no SMTP.Send": lambda: token_for(user, scope=IMAP_SCOPE),
        "garbage": lambda: "eyJhbGciOiJub25lIn0.e30.",
    }
    token = tokens[problem]()
    if problem == "expired":
        directory.clock_offset = timedelta(hours=2)
    with connect(smtp_submission) as client, pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        client.auth("XOAUTH2", xoauth2(user, token))
    assert_refused(refused.value, 535, "5.7.3 Authentication unsuccessful [")


def test_basic_authentication_is_advertised_but_refused(
    smtp_submission: SubmissionServer, sender: str
) -> None:
    with connect(smtp_submission) as client:
        assert client.esmtp_features["auth"].split() == ["LOGIN", "XOAUTH2"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login(sender, "password")
    assert_refused(
        refused.value, 535, "5.7.139 Authentication unsuccessful, basic authentication is disabled."
    )


# -- what needs AUTH and TLS -------------------------------------------------------------------


def test_mail_before_auth_gets_530_5_7_57(smtp_submission: SubmissionServer, sender: str) -> None:
    with connect(smtp_submission) as client:
        assert client.mail(sender) == (530, b"5.7.57 Client not authenticated to send mail.")
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail(sender, [OUTSIDER], message(sender, OUTSIDER))
    assert smtp_submission.accepted == []


def test_auth_is_neither_offered_nor_accepted_before_starttls(
    smtp_submission: SubmissionServer, sender: str, token_for: TokenFor
) -> None:
    with connect(smtp_submission, starttls=False) as client:
        assert "starttls" in client.esmtp_features
        assert "auth" not in client.esmtp_features
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("XOAUTH2", xoauth2(sender, token_for(sender)))
        assert_refused(refused.value, 504, "5.7.4 Unrecognized authentication type")
        assert client.mail(sender)[0] == 530


def test_after_starttls_the_client_must_say_ehlo_again(
    smtp_submission: SubmissionServer, sender: str, token_for: TokenFor
) -> None:
    with connect(smtp_submission, starttls=False) as client:
        client.starttls(context=ssl.create_default_context(cafile=str(smtp_submission.ca_path)))
        line = xoauth2(sender, token_for(sender)).response
        assert client.docmd("AUTH", "XOAUTH2 " + base64.b64encode(line.encode()).decode()) == (
            503,
            b"5.5.2 Send hello first",
        )


# -- Exchange's switches and permissions -----------------------------------------------------


def test_smtp_auth_disabled_for_the_tenant_gets_535_5_7_139(
    smtp_submission: SubmissionServer, sender: str, token_for: TokenFor
) -> None:
    smtp_submission.set_tenant_smtp_auth_disabled("contoso.onmicrosoft.com", True)
    with connect(smtp_submission) as client, pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        client.auth("XOAUTH2", xoauth2(sender, token_for(sender)))
    assert_refused(
        refused.value,
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. "
        "Visit https://aka.ms/smtp_auth_disabled for more information.",
    )


def test_smtp_auth_disabled_for_the_mailbox_gets_535_5_7_139(
    smtp_submission: SubmissionServer, sender: str, token_for: TokenFor
) -> None:
    smtp_submission.set_smtp_auth_disabled(sender, True)
    with connect(smtp_submission) as client, pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        client.auth("XOAUTH2", xoauth2(sender, token_for(sender)))
    assert_refused(
        refused.value,
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.",
    )


def test_a_mailbox_enabled_for_smtp_auth_may_use_it_where_the_tenant_disabled_it(
    smtp_submission: SubmissionServer, sender: str, token_for: TokenFor
) -> None:
    smtp_submission.set_tenant_smtp_auth_disabled(CONTOSO_TENANT_ID, True)
    smtp_submission.set_smtp_auth_disabled(sender, False)
    signed_in(smtp_submission, sender, token_for(sender)).quit()


def test_a_header_from_the_user_may_not_send_as_is_refused_after_data(
    smtp_submission: SubmissionServer, sender: str, new_mailbox: NewMailbox, token_for: TokenFor
) -> None:
    colleague = new_mailbox()
    client = signed_in(smtp_submission, sender, token_for(sender))
    with client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail(sender, [OUTSIDER], message(colleague, OUTSIDER))
    assert_refused(
        refused.value,
        554,
        f"5.2.252 SendAsDenied; {sender} not allowed to send as {colleague}; "
        "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
        "Failed to process message due to a permanent exception with message",
    )
    assert smtp_submission.accepted == []


def test_an_envelope_sender_the_user_may_not_send_as_is_refused_after_data(
    smtp_submission: SubmissionServer, sender: str, new_mailbox: NewMailbox, token_for: TokenFor
) -> None:
    colleague = new_mailbox()
    client = signed_in(smtp_submission, sender, token_for(sender))
    with client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail(colleague, [OUTSIDER], message(sender, OUTSIDER))
    assert_refused(refused.value, 554, f"5.2.252 SendAsDenied; {sender} not allowed to send as {colleague};")
    assert smtp_submission.accepted == []


def test_a_send_as_grant_lets_a_delegate_send_as_a_shared_mailbox(
    smtp_submission: SubmissionServer,
    dovecot: DovecotServer,
    sender: str,
    new_mailbox: NewMailbox,
    token_for: TokenFor,
) -> None:
    shared = new_mailbox()
    smtp_submission.grant_send_as(sender, shared)
    raw = message(shared, OUTSIDER)
    with signed_in(smtp_submission, sender, token_for(sender)) as client:
        client.sendmail(shared, [OUTSIDER], raw)
    [accepted] = smtp_submission.accepted
    assert (accepted.user, accepted.mail_from, accepted.raw) == (sender, shared, raw)
    # Exchange files the copy in the delegate's Sent Items unless the shared mailbox asks for its own.
    assert dovecot.messages(sender, "Sent Items") == [raw]
    assert dovecot.messages(shared, "Sent Items") == []


def test_a_shared_mailbox_with_message_copy_for_sent_as_gets_its_own_sent_items_copy(
    smtp_submission: SubmissionServer,
    dovecot: DovecotServer,
    sender: str,
    new_mailbox: NewMailbox,
    token_for: TokenFor,
) -> None:
    shared = new_mailbox()
    smtp_submission.grant_send_as(sender, shared)
    smtp_submission.set_message_copy_for_sent_as(shared, True)
    raw = message(shared, OUTSIDER)
    with signed_in(smtp_submission, sender, token_for(sender)) as client:
        client.sendmail(shared, [OUTSIDER], raw)
    assert dovecot.messages(sender, "Sent Items") == [raw]
    assert dovecot.messages(shared, "Sent Items") == [raw]
    assert smtp_submission.accepted[0].sent_items == (sender, shared)


def test_the_size_limit_is_advertised_and_a_bigger_message_gets_552_5_3_4(
    smtp_submission: SubmissionServer, sender: str, token_for: TokenFor
) -> None:
    smtp_submission.max_message_size = 2_000
    big = message(sender, OUTSIDER, body="x" * 3_000)
    with signed_in(smtp_submission, sender, token_for(sender)) as client:
        assert client.esmtp_features["size"] == "2000"
        # smtplib declares SIZE= on MAIL when the server advertises SIZE; the server refuses there ...
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(sender, [OUTSIDER], big)
        assert_refused(refused.value, 552, "5.3.4 Message size exceeds fixed maximum message size")
        # ... and a client that does not declare the size is refused after DATA.
        client.rset()
        assert client.mail(sender)[0] == 250
        assert client.rcpt(OUTSIDER)[0] == 250
        assert client.data(big) == (552, b"5.3.4 Message size exceeds fixed maximum message size")
    assert smtp_submission.accepted == []


# -- injected failures -------------------------------------------------------------------------


def test_a_queued_data_failure_answers_one_message_and_the_next_is_accepted(
    smtp_submission: SubmissionServer, sender: str, token_for: TokenFor
) -> None:
    smtp_submission.fail_next("data", 451, "4.7.500 Server busy. Please try again later.")
    with signed_in(smtp_submission, sender, token_for(sender)) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(sender, [OUTSIDER], message(sender, OUTSIDER))
        assert_refused(refused.value, 451, "4.7.500 Server busy. Please try again later.")
        assert smtp_submission.accepted == []
        client.sendmail(sender, [OUTSIDER], message(sender, OUTSIDER))
    assert len(smtp_submission.accepted) == 1


def test_a_queued_connect_failure_replaces_the_greeting(
    smtp_submission: SubmissionServer, sender: str, token_for: TokenFor
) -> None:
    smtp_submission.fail_next("connect", 421, "4.3.2 Service not available")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        connect(smtp_submission)
    assert_refused(refused.value, 421, "4.3.2 Service not available")
    signed_in(smtp_submission, sender, token_for(sender)).quit()


def test_queued_auth_and_rcpt_failures_answer_those_commands(
    smtp_submission: SubmissionServer, sender: str, token_for: TokenFor
) -> None:
    smtp_submission.fail_next("auth", 454, "4.7.0 Temporary authentication failure")
    smtp_submission.fail_next(
        "rcpt", 550, "5.7.60 SMTP; Client does not have permissions to send as this sender"
    )
    token = token_for(sender)
    with connect(smtp_submission) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("XOAUTH2", xoauth2(sender, token))
        assert refused.value.smtp_code == 454
        assert client.auth("XOAUTH2", xoauth2(sender, token))[0] == 235
        with pytest.raises(smtplib.SMTPRecipientsRefused) as rejected:
            client.sendmail(sender, [OUTSIDER], message(sender, OUTSIDER))
        assert rejected.value.recipients[OUTSIDER][0] == 550


def test_a_421_reply_closes_the_connection(
    smtp_submission: SubmissionServer, sender: str, token_for: TokenFor
) -> None:
    smtp_submission.fail_next("mail", 421, "4.3.2 Service not available, closing transmission channel")
    with signed_in(smtp_submission, sender, token_for(sender)) as client:
        assert client.mail(sender)[0] == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()


def test_fail_next_knows_its_stages_and_codes(smtp_submission: SubmissionServer) -> None:
    with pytest.raises(ValueError, match="stage"):
        smtp_submission.fail_next("quit", 421, "no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="4xx or 5xx"):
        smtp_submission.fail_next("data", 250, "OK")


# -- delivery ----------------------------------------------------------------------------------


def test_accepted_mail_reaches_hosted_inboxes_and_the_senders_sent_items_byte_for_byte(
    smtp_submission: SubmissionServer,
    dovecot: DovecotServer,
    sender: str,
    new_mailbox: NewMailbox,
    token_for: TokenFor,
) -> None:
    colleague = new_mailbox()
    raw = message(sender, colleague, subject="Ticket #1042: the printer")
    with signed_in(smtp_submission, sender, token_for(sender)) as client:
        client.sendmail(sender, [colleague, OUTSIDER], raw)
    [accepted] = smtp_submission.accepted
    assert (accepted.rcpt_tos, accepted.delivered_to, accepted.sent_items) == (
        (colleague, OUTSIDER),
        (colleague,),
        (sender,),
    )
    assert dovecot.messages(colleague) == [raw]
    assert dovecot.messages(sender) == []
    assert dovecot.messages(sender, "Sent Items") == [raw]


def test_the_sent_items_copy_can_be_found_by_message_id_over_imap(
    smtp_submission: SubmissionServer,
    dovecot: DovecotServer,
    sender: str,
    token_for: TokenFor,
) -> None:
    raw = message(sender, OUTSIDER)
    message_id = raw.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0].decode()
    with signed_in(smtp_submission, sender, token_for(sender)) as client:
        client.sendmail(sender, [OUTSIDER], raw)
    imap = dovecot.imap_login(token_for(sender, scope=IMAP_SCOPE), sender)
    try:
        assert imap.select('"Sent Items"', readonly=True)[0] == "OK"
        status, found = imap.search(None, "HEADER", "Message-ID", f'"{message_id}"')
        assert (status, found[0].split()) == ("OK", [b"1"])
        _, fetched = imap.fetch("1", "(FLAGS BODY.PEEK[])")
        flags_and_body = fetched[0]
        assert isinstance(flags_and_body, tuple)
        assert b"\\Seen" in flags_and_body[0]
        assert flags_and_body[1] == raw
    finally:
        imap.logout()


def test_a_server_without_dovecot_records_mail_and_stops_cleanly(
    sandbox: SandboxServer,
    smtp_app: RegisteredApp,
    new_mailbox: NewMailbox,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    sender = new_mailbox()
    with SubmissionServer(sandbox.directory, tmp_path_factory.mktemp("alone")) as server:
        token = access_token_for(sandbox.directory, smtp_app, sender, scope=SMTP_SCOPE)
        with signed_in(server, sender, token) as client:
            client.sendmail(sender, [OUTSIDER], message(sender, OUTSIDER))
        assert [(m.delivered_to, m.sent_items) for m in server.accepted] == [((), ())]
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP(server.host, server.port, timeout=5)


def test_ca_path_needs_a_started_server(
    sandbox: SandboxServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    never_started = SubmissionServer(sandbox.directory, tmp_path_factory.mktemp("unused"))
    with pytest.raises(RuntimeError, match="not been started"):
        _ = never_started.ca_path
