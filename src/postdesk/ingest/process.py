"""Turning stored inbound rows into articles: one transaction per batch, idempotent by design.

Rows are read from the spool, the pipeline decides, and the articles, the ticket changes and the rows'
new status are committed together. If the process dies before that commit nothing happened and the
rows are processed again; after it, they are no longer ``stored`` and are never processed twice.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import DataError, SQLAlchemyError
from sqlalchemy.orm import Session, load_only

from postdesk.db.models import (
    Attachment,
    Channel,
    Direction,
    InboundMessage,
    InboundStatus,
    Ticket,
    TicketState,
)
from postdesk.db.types import utcnow
from postdesk.ingest.known import TicketRef
from postdesk.ingest.pipeline import (
    AttachTo,
    Decision,
    Duplicate,
    Inbound,
    NewTicket,
    Quarantine,
    decide_batch,
)
from postdesk.ingest.quickheaders import SummaryHeaders, summary_headers
from postdesk.mail import Address, ParsedMail
from postdesk.runtime import Runtime
from postdesk.storage import read_bytes, store_many
from postdesk.tickets.service import (
    NewArticle,
    TicketDraft,
    add_articles,
    change_state,
    create_tickets,
    get_or_create_customers,
)

log = logging.getLogger(__name__)
# Each batch is one transaction; if one message in it breaks the pipeline, the whole batch is redone
# a message at a time. As large as the fetch's: on PostgreSQL every batch costs a dozen round trips
# whatever its size (ingest went from 0.41 to 0.50 of the bench's baseline going from 50 to 200).
PROCESS_BATCH = 200
# A batch holds its messages in memory until it commits; a few huge ones make a batch of their own.
PROCESS_BATCH_BYTES = 32 * 1024 * 1024
_NOBODY = ("noreply", "no-reply", "donotreply", "do-not-reply", "mailer-daemon", "postmaster")
_REOPENED_BY_MAIL = (TicketState.CLOSED, TicketState.PENDING_REMINDER)


@dataclass
class ProcessCounts:
    tickets: int = 0
    follow_ups: int = 0
    duplicates: int = 0
    quarantined: int = 0

    def add(self, status: str) -> None:
        setattr(self, status, getattr(self, status) + 1)

    def merge(self, other: ProcessCounts) -> None:
        for name in ("tickets", "follow_ups", "duplicates", "quarantined"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class StoredRow:
    """An inbound row waiting to be processed; its size keeps batches within ``PROCESS_BATCH_BYTES``."""

    id: int
    size: int


def own_addresses(session: Session) -> frozenset[str]:
    return frozenset(email.lower() for email in session.scalars(select(Channel.email)))


def process_stored(
    runtime: Runtime,
    *,
    channel_id: int | None = None,
    limit: int = 10_000,
    spooled: Mapping[str, bytes] | None = None,
) -> ProcessCounts:
    """Process stored rows oldest first (``spooled``: see ``process_rows``)."""
    query = select(InboundMessage.id, InboundMessage.size).where(
        InboundMessage.status == InboundStatus.STORED
    )
    if channel_id is not None:
        query = query.where(InboundMessage.channel_id == channel_id)
    with runtime.sessions() as session:
        rows = [
            StoredRow(row_id, size)
            for row_id, size in session.execute(query.order_by(InboundMessage.id).limit(limit))
        ]
    return process_rows(runtime, rows, spooled=spooled)


def process_rows(
    runtime: Runtime, rows: Sequence[StoredRow], *, spooled: Mapping[str, bytes] | None = None
) -> ProcessCounts:
    """Process these stored rows in order, a batch per transaction.

    ``spooled`` holds raw bytes by SHA-256 that are already in memory (the fetch has just written them to
    the spool), so they need not be read back. A commit per message dominated the cost, hence batches.
    If anything in a batch fails, the batch is rolled back as a whole and redone one message per
    transaction, so that only the message at fault is quarantined.
    """
    counts = ProcessCounts()
    for batch in _batches(rows):
        try:
            counts.merge(_process_batch(runtime, batch, spooled or {}))
        except Exception as exc:
            if _database_trouble(exc):
                raise  # the database is the problem, not the mail: stop and retry the whole pass later
            for row_id in batch:
                counts.merge(_process_alone(runtime, row_id, spooled or {}))
    return counts


def _database_trouble(exc: Exception) -> bool:
    # A value the database refuses (too long for its column, a NUL in text) came from the mail and would
    # fail the same way on every retry, holding up every message behind it: that one is the mail's fault.
    return isinstance(exc, SQLAlchemyError) and not isinstance(exc, DataError)


def _batches(rows: Sequence[StoredRow]) -> Iterator[list[int]]:
    batch: list[int] = []
    size = 0
    for row in rows:
        if batch and (len(batch) >= PROCESS_BATCH or size + row.size > PROCESS_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(row.id)
        size += row.size
    if batch:
        yield batch


def _process_batch(runtime: Runtime, row_ids: list[int], spooled: Mapping[str, bytes]) -> ProcessCounts:
    with runtime.sessions() as session, session.begin():
        rows = session.execute(
            select(InboundMessage.id, InboundMessage.channel_id, InboundMessage.sha256, InboundMessage.size)
            .where(InboundMessage.id.in_(row_ids), InboundMessage.status == InboundStatus.STORED)
            .order_by(InboundMessage.id)
            .with_for_update()
        ).all()  # a row that is no longer stored was processed by another worker meanwhile
        if not rows:
            return ProcessCounts()
        own = own_addresses(session)
        channels = _channels(session, {row.channel_id for row in rows})
        inbounds = [
            Inbound(
                row_id=row.id,
                size=row.size,
                channel=channels[row.channel_id],
                raw=spooled.get(row.sha256) or read_bytes(runtime.settings.spool_dir, row.sha256),
                own_addresses=own,
                ticket_prefix=runtime.settings.ticket_prefix,
            )
            for row in rows
        ]
        return _write(session, runtime, decide_batch(session, inbounds))


def _channels(session: Session, channel_ids: set[int]) -> dict[int, Channel]:
    # Only what the pipeline reads: loading the whole row would decrypt its token cache every batch.
    query = (
        select(Channel)
        .where(Channel.id.in_(channel_ids))
        .options(load_only(Channel.email, Channel.group_id, Channel.max_message_bytes))
    )
    return {channel.id: channel for channel in session.scalars(query)}


def _process_alone(runtime: Runtime, row_id: int, spooled: Mapping[str, bytes]) -> ProcessCounts:
    counts = ProcessCounts()
    try:
        counts.merge(_process_batch(runtime, [row_id], spooled))
    except Exception as exc:
        if _database_trouble(exc):
            raise
        # A bug, a surprise or an unstorable value in the mail must not stop the queue: keep the mail,
        # say what happened.
        _log_failure(row_id, exc)
        _quarantine_after_failure(runtime, row_id, exc)
        counts.add("quarantined")
    return counts


def _log_failure(row_id: int, exc: Exception) -> None:
    if isinstance(exc, DataError):
        # The driver's words only: the statement's parameters would put the mail's text in the log.
        log.error("inbound message %s holds a value the database refuses: %s", row_id, exc.orig)
    else:
        log.exception("inbound message %s could not be processed", row_id)


def _quarantine_after_failure(runtime: Runtime, row_id: int, exc: Exception) -> None:
    with runtime.sessions() as session, session.begin():
        row = session.get(InboundMessage, row_id)
        if row is None or row.status is not InboundStatus.STORED:
            return
        row.status = InboundStatus.QUARANTINED
        row.reason = _storable(_failure_reason(exc)[:2000])
        row.processed_at = utcnow()
        try:
            summary = _storable_summary(summary_headers(read_bytes(runtime.settings.spool_dir, row.sha256)))
        except OSError:
            return  # the reason is what matters; the admin can still download the message
        row.message_id, row.subject, row.sender = summary.message_id, summary.subject, summary.sender


def _failure_reason(exc: Exception) -> str:
    if isinstance(exc, DataError):
        # The driver's own words name the problem; the statement and its parameters would repeat the mail.
        return f"Postdesk could not store it: the database refused one of its values ({exc.orig})"
    return f"Postdesk could not process it ({type(exc).__name__}: {exc})"


# NUL cannot be stored in PostgreSQL text, and a lone surrogate cannot be encoded for any database.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def _storable(text: str) -> str:
    return _UNSTORABLE.sub("", text)


def _storable_summary(summary: SummaryHeaders) -> SummaryHeaders:
    """The header fields of a message that was not parsed are raw; parse_message cleans the others."""
    message_id = _storable(summary.message_id) if summary.message_id else None
    return SummaryHeaders(message_id or None, _storable(summary.subject), _storable(summary.sender))


# --- writing a decided batch -----------------------------------------------------------------------


def _write(session: Session, runtime: Runtime, decisions: list[Decision]) -> ProcessCounts:
    """Write what the batch decided: customers, tickets, articles, attachments, then the rows' status."""
    now = utcnow()
    _open_tickets(session, [d for d in decisions if isinstance(d.outcome, NewTicket)], now)
    written = [(d, d.article, _new_article(d.inbound)) for d in decisions if d.article is not None]
    ids = add_articles(session, [(_ticket_id(ref.ticket), new) for _, ref, new in written], now=now)
    for (_, ref, new), article_id in zip(written, ids, strict=True):
        ref.id = article_id
        _touch(ref.ticket, new, now)
    # What the agents should know about how the mail was filed (a ticket number it was not let into).
    notes = [
        (_ticket_id(ref.ticket), _note(d.inbound.notes))
        for d, ref, _ in written
        if d.inbound.notes and isinstance(d.outcome, NewTicket)
    ]
    add_articles(session, notes, now=now)
    _store_attachments(session, runtime, [d for d, _, _ in written])
    _update_touched_tickets(session, [ref.ticket for _, ref, _ in written])
    session.execute(update(InboundMessage), [_finished_row(d, now) for d in decisions])
    counts = ProcessCounts()
    for decision in decisions:
        counts.add(_counter(decision))
    return counts


