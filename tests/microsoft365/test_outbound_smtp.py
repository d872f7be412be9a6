"""Replies go out over SMTP XOAUTH2 and arrive in the customer's mailbox, threaded, exactly once."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from postdesk.db.models import Article, Channel, ChannelEvent, DeliveryStatus, OutboundMessage, Ticket
from postdesk.db.session import transaction
from postdesk.outbox import sender as sender_module
from postdesk.outbox.queue import Draft, DraftError, UploadedFile
from postdesk.outbox.sender import send_due
from postdesk.runtime import Runtime
from postdesk.sandbox.submission import Stage, SubmissionServer
from postdesk.transports.errors import OutcomeUnknown
from postdesk.transports.smtp import SmtpSubmission
from tests.microsoft365.conftest import Inbox, changing_delivery, delivery_of, queue_draft, receive_mail
from tests.support.cli import run_postdesk, start_postdesk
from tests.support.dovecot import DovecotServer, inbox

# Exchange Online's answer to the message data when it is too busy: a temporary failure.
SERVER_BUSY: tuple[Stage, int, str] = ("data", 451, "4.7.500 Server busy. Please try again later.")


def _make_due(runtime: Runtime, article_id: int) -> None:
    """Time passes: the retry (or the dead sender's lease) is due now."""
    with changing_delivery(runtime, article_id) as row:
        row.next_attempt_at = row.created_at
        if row.lease_until is not None:
            row.lease_until = row.created_at


def _check_sent_once_after_the_lease(
    runtime: Runtime, article_id: int, smtp_submission: SubmissionServer, customer_inbox: Inbox
) -> None:
    """The dead sender's lease runs out: the next pass finds the mail already sent and sends it no more."""
    _make_due(runtime, article_id)
    report = send_due(runtime)
    assert (report.already_sent, report.sent) == (1, 0)
    assert len(smtp_submission.accepted) == 1
    assert len(customer_inbox()) == 1
    assert delivery_of(runtime, article_id).status is DeliveryStatus.SENT


def test_a_reply_reaches_the_customer_threaded_under_their_message(
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    mailbox_user: str,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
    channel_id: int,
    customer_inbox: Inbox,
) -> None:
    article_id = queue_draft(
        m365_runtime,
        ticket_number,
        Draft(
            kind="reply",
            body_text="We sent a technician.",
            attachments=(UploadedFile("plan.pdf", b"%PDF-1.4 plan"),),
        ),
    )
    report = send_due(m365_runtime)
    assert (report.sent, report.failed, report.retrying) == (1, 0, 0), report.problems
    [reply] = customer_inbox()
    assert reply["In-Reply-To"] == "<question-1@fabrikam.onmicrosoft.com>"
    assert "<question-1@fabrikam.onmicrosoft.com>" in reply["References"]
    assert reply["Subject"] == f"Re: [Ticket#{ticket_number}] Printer on fire"
    assert reply["From"].addresses[0].addr_spec == mailbox_user
    assert reply["Message-ID"] == delivery_of(m365_runtime, article_id).message_id
    body = reply.get_body(preferencelist=("plain",))
    assert body is not None and "We sent a technician." in body.get_content()
    assert "> Hello, my printer is on fire." in body.get_content()
    assert [part.get_filename() for part in reply.iter_attachments()] == ["plan.pdf"]
    delivery = delivery_of(m365_runtime, article_id)
    assert (
        delivery.status is DeliveryStatus.SENT
        and delivery.server_reply
        and delivery.server_reply.startswith("250")
    )
    # The customer answers the reply: it lands on the same ticket.
    ticket = receive_mail(
        m365_runtime,
        dovecot,
        channel_id,
        mailbox_user,
        sender=customer,
        subject=str(reply["Subject"]),
        in_reply_to=reply["Message-ID"],
    )
    with m365_runtime.sessions() as session:
        count = len(session.scalars(select(Article).where(Article.ticket_id == ticket.id)).all())
    assert count == 3


def test_busy_server_then_success_delivers_exactly_once(
    m365_runtime: Runtime, ticket_number: int, customer_inbox: Inbox, smtp_submission: SubmissionServer
) -> None:
    smtp_submission.fail_next(*SERVER_BUSY)
    smtp_submission.fail_next("connect", 421, "4.3.2 Service not available, closing transmission channel")
    article_id = queue_draft(m365_runtime, ticket_number, Draft(kind="reply", body_text="On it."))
    first = send_due(m365_runtime)
    assert (first.sent, first.retrying) == (0, 1)
    waiting = delivery_of(m365_runtime, article_id)
    assert waiting.status is DeliveryStatus.QUEUED
    assert waiting.server_reply is not None and waiting.server_reply.startswith("421")
    assert "tries again" in (waiting.last_error or "")
    assert send_due(m365_runtime).sent == 0  # the backoff is respected
    _make_due(m365_runtime, article_id)
    assert send_due(m365_runtime).retrying == 1  # 451 after the data
    _make_due(m365_runtime, article_id)
    assert send_due(m365_runtime).sent == 1
    assert len(customer_inbox()) == 1
    assert len(smtp_submission.accepted) == 1
    assert delivery_of(m365_runtime, article_id).attempts == 3


def test_a_permanent_refusal_stops_and_says_what_to_do(
    m365_runtime: Runtime,
    ticket_number: int,
    customer_inbox: Inbox,
    smtp_submission: SubmissionServer,
    mailbox_user: str,
    channel_id: int,
) -> None:
    smtp_submission.set_smtp_auth_disabled(mailbox_user, True)
    article_id = queue_draft(m365_runtime, ticket_number, Draft(kind="reply", body_text="On it."))
    report = send_due(m365_runtime)
    assert report.failed == 1
    failed = delivery_of(m365_runtime, article_id)
    assert failed.status is DeliveryStatus.FAILED
    assert failed.server_reply is not None and failed.server_reply.startswith("535 5.7.139")
    assert "Authenticated SMTP" in (failed.last_error or "")
    with m365_runtime.sessions() as session:
        channel = session.get(Channel, channel_id)
        assert channel is not None and "Authenticated SMTP" in (channel.last_error or "")
        assert session.scalars(select(ChannelEvent).where(ChannelEvent.kind == "send_failed")).first()
    # Nothing more happens until a person retries after fixing it.
    assert send_due(m365_runtime, include_waiting=True).sent == 0
    smtp_submission.set_smtp_auth_disabled(mailbox_user, False)
    with transaction(m365_runtime.sessions) as session:
        row = session.get(OutboundMessage, failed.id)
        assert row is not None
        sender_module.retry_delivery(session, row)
    assert send_due(m365_runtime).sent == 1
    assert len(customer_inbox()) == 1


def test_sending_as_an_address_the_mailbox_may_not_use_is_explained(
    m365_runtime: Runtime, ticket_number: int, smtp_submission: SubmissionServer, channel_id: int
) -> None:
    with transaction(m365_runtime.sessions) as session:
        channel = session.get(Channel, channel_id)
        assert channel is not None
        channel.email = "sales@contoso.onmicrosoft.com"  # as if it were a shared mailbox without Send As
    article_id = queue_draft(m365_runtime, ticket_number, Draft(kind="reply", body_text="On it."))
    assert send_due(m365_runtime).failed == 1
    failed = delivery_of(m365_runtime, article_id)
    assert "SendAsDenied" in (failed.server_reply or "")
    assert "Send as" in (failed.last_error or "")


def test_a_crash_after_the_server_accepted_never_sends_twice(
    m365_runtime: Runtime,
    ticket_number: int,
    customer_inbox: Inbox,
    smtp_submission: SubmissionServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    article_id = queue_draft(m365_runtime, ticket_number, Draft(kind="reply", body_text="On it."))

    def die(*_args: object, **_kwargs: object) -> None:
        raise SystemExit("killed between the server's 250 and the bookkeeping")

    with monkeypatch.context() as patch:
        patch.setattr(sender_module._ChannelRun, "_record_sent", die)
        with pytest.raises(SystemExit):
            send_due(m365_runtime)
    assert len(smtp_submission.accepted) == 1
    stuck = delivery_of(m365_runtime, article_id)
    assert stuck.status is DeliveryStatus.SENDING
    assert send_due(m365_runtime, include_waiting=True).sent == 0  # its lease still runs
    _check_sent_once_after_the_lease(m365_runtime, article_id, smtp_submission, customer_inbox)


def test_an_interrupted_attempt_that_never_reached_the_server_is_sent_again(
    m365_runtime: Runtime, ticket_number: int, customer_inbox: Inbox, smtp_submission: SubmissionServer
) -> None:
    article_id = queue_draft(m365_runtime, ticket_number, Draft(kind="reply", body_text="On it."))
    with changing_delivery(m365_runtime, article_id) as row:  # claimed by a sender that died before sending
        row.status = DeliveryStatus.SENDING
        row.lease_until = row.created_at
    report = send_due(m365_runtime)
    assert (report.sent, report.already_sent) == (1, 0)
    assert len(customer_inbox()) == 1


def test_a_retry_sends_the_same_bytes_and_message_id(
    m365_runtime: Runtime, ticket_number: int, smtp_submission: SubmissionServer
) -> None:
    smtp_submission.fail_next(*SERVER_BUSY)
    article_id = queue_draft(m365_runtime, ticket_number, Draft(kind="reply", body_text="Same bytes."))
    send_due(m365_runtime)
    _make_due(m365_runtime, article_id)
    send_due(m365_runtime)
    [accepted] = smtp_submission.accepted
    row = delivery_of(m365_runtime, article_id)
    assert row.message_id.encode() in accepted.raw
    assert len(accepted.raw) == row.size


def test_reply_all_copies_the_other_people_but_never_the_desk(
    m365_runtime: Runtime,
    channel_id: int,
    dovecot: DovecotServer,
    mailbox_user: str,
    customer: str,
    colleague: str,
    smtp_submission: SubmissionServer,
) -> None:
    ticket = receive_mail(
        m365_runtime,
        dovecot,
        channel_id,
        mailbox_user,
        sender=customer,
        subject="Team question",
        extra_headers={"Cc": f"{colleague}, {mailbox_user}"},
    )
    queue_draft(m365_runtime, ticket.number, Draft(kind="reply_all", body_text="Both of you."))
    assert send_due(m365_runtime).sent == 1
    [accepted] = smtp_submission.accepted
    assert sorted(accepted.rcpt_tos) == sorted([customer, colleague])
    assert len(inbox(dovecot, colleague)) == 1


def test_drafts_that_cannot_go_out_are_refused_with_a_reason(
    m365_runtime: Runtime, ticket_number: int
) -> None:
    cases = [
        (Draft(kind="reply", body_text="  "), "empty"),
        (Draft(kind="reply", body_text="Hi", to=("not an address",)), "not an email address"),
        (Draft(kind="forward", body_text="FYI"), "Say who"),
        (Draft(kind="reply", body_text="Hi", article_id=999_999), "not a message of ticket"),
    ]
    for draft, words in cases:
        with pytest.raises(DraftError, match=words):
            queue_draft(m365_runtime, ticket_number, draft)
    with m365_runtime.sessions() as session:
        assert session.scalars(select(OutboundMessage)).all() == []
        [ticket] = session.scalars(select(Ticket)).all()
        assert len(ticket.articles) == 1


def test_the_command_line_replies_lists_and_flushes(
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    customer_inbox: Inbox,
    smtp_submission: SubmissionServer,
    tmp_path: Path,
) -> None:
    body = tmp_path / "reply.txt"
    body.write_text("Fixed from the shell.\n", encoding="utf-8")
    report = tmp_path / "report.csv"
    report.write_bytes(b"a,b\n1,2\n")
    queued = run_postdesk(
        m365_runtime.settings,
        *("ticket", "reply", str(ticket_number), "--body-file", str(body)),
        *("--attach", str(report), "--queue-only", "--json"),
    )
    assert queued.returncode == 0, queued.stderr
    entry = json.loads(queued.stdout)
    assert entry["status"] == "queued" and entry["recipients"] == [customer]
    listed = run_postdesk(m365_runtime.settings, "outbox", "list", "--json")
    assert [row["status"] for row in json.loads(listed.stdout)] == ["queued"]
    smtp_submission.fail_next(*SERVER_BUSY)
    busy = run_postdesk(m365_runtime.settings, "outbox", "flush", "--json")
    assert busy.returncode == 1 and json.loads(busy.stdout)["retrying"] == 1
    flushed = run_postdesk(m365_runtime.settings, "outbox", "flush", "--json")  # waiting retries go now too
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert json.loads(flushed.stdout)["sent"] == 1
    [reply] = customer_inbox()
    assert [part.get_filename() for part in reply.iter_attachments()] == ["report.csv"]
    [row] = json.loads(run_postdesk(m365_runtime.settings, "outbox", "list", "--json").stdout)
    assert row["status"] == "sent" and row["attempts"] == 2 and row["ticket"] == ticket_number
    missing = run_postdesk(m365_runtime.settings, "ticket", "reply", "99999", "--body-file", str(body))
    assert missing.returncode == 1 and "no ticket #99999" in missing.stderr


def test_replies_carry_the_configured_sender_name(
    m365_runtime: Runtime, ticket_number: int, customer_inbox: Inbox, channel_id: int
) -> None:
    with transaction(m365_runtime.sessions) as session:
        channel = session.get(Channel, channel_id)
        assert channel is not None
        channel.sender_name = "Contoso Support, Team B"
    queue_draft(m365_runtime, ticket_number, Draft(kind="reply", body_text="Hi"))
    assert send_due(m365_runtime).sent == 1
    [reply] = customer_inbox()
    [sender] = reply["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Contoso Support, Team B", channel.email)


def test_kill_9_after_the_server_took_the_message_never_sends_twice(
    m365_runtime: Runtime, ticket_number: int, customer_inbox: Inbox, smtp_submission: SubmissionServer
) -> None:
    article_id = queue_draft(m365_runtime, ticket_number, Draft(kind="reply", body_text="Exactly once."))
    smtp_submission.hold_answers()  # the server takes the message but has not said 250 yet
    process = start_postdesk(m365_runtime.settings, "outbox", "flush")
    try:
        deadline = time.monotonic() + 60
        while not smtp_submission.accepted and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert smtp_submission.accepted, "the flush never reached the server"
    finally:
        process.kill()
        process.wait()
        smtp_submission.release_answers()
    assert delivery_of(m365_runtime, article_id).status is DeliveryStatus.SENDING
    _check_sent_once_after_the_lease(m365_runtime, article_id, smtp_submission, customer_inbox)


def test_a_connection_broken_mid_message_is_checked_before_sending_again(
    m365_runtime: Runtime, ticket_number: int, customer_inbox: Inbox, smtp_submission: SubmissionServer
) -> None:
    class BrokenAfterData(SmtpSubmission):
        def send(self, mail_from: str, recipients: list[str], raw: bytes) -> str:
            raise OutcomeUnknown("the connection to the SMTP server broke while it was receiving the message")

    article_id = queue_draft(m365_runtime, ticket_number, Draft(kind="reply", body_text="Maybe sent."))
    broken = send_due(
        m365_runtime,
        submission=lambda runtime: BrokenAfterData(
            runtime.settings.microsoft_smtp or "", ssl_context=_tls(runtime)
        ),
    )
    assert broken.retrying == 1
    held = delivery_of(m365_runtime, article_id)
    assert held.status is DeliveryStatus.SENDING and "Checking whether it went out" in (held.last_error or "")
    assert send_due(m365_runtime, include_waiting=True).sent == 0  # not blind: it waits to look first
    _make_due(m365_runtime, article_id)
    report = send_due(m365_runtime)  # not in Sent Items, so it really did not go out: send it
    assert (report.already_sent, report.sent) == (0, 1)
    assert len(customer_inbox()) == 1


def _tls(runtime: Runtime) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(runtime.settings.ca_bundle))


def test_a_server_that_wants_the_token_after_a_challenge_gets_it_there(
    m365_runtime: Runtime, ticket_number: int, customer_inbox: Inbox, smtp_submission: SubmissionServer
) -> None:
    smtp_submission.challenge_only = True  # like Dovecot's submission service: "500 5.5.2 Line too long"
    queue_draft(m365_runtime, ticket_number, Draft(kind="reply", body_text="Via the challenge."))
    assert send_due(m365_runtime).sent == 1
    assert len(customer_inbox()) == 1


def test_metrics_report_the_outbox_and_token_refreshes(
    m365_runtime: Runtime,
    ticket_number: int,
    channel_id: int,
    smtp_submission: SubmissionServer,
    desk: TestClient,
) -> None:
    smtp_submission.fail_next(*SERVER_BUSY)
    queue_draft(m365_runtime, ticket_number, Draft(kind="reply", body_text="Counted."))
    send_due(m365_runtime)
    desk.cookies.clear()  # scraped without a login
    waiting = desk.get("/metrics").text
    assert 'postdesk_outbox_messages{status="queued"} 1' in waiting
    assert "postdesk_outbox_oldest_waiting_seconds 0\n" not in waiting
    assert f'postdesk_channel_token_refreshes_total{{channel_id="{channel_id}"}}' in waiting
    send_due(m365_runtime, include_waiting=True)
    sent = desk.get("/metrics").text
    assert 'postdesk_outbox_messages{status="sent"} 1' in sent
    assert 'postdesk_outbox_messages{status="queued"} 0' in sent
    assert "postdesk_outbox_oldest_waiting_seconds 0\n" in sent
