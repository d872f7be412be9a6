"""The inbound pipeline as a list of named steps, each returning an explicit outcome.

A step looks at the message (and the database, read-only) and says: continue, attach to this ticket,
skip as a duplicate of that article, or quarantine for this reason. Only the last stage writes. The
steps run from the stored raw bytes, so a crash anywhere just means the row is processed again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from postdesk.db.models import Article, Channel, InboundMessage, Ticket
from postdesk.mail import Classification, MailParseError, ParsedMail, classify, parse_message
from postdesk.mail.threading import thread_message_ids, ticket_numbers_in_subject


@dataclass
class Inbound:
    """What the steps know about one message; each step may fill in more."""

    row: InboundMessage
    channel: Channel
    raw: bytes
    own_addresses: frozenset[str]
    ticket_prefix: str = "Ticket#"
    mail: ParsedMail | None = None
    classification: Classification | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Continue:
    pass


@dataclass(frozen=True)
class Quarantine:
    reason: str


@dataclass(frozen=True)
class Duplicate:
    article_id: int | None
    reason: str


@dataclass(frozen=True)
class AttachTo:
    ticket: Ticket
    reason: str


@dataclass(frozen=True)
class NewTicket:
    pass


Outcome = Continue | Quarantine | Duplicate | AttachTo | NewTicket
Step = Callable[[Session, Inbound], Outcome]


def check_size(_session: Session, inbound: Inbound) -> Outcome:
    limit = inbound.channel.max_message_bytes
    if inbound.row.size > limit:
        return Quarantine(
            f"the message is {_megabytes(inbound.row.size)}, over this mailbox's limit of "
            f"{_megabytes(limit)}; it is kept here and can be reprocessed after raising the limit"
        )
    return Continue()


def _megabytes(size: int) -> str:
    # Bytes as well: 1.0 MB over a 1.0 MB limit would read like a mistake.
    return f"{size / (1024 * 1024):.1f} MB ({size:,} bytes)"


def parse(_session: Session, inbound: Inbound) -> Outcome:
    try:
        inbound.mail = parse_message(inbound.raw)
    except MailParseError as exc:
        return Quarantine(f"this is not a readable mail message: {exc}")
    return Continue()


def skip_duplicates(session: Session, inbound: Inbound) -> Outcome:
    """The same message fetched again (a resync, a copy in another folder) becomes no second article."""
    message_id = _mail(inbound).message_id
    if message_id is None:
        return Continue()
    _see_pending_articles(session, {message_id})
    existing = session.scalar(
        select(Article.id)
        .where(Article.channel_id == inbound.channel.id, Article.message_id == message_id)
        .limit(1)
    )
    if existing is not None:
        return Duplicate(existing, f"already stored as article {existing} (same Message-ID)")
    return Continue()


def classify_message(_session: Session, inbound: Inbound) -> Outcome:
    inbound.classification = classify(_mail(inbound), own_addresses=inbound.own_addresses)
    return Continue()


def follow_up_by_ticket_number(session: Session, inbound: Inbound) -> Outcome:
    numbers = ticket_numbers_in_subject(_mail(inbound).subject, prefix=inbound.ticket_prefix)
    if numbers:
        _flush_if_pending(session, lambda item: isinstance(item, Ticket) and item.number in numbers)
    for number in numbers:
        ticket = session.scalar(select(Ticket).where(Ticket.number == number))
        if ticket is not None:
            return AttachTo(ticket, f"the subject names ticket {number}")
    return Continue()


def follow_up_by_references(session: Session, inbound: Inbound) -> Outcome:
    """In-Reply-To and References name a message Postdesk already holds: the same conversation."""
    mail = _mail(inbound)
    candidates = list(thread_message_ids(mail))
    classification = inbound.classification
    if classification is not None and classification.bounced_message_id:
        candidates.insert(0, classification.bounced_message_id)
    if not candidates:
        return Continue()
    _see_pending_articles(session, set(candidates))
    rows = session.execute(
        select(Article.message_id, Article.ticket_id).where(Article.message_id.in_(candidates))
    ).all()
    by_id = {message_id: ticket_id for message_id, ticket_id in rows}
    for message_id in candidates:
        if message_id in by_id:
            ticket = session.get(Ticket, by_id[message_id])
            if ticket is not None:
                return AttachTo(ticket, f"it answers {message_id}")
    return Continue()


def _see_pending_articles(session: Session, message_ids: set[str]) -> None:
    _flush_if_pending(session, lambda item: isinstance(item, Article) and item.message_id in message_ids)


def _flush_if_pending(session: Session, matches: Callable[[object], bool]) -> None:
    """Make the batch's own unwritten rows visible to a lookup that could find them.

    The batch runs without autoflush (a flush per message cost more than the rest of the pipeline), so
    an article or ticket created earlier in the same batch is only in the session; it is flushed
    (and gets its id) before a query that might match it, which keeps the answers autoflush would give.
    """
    if any(matches(item) for item in session.new):
        session.flush()


def refuse_loops(_session: Session, inbound: Inbound) -> Outcome:
    """Mail from our own mailboxes (or a bounce about nothing we sent) must not open a ticket."""
    classification = inbound.classification
    if classification is None:
        return Continue()
    if classification.loop or classification.from_own_address:
        return Quarantine(
            "sent by one of Postdesk's own mailboxes and not part of a known ticket; not turned "
            "into a ticket so that two mailboxes cannot answer each other forever"
        )
    if classification.bounce:
        return Quarantine("a delivery failure report for a message Postdesk does not know; kept for review")
    return NewTicket()


STEPS: tuple[Step, ...] = (
    check_size,
    parse,
    skip_duplicates,
    classify_message,
    follow_up_by_ticket_number,
    follow_up_by_references,
    refuse_loops,
)


def decide(session: Session, inbound: Inbound, steps: tuple[Step, ...] = STEPS) -> Outcome:
    for step in steps:
        outcome = step(session, inbound)
        if not isinstance(outcome, Continue):
            return outcome
    return NewTicket()


def _mail(inbound: Inbound) -> ParsedMail:
    if inbound.mail is None:
        raise RuntimeError("the parse step must run first")
    return inbound.mail
