"""Outbound throughput: 1,000 replies flushed through the test SMTP server, next to a plain smtplib loop.

Both send the same 1,000 composed messages (the bytes Postdesk queued) to the same submission server
(STARTTLS, SASL XOAUTH2, each message also filed into the mailbox's Sent Items in Dovecot) in the same
run. The baseline holds the messages in memory and sends them over one connection with stdlib smtplib;
Postdesk runs ``send_due`` passes as its worker does, which also claim each row with a conditional
UPDATE, read the spooled bytes and commit every outcome as the server answers. Every message must
arrive exactly once. Target: Postdesk reaches at least half of the baseline's messages per second.
"""

from __future__ import annotations

import base64
import collections
import gc
import smtplib
import ssl
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32

from sqlalchemy import func, insert, select
from tests.support.dovecot import access_token_for, xoauth2_payload

from bench import ratio
from bench.desk import bench_desk
from postdesk.db.models import Article, Customer, DeliveryStatus, Direction, OutboundMessage, Ticket
from postdesk.db.session import transaction
from postdesk.outbox.queue import Draft, queue_reply
from postdesk.outbox.sender import send_due
from postdesk.runtime import Runtime
from postdesk.sandbox.submission import SMTP_SCOPE, AcceptedMessage, SubmissionServer
from postdesk.storage import read_bytes
from postdesk.tickets.service import next_ticket_numbers

TARGET_RATIO = 0.5
# What one worker pass claims (send_due's default): 1,000 replies take five passes, five connections.
PASS_LIMIT = 200
REPLY = (
    "Hello Jana,\n\nthank you for your patience. We corrected the VAT number and the delivery address; "
    "the new invoice is attached to your account.\n\nKind regards,\nContoso support\n"
)


@dataclass(frozen=True)
class Queued:
    """One composed reply as the outbox holds it."""

    message_id: str
    mail_from: str
    recipients: list[str]
    raw: bytes


def _open_tickets(runtime: Runtime, channel_id: int, count: int) -> None:
    """``count`` tickets, each opened by one customer's mail to the channel (Core INSERTs, like a desk)."""
    now = datetime.now(UTC)
    with transaction(runtime.sessions) as session:
        numbers = next_ticket_numbers(session, count)
        session.execute(
            insert(Customer),
            [{"id": n, "email": f"customer{n}@example.org", "created_at": now} for n in range(1, count + 1)],
        )
        session.execute(
            insert(Ticket),
            [
                {
                    "id": n,
                    "number": number,
                    "title": f"Invoice question {n}",
                    "customer_id": n,
                    "channel_id": channel_id,
                    "created_at": now,
                    "updated_at": now,
                }
                for n, number in enumerate(numbers, start=1)
            ],
        )
        session.execute(
            insert(Article),
            [
                {
                    "ticket_id": n,
                    "direction": Direction.INBOUND.value,
                    "sender": f"Customer {n} <customer{n}@example.org>",
                    "subject": f"Invoice question {n}",
                    "body_text": "Our invoice shows the wrong VAT number.",
                    "message_id": f"<question-{n}@example.org>",
                    "channel_id": channel_id,
                    "created_at": now,
                }
                for n in range(1, count + 1)
            ],
        )


def _queue_replies(runtime: Runtime) -> list[Queued]:
    with transaction(runtime.sessions) as session:
        for ticket in session.scalars(select(Ticket).order_by(Ticket.id)):
            queue_reply(session, runtime.settings, ticket, Draft(kind="reply", body_text=REPLY), author=None)
    with runtime.sessions() as session:
        rows = session.scalars(select(OutboundMessage).order_by(OutboundMessage.id)).all()
        return [
            Queued(
                row.message_id,
                row.mail_from,
                row.recipients.split("\n"),
                read_bytes(runtime.settings.spool_dir, row.sha256),
            )
            for row in rows
        ]


def _baseline(submission: SubmissionServer, token: str, upn: str, messages: list[Queued]) -> float:
    context = ssl.create_default_context(cafile=str(submission.ca_path))
    gc.collect()
    started = time.perf_counter()
    smtp = smtplib.SMTP(submission.host, submission.port)
    smtp.ehlo()
    smtp.starttls(context=context)
    smtp.ehlo()
    code, reply = smtp.docmd("AUTH", "XOAUTH2 " + base64.b64encode(xoauth2_payload(upn, token)).decode())
    if code != 235:
        raise SystemExit(f"baseline could not sign in: {code} {reply!r}")
    for message in messages:
        smtp.sendmail(message.mail_from, message.recipients, message.raw)
    smtp.quit()
    return time.perf_counter() - started


def _flush_outbox(runtime: Runtime, count: int) -> float:
    """Run send passes until ``count`` replies are sent; the seconds it took."""
    gc.collect()
    sent = 0
    started = time.perf_counter()
    while sent < count:
        report = send_due(runtime, limit=PASS_LIMIT)
        if report.failed or report.retrying or not report.sent:
            raise SystemExit(f"bench run invalid: {report.summary()}; {report.problems}")
        sent += report.sent
    return time.perf_counter() - started


def _check_exactly_once(accepted: list[AcceptedMessage], messages: list[Queued], who: str) -> None:
    parser = BytesHeaderParser(policy=compat32)
    counts = collections.Counter(str(parser.parsebytes(m.raw)["Message-ID"]).strip() for m in accepted)
    expected = collections.Counter(message.message_id for message in messages)
    if counts != expected:
        missing = sum((expected - counts).values())
        extra = sum((counts - expected).values())
        raise SystemExit(f"bench run invalid: {who} left {missing} messages missing and {extra} extra")


def run(messages: int = 1000) -> list[ratio.Row]:
    with bench_desk(smtp=True) as desk:
        submission = desk.submission
        assert submission is not None
        [upn] = desk.add_mailboxes(1, prefix="outbound")
        channel_id = desk.connect([upn])[upn]
        _open_tickets(desk.runtime, channel_id, messages)
        queued = _queue_replies(desk.runtime)
        app = desk.directory.register_app(display_name="baseline")
        token = access_token_for(desk.directory, app, upn, scope=SMTP_SCOPE)
        baseline_seconds = _baseline(submission, token, upn, queued)
        _check_exactly_once(submission.accepted, queued, "the baseline")
        before = len(submission.accepted)
        postdesk_seconds = _flush_outbox(desk.runtime, messages)
        _check_exactly_once(submission.accepted[before:], queued, "Postdesk")
        with desk.runtime.sessions() as session:
            sent = session.scalar(
                select(func.count())
                .select_from(OutboundMessage)
                .where(OutboundMessage.status == DeliveryStatus.SENT)
            )
        if len(queued) != messages or sent != messages:
            raise SystemExit(f"bench run invalid: {len(queued)} queued, {sent} marked sent")
    return [
        ratio.Row(
            f"SMTP send, {messages:,} replies, SQLite (msg/s)",
            messages / postdesk_seconds,
            messages / baseline_seconds,
            TARGET_RATIO,
        )
    ]


def print_table(rows: list[ratio.Row]) -> bool:
    return ratio.print_table(
        "Outbound: replies flushed through the test SMTP server (baseline: smtplib, one connection)", rows
    )


if __name__ == "__main__":
    sys.exit(0 if print_table(run()) else 1)
