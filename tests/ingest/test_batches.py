"""Processing stored mail in batches gives what processing it one message at a time would give.

The pipeline decides a whole batch with one lookup per kind and writes it with multi-row INSERTs, so a
batch must still see its own messages: a reply fetched together with its question, a second copy of a
message, a customer who writes twice. Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from postdesk.db.models import (
    Article,
    Channel,
    Customer,
    InboundMessage,
    InboundStatus,
    Ticket,
    TicketState,
)
from postdesk.db.session import transaction
from postdesk.ingest import pipeline, process
from postdesk.ingest.process import StoredRow, process_rows, process_stored
from postdesk.mail import Classification, ParsedMail, classify
from postdesk.runtime import Runtime
from postdesk.storage import store_many
from postdesk.tickets.service import change_state, next_ticket_number, next_ticket_numbers
from tests.support.mailfactory import customer_mail

DESK = "help@contoso.example"
_uids = iter(range(1, 1_000_000))


@pytest.fixture
def channel_id(db_runtime: Runtime) -> int:
    with transaction(db_runtime.sessions) as session:
        channel = Channel(email=DESK)
        session.add(channel)
        session.flush()
        return channel.id


@pytest.fixture(params=[200, 1], ids=["one-batch", "batches-of-one"])
def batch_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The same outcome whether the messages share a batch or each has its own."""
    monkeypatch.setattr(process, "PROCESS_BATCH", request.param)
    yield request.param


def stored(runtime: Runtime, channel_id: int, *messages: bytes) -> list[StoredRow]:
    """Spool the messages and add their inbound rows, as a fetch does."""
    digests = store_many(runtime.settings.spool_dir, list(messages))
    uids = [next(_uids) for _ in messages]
    rows = [
        {
            "channel_id": channel_id,
            "folder": "INBOX",
            "uidvalidity": 1,
            "uid": uid,
            "sha256": digest,
            "size": len(raw),
            "status": InboundStatus.STORED,
        }
        for raw, digest, uid in zip(messages, digests, uids, strict=True)
    ]
    with transaction(runtime.sessions) as session:
        inserted = session.execute(
            insert(InboundMessage).returning(InboundMessage.uid, InboundMessage.id), rows
        )
        ids = {uid: row_id for uid, row_id in inserted}
    return [StoredRow(ids[uid], len(raw)) for uid, raw in zip(uids, messages, strict=True)]


def mail(subject: str, **fields: Any) -> bytes:
    return customer_mail(to=DESK, subject=subject, **fields)


def inbound_rows(runtime: Runtime) -> list[InboundMessage]:
    with runtime.sessions() as session:
        return list(session.scalars(select(InboundMessage).order_by(InboundMessage.id)))


def tickets(runtime: Runtime) -> list[tuple[int, str, int]]:
    """(number, title, articles) of each ticket."""
    with runtime.sessions() as session:
        rows = session.execute(
            select(Ticket.number, Ticket.title, func.count(Article.id))
            .join(Article, Article.ticket_id == Ticket.id)
            .group_by(Ticket.id)
            .order_by(Ticket.number)
        )
        return [(number, title, count) for number, title, count in rows]


def test_a_reply_in_the_same_batch_as_its_question_joins_its_ticket(
    db_runtime: Runtime, channel_id: int, batch_size: int
) -> None:
    rows = stored(
        db_runtime,
        channel_id,
        mail("Invoice", message_id="<q@example.org>"),
        mail("Re: Invoice", message_id="<a@example.org>", in_reply_to="<q@example.org>"),
        mail("Re: Re: Invoice", in_reply_to="<a@example.org>"),
    )
    counts = process_rows(db_runtime, rows)
    assert (counts.tickets, counts.follow_ups) == (1, 2)
    assert [(title, articles) for _, title, articles in tickets(db_runtime)] == [("Invoice", 3)]
    with db_runtime.sessions() as session:
        ticket = session.scalars(select(Ticket)).one()
        assert [a.subject for a in ticket.articles] == ["Invoice", "Re: Invoice", "Re: Re: Invoice"]


def test_a_second_copy_in_the_same_batch_is_a_duplicate_of_the_first_article(
    db_runtime: Runtime, channel_id: int, batch_size: int
) -> None:
    rows = stored(
        db_runtime,
        channel_id,
        mail("Printer", message_id="<same@example.org>"),
        mail("Printer (resent)", message_id="<same@example.org>"),
    )
    counts = process_rows(db_runtime, rows)
    assert (counts.tickets, counts.duplicates) == (1, 1)
    first, second = inbound_rows(db_runtime)
    assert second.status is InboundStatus.DUPLICATE and second.article_id == first.article_id
    assert second.reason == f"already stored as article {first.article_id} (same Message-ID)"


def test_a_customer_writing_twice_in_one_batch_is_one_customer_with_two_tickets(
    db_runtime: Runtime, channel_id: int, batch_size: int
) -> None:
    rows = stored(
        db_runtime,
        channel_id,
        mail("First", sender="jana.novak@example.org"),
        mail("Second", sender="Jana Novák <Jana.Novak@Example.org>"),
    )
    process_rows(db_runtime, rows)
    with db_runtime.sessions() as session:
        [customer] = session.scalars(select(Customer)).all()
        assert (customer.email, customer.display_name) == ("jana.novak@example.org", "Jana Novák")
        assert session.scalars(select(Ticket.customer_id)).all() == [customer.id, customer.id]


