"""Turning stored inbound rows into articles: one transaction per message, idempotent by design.

A row is read from the spool, the pipeline decides, and the article, the ticket changes and the row's
new status are committed together. If the process dies before that commit nothing happened and the
row is processed again; after it, the row is no longer ``stored`` and is never processed twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from postdesk.db.models import (
    Article,
    Attachment,
    Channel,
    Direction,
    InboundMessage,
    InboundStatus,
    Ticket,
    TicketState,
)
from postdesk.db.types import utcnow
from postdesk.ingest.pipeline import AttachTo, Duplicate, Inbound, NewTicket, Quarantine, decide
from postdesk.mail import Address, ParsedMail
from postdesk.runtime import Runtime
from postdesk.storage import read_bytes, store_many
from postdesk.tickets.service import (
    NewArticle,
    add_article,
    change_state,
    create_ticket,
    get_or_create_customer,
)

log = logging.getLogger(__name__)
PROCESS_BATCH = 50
_NOBODY = ("noreply", "no-reply", "donotreply", "do-not-reply", "mailer-daemon", "postmaster")


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


def own_addresses(session: Session) -> frozenset[str]:
    return frozenset(email.lower() for email in session.scalars(select(Channel.email)))


def process_stored(runtime: Runtime, *, channel_id: int | None = None, limit: int = 10_000) -> ProcessCounts:
    """Process stored rows oldest first.

    Rows are processed in batches, one transaction per batch, because a commit per message dominated
    the cost. If anything in a batch fails, the batch is rolled back as a whole and redone one message
    per transaction, so that only the message at fault is quarantined.
    """
    counts = ProcessCounts()
    query = select(InboundMessage.id).where(InboundMessage.status == InboundStatus.STORED)
    if channel_id is not None:
        query = query.where(InboundMessage.channel_id == channel_id)
    with runtime.sessions() as session:
        row_ids = list(session.scalars(query.order_by(InboundMessage.id).limit(limit)))
    for start in range(0, len(row_ids), PROCESS_BATCH):
        batch = row_ids[start : start + PROCESS_BATCH]
        try:
            counts.merge(_process_batch(runtime, batch))
        except SQLAlchemyError:
            raise  # the database is the problem, not the mail: stop and retry the whole pass later
        except Exception:
            for row_id in batch:
                counts.merge(_process_alone(runtime, row_id))
    return counts


def _process_batch(runtime: Runtime, row_ids: list[int]) -> ProcessCounts:
    counts = ProcessCounts()
    with runtime.sessions() as session, session.begin(), session.no_autoflush:
        own = own_addresses(session)
        rows = session.scalars(
            select(InboundMessage)
            .where(InboundMessage.id.in_(row_ids))
            .order_by(InboundMessage.id)
            .with_for_update()
        ).all()
        links: list[tuple[InboundMessage, Article]] = []
        for row in rows:
            if row.status is not InboundStatus.STORED:
                continue  # another worker got there first
            counts.add(process_row(session, runtime, row, own=own, links=links))
        # One flush writes the batch's tickets and articles; then each row can point at its article.
        session.flush()
        for row, article in links:
            row.article_id = article.id
    return counts


def _process_alone(runtime: Runtime, row_id: int) -> ProcessCounts:
    counts = ProcessCounts()
    try:
        counts.merge(_process_batch(runtime, [row_id]))
    except SQLAlchemyError:
        raise
    except Exception as exc:
        # A bug or a surprise in the mail must not stop the queue: keep the mail, say what happened.
        log.exception("inbound message %s could not be processed", row_id)
        _quarantine_after_failure(runtime, row_id, exc)
        counts.add("quarantined")
    return counts


def _quarantine_after_failure(runtime: Runtime, row_id: int, exc: Exception) -> None:
    with runtime.sessions() as session, session.begin():
        row = session.get(InboundMessage, row_id)
        if row is not None and row.status is InboundStatus.STORED:
            _finish(
                row, InboundStatus.QUARANTINED, f"Postdesk could not process it ({type(exc).__name__}: {exc})"
            )


def process_row(
    session: Session,
    runtime: Runtime,
    row: InboundMessage,
    *,
    own: frozenset[str],
    links: list[tuple[InboundMessage, Article]],
) -> str:
    """Decide and write; return which counter the outcome belongs to.

    Nothing is flushed here: a new article is added to ``links`` with its row, and the caller sets
    ``row.article_id`` once a flush has given the article its id (in the same transaction).
    """
    raw = read_bytes(runtime.settings.spool_dir, row.sha256)
    inbound = Inbound(
        row=row, channel=row.channel, raw=raw, own_addresses=own, ticket_prefix=runtime.settings.ticket_prefix
    )
    return _apply(session, runtime, inbound, decide(session, inbound), links)


def _apply(
    session: Session,
    runtime: Runtime,
    inbound: Inbound,
    outcome: object,
    links: list[tuple[InboundMessage, Article]],
) -> str:
    row = inbound.row
    if isinstance(outcome, Quarantine):
        _finish(row, InboundStatus.QUARANTINED, outcome.reason)
        return "quarantined"
    if isinstance(outcome, Duplicate):
        _finish(row, InboundStatus.DUPLICATE, outcome.reason, article_id=outcome.article_id)
        return "duplicates"
    mail = inbound.mail
    assert mail is not None
    if isinstance(outcome, AttachTo):
        article = add_article(session, outcome.ticket, _new_article(inbound, mail), flush=False)
        if not article.auto_generated and outcome.ticket.state in (
            TicketState.CLOSED,
            TicketState.PENDING_REMINDER,
        ):
            change_state(outcome.ticket, TicketState.OPEN)
        _store_attachments(runtime, article, mail)
        _finish(row, InboundStatus.PROCESSED, outcome.reason)
        links.append((row, article))
        return "follow_ups"
    assert isinstance(outcome, NewTicket)
    ticket = _open_ticket(session, inbound, mail)
    article = ticket.articles[-1]
    _store_attachments(runtime, article, mail)
    _finish(row, InboundStatus.PROCESSED, f"opened ticket {ticket.number}")
    links.append((row, article))
    return "tickets"


def _open_ticket(session: Session, inbound: Inbound, mail: ParsedMail) -> Ticket:
    person = _customer_address(mail)
    customer = get_or_create_customer(session, person.email, person.name)
    return create_ticket(
        session,
        title=mail.subject or "(no subject)",
        customer=customer,
        group=inbound.channel.group,
        channel=inbound.channel,
        first_article=_new_article(inbound, mail),
        flush=False,
    )


def _customer_address(mail: ParsedMail) -> Address:
    """Reply-To wins when it names one person (not a list or a no-reply robot); else From."""
    if len(mail.reply_to) == 1 and not mail.reply_to[0].email.split("@")[0].lower().startswith(_NOBODY):
        return mail.reply_to[0]
    if mail.sender is not None:
        return mail.sender
    return Address(name="", email="unknown-sender@invalid")


def _format(addresses: tuple[Address, ...]) -> str:
    return ", ".join(f"{a.name} <{a.email}>" if a.name else a.email for a in addresses)


def _new_article(inbound: Inbound, mail: ParsedMail) -> NewArticle:
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


def _store_attachments(runtime: Runtime, article: Article, mail: ParsedMail) -> None:
    if not mail.attachments:
        return
    digests = store_many(runtime.settings.attachments_dir, [part.content for part in mail.attachments])
    for part, digest in zip(mail.attachments, digests, strict=True):
        article.attachments.append(
            Attachment(
                filename=part.filename,
                content_type=part.content_type,
                size=len(part.content),
                sha256=digest,
                content_id=part.content_id,
                inline=part.inline,
            )
        )


def _finish(
    row: InboundMessage, status: InboundStatus, reason: str, *, article_id: int | None = None
) -> None:
    row.status = status
    row.reason = reason
    row.article_id = article_id
    row.processed_at = utcnow()