def _open_tickets(session: Session, decisions: list[Decision], now: datetime) -> None:
    if not decisions:
        return
    people = (_customer_address(_mail(decision)) for decision in decisions)
    # Customer.display_name holds 200 characters; a sender's name can be as long as a header.
    customers = get_or_create_customers(session, [(person.email, person.name[:200]) for person in people])
    drafts = [
        TicketDraft(
            title=_mail(decision).subject or "(no subject)",
            customer_id=customer_id,
            group_id=decision.inbound.channel.group_id,
            channel_id=decision.inbound.channel.id,
        )
        for decision, customer_id in zip(decisions, customers, strict=True)
    ]
    for decision, (ticket_id, number) in zip(
        decisions, create_tickets(session, drafts, now=now), strict=True
    ):
        assert decision.article is not None
        decision.article.ticket.id = ticket_id
        decision.article.ticket.number = number
        decision.article.ticket.updated_at = now


def _ticket_id(ticket: TicketRef) -> int:
    assert ticket.id is not None, "tickets are opened before their articles are written"
    return ticket.id


def _touch(ticket: TicketRef, article: NewArticle, now: datetime) -> None:
    ticket.updated_at = now
    if not article.auto_generated and ticket.state in _REOPENED_BY_MAIL:
        ticket.state = TicketState.OPEN
        ticket.reopened = True