def test_tickets_of_one_batch_get_consecutive_numbers_after_the_last_one(
    db_runtime: Runtime, channel_id: int
) -> None:
    with transaction(db_runtime.sessions) as session:
        before = next_ticket_number(session)
    process_rows(db_runtime, stored(db_runtime, channel_id, *(mail(f"Question {n}") for n in range(5))))
    assert [number for number, _, _ in tickets(db_runtime)] == list(range(before + 1, before + 6))
    with transaction(db_runtime.sessions) as session:
        assert list(next_ticket_numbers(session, 3)) == list(range(before + 6, before + 9))


def test_a_reply_naming_a_closed_ticket_reopens_it_but_an_auto_reply_does_not(
    db_runtime: Runtime, channel_id: int
) -> None:
    process_rows(db_runtime, stored(db_runtime, channel_id, mail("Broken login")))
    [(number, _, _)] = tickets(db_runtime)
    with transaction(db_runtime.sessions) as session:
        session.scalars(select(Ticket)).one().state = TicketState.CLOSED
    out_of_office = mail(
        f"Out of Office: [Ticket#{number}]", extra_headers={"Auto-Submitted": "auto-replied"}
    )
    process_rows(db_runtime, stored(db_runtime, channel_id, out_of_office))
    with db_runtime.sessions() as session:
        assert session.scalars(select(Ticket.state)).one() is TicketState.CLOSED
    counts = process_rows(
        db_runtime, stored(db_runtime, channel_id, mail(f"Re: [Ticket#{number}] still broken"))
    )
    assert counts.follow_ups == 1
    with db_runtime.sessions() as session:
        ticket = session.scalars(select(Ticket)).one()
        assert (ticket.state, ticket.closed_at, len(ticket.articles)) == (TicketState.OPEN, None, 3)


def test_a_reply_to_a_ticket_waiting_for_a_reminder_opens_it_and_drops_the_reminder(
    db_runtime: Runtime, channel_id: int
) -> None:
    question = mail("Refund", message_id="<refund@example.org>")
    process_rows(db_runtime, stored(db_runtime, channel_id, question))
    with transaction(db_runtime.sessions) as session:
        change_state(session.scalars(select(Ticket)).one(), TicketState.PENDING_REMINDER)
    reply = mail("Re: Refund", in_reply_to="<refund@example.org>")
    assert process_rows(db_runtime, stored(db_runtime, channel_id, reply)).follow_ups == 1
    with db_runtime.sessions() as session:
        ticket = session.scalars(select(Ticket)).one()
        assert (ticket.state, ticket.pending_until) == (TicketState.OPEN, None)


def test_processed_rows_record_the_subject_sender_and_message_id(
    db_runtime: Runtime, channel_id: int
) -> None:
    process_rows(
        db_runtime,
        stored(db_runtime, channel_id, mail("Where is my parcel?", message_id="<parcel@example.org>")),
    )
    [row] = inbound_rows(db_runtime)
    assert (row.status, row.subject, row.message_id) == (
        InboundStatus.PROCESSED,
        "Where is my parcel?",
        "<parcel@example.org>",
    )
    assert row.sender == "Jana Novák <jana.novak@example.org>"


def test_a_message_over_the_limit_is_quarantined_with_its_subject_read_from_the_header(
    db_runtime: Runtime, channel_id: int
) -> None:
    with transaction(db_runtime.sessions) as session:
        session.get_one(Channel, channel_id).max_message_bytes = 1000
    process_rows(db_runtime, stored(db_runtime, channel_id, mail("Scan", body="x" * 5000)))
    [row] = inbound_rows(db_runtime)
    assert row.status is InboundStatus.QUARANTINED and "over this mailbox's limit" in (row.reason or "")
    assert (row.subject, row.sender) == ("Scan", "Jana Novák <jana.novak@example.org>")


def test_a_message_that_breaks_the_pipeline_is_quarantined_and_the_rest_of_its_batch_processed(
    db_runtime: Runtime, channel_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def classify_or_fail(mail: ParsedMail, **kwargs: Any) -> Classification:
        if mail.subject == "Trouble":
            raise ValueError("surprise")
        return classify(mail, **kwargs)

    monkeypatch.setattr(pipeline, "classify", classify_or_fail)
    counts = process_rows(
        db_runtime, stored(db_runtime, channel_id, mail("Fine"), mail("Trouble"), mail("Also fine"))
    )
    assert (counts.tickets, counts.quarantined) == (2, 1)
    statuses = [(row.subject, row.status) for row in inbound_rows(db_runtime)]
    assert statuses == [
        ("Fine", InboundStatus.PROCESSED),
        ("Trouble", InboundStatus.QUARANTINED),
        ("Also fine", InboundStatus.PROCESSED),
    ]
    assert "ValueError: surprise" in (inbound_rows(db_runtime)[1].reason or "")


def test_rows_already_processed_are_left_alone(db_runtime: Runtime, channel_id: int) -> None:
    rows = stored(db_runtime, channel_id, mail("Once"))
    process_rows(db_runtime, rows)
    assert process_rows(db_runtime, rows).tickets == 0
    assert process_stored(db_runtime).tickets == 0
    assert len(tickets(db_runtime)) == 1