def _update_touched_tickets(session: Session, tickets: list[TicketRef]) -> None:
    """Tickets that were already there: a reply moves them up the list and may reopen them."""
    touched = {id(ticket): ticket for ticket in tickets if not ticket.new}.values()
    for ticket in touched:
        if ticket.reopened:  # by the same rules as an agent reopening it
            change_state(session.get_one(Ticket, ticket.id), TicketState.OPEN)
    moved = [{"id": ticket.id, "updated_at": ticket.updated_at} for ticket in touched if not ticket.reopened]
    if moved:
        session.execute(update(Ticket), moved)


def _store_attachments(session: Session, runtime: Runtime, decisions: list[Decision]) -> None:
    parts = [
        (decision.article.id, part)
        for decision in decisions
        if decision.article is not None
        for part in _mail(decision).attachments
    ]
    if not parts:
        return
    digests = store_many(runtime.settings.attachments_dir, [part.content for _, part in parts])
    session.execute(
        insert(Attachment),
        [
            {
                "article_id": article_id,
                "filename": part.filename,
                "content_type": part.content_type,
                "size": len(part.content),
                "sha256": digest,
                "content_id": part.content_id,
                "inline": part.inline,
            }
            for (article_id, part), digest in zip(parts, digests, strict=True)
        ],
    )


def _note(notes: list[str]) -> NewArticle:
    text = "\n".join(f"Postdesk: {note[0].upper()}{note[1:]}." for note in notes)
    return NewArticle(direction=Direction.OUTBOUND, internal=True, sender="Postdesk", body_text=text)


def _finished_row(decision: Decision, now: datetime) -> dict[str, Any]:
    outcome = decision.outcome
    article_id = decision.article.id if decision.article is not None else None
    if isinstance(outcome, Quarantine):
        status, reason = InboundStatus.QUARANTINED, outcome.reason
    elif isinstance(outcome, Duplicate):
        status, reason, article_id = InboundStatus.DUPLICATE, outcome.reason, outcome.article.id
    elif isinstance(outcome, AttachTo):
        status, reason = InboundStatus.PROCESSED, outcome.reason
    else:
        assert decision.article is not None
        status, reason = InboundStatus.PROCESSED, f"opened ticket {decision.article.ticket.number}"
    summary = _summary(decision.inbound)
    return {
        "id": decision.inbound.row_id,
        "status": status,
        "reason": reason,
        "article_id": article_id,
        "processed_at": now,
        "message_id": summary.message_id,
        "subject": summary.subject,
        "sender": summary.sender,
    }


def _summary(inbound: Inbound) -> SummaryHeaders:
    """What the quarantine list shows: from the parsed message, or from the header alone if unparsed."""
    mail = inbound.mail
    if mail is None:
        return _storable_summary(summary_headers(inbound.raw))
    return SummaryHeaders(
        message_id=mail.message_id[:998] if mail.message_id else None,
        subject=mail.subject[:500],
        sender=_format((mail.sender,))[:500] if mail.sender else "",
    )


def _counter(decision: Decision) -> str:
    outcome = decision.outcome
    if isinstance(outcome, Quarantine):
        return "quarantined"
    if isinstance(outcome, Duplicate):
        return "duplicates"
    return "follow_ups" if isinstance(outcome, AttachTo) else "tickets"


# --- what an inbound article says ------------------------------------------------------------------


def _mail(decision: Decision) -> ParsedMail:
    mail = decision.inbound.mail
    assert mail is not None, "only parsed mail becomes an article"
    return mail


def _customer_address(mail: ParsedMail) -> Address:
    """Reply-To wins when it names one person (not a list or a no-reply robot); else From."""
    if len(mail.reply_to) == 1 and not mail.reply_to[0].email.split("@")[0].lower().startswith(_NOBODY):
        return mail.reply_to[0]
    if mail.sender is not None:
        return mail.sender
    return Address(name="", email="unknown-sender@invalid")


def _format(addresses: tuple[Address, ...]) -> str:
    return ", ".join(f"{a.name} <{a.email}>" if a.name else a.email for a in addresses)


def _new_article(inbound: Inbound) -> NewArticle:
    mail = inbound.mail
    assert mail is not None
    classification = inbound.classification
    flagged = classification is not None and (
        classification.auto_reply or classification.bulk or classification.bounce
    )
    article = NewArticle(
        direction=Direction.INBOUND,
        body_text=mail.body_text,
        body_html=mail.body_html,
        sender=_format((mail.sender,)) if mail.sender else "",
        subject=mail.subject,
        to_addresses=_format(mail.to),
        cc_addresses=_format(mail.cc),
        message_id=mail.message_id,
        in_reply_to=mail.in_reply_to[0] if mail.in_reply_to else None,
        references=" ".join(mail.references) or None,
        channel=inbound.channel,
    )
    return article if not flagged else _flag(article, classification.reasons if classification else ())


def _flag(article: NewArticle, reasons: tuple[str, ...]) -> NewArticle:
    return replace(article, auto_generated=True, classification=", ".join(reasons)[:200])
