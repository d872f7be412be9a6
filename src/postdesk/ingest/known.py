"""What the matching steps look up, for a batch of messages: loaded with a few queries, then kept current.

One query finds every article whose Message-ID the batch mentions (its own ids, for duplicates; the ids
its replies and bounces point at, for threading), another the tickets its subjects name by number, with
their customers, and a third who took part in those tickets (the senders and recipients of their mail),
so that a number in a subject is honoured only for them. As the batch is decided, each message that
becomes an article is remembered here too, so a reply fetched in the same batch as its question still
finds it, and a second copy of a message is still a duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from postdesk.db.models import Article, Customer, InboundMessage, Ticket, TicketState

# tickets.number is a 32-bit INTEGER: a larger number in a subject cannot be one of ours, and PostgreSQL
# refuses to compare the column with it, which would fail the whole batch.
LARGEST_TICKET_NUMBER = 2**31 - 1
# The reason a stored row carries while it waits to be processed again after an admin released it from
# quarantine (quarantine.reprocess); the row's reason is replaced once it has been processed.
RELEASED_BY_ADMIN = (
    "released from quarantine by an admin: becomes a ticket even if it comes from one of Postdesk's "
    "own mailboxes"
)


@dataclass(eq=False)
class TicketRef:
    """A ticket a message can join: one in the database, or one this batch opens (``id`` set on insert)."""

    id: int | None
    number: int | None
    state: TicketState
    new: bool = False  # opened by this batch
    updated_at: datetime | None = None  # set when the batch adds an article to it
    reopened: bool = False
    # Lower-case addresses of the customer and of every sender, To and Cc of the ticket's mail. Loaded
    # only for tickets a subject names by number; the batch adds the people of the mail it attaches.
    participants: set[str] = field(default_factory=set)


@dataclass(eq=False)
class ArticleRef:
    """An article in the database, or one this batch writes (``id`` set on insert)."""

    id: int | None
    ticket: TicketRef


class Known:
    def __init__(self) -> None:
        # Message-ID -> (channel id, article), oldest first.
        self._articles: dict[str, list[tuple[int | None, ArticleRef]]] = {}
        self._tickets_by_number: dict[int, TicketRef] = {}
        self._tickets: dict[int, TicketRef] = {}
        self._released: set[int] = set()

    @classmethod
    def load(
        cls,
        session: Session,
        message_ids: Iterable[str],
        numbers: Iterable[int],
        *,
        maybe_released: Iterable[int] = (),
    ) -> Known:
        """``maybe_released``: inbound row ids to check for an admin's release (``RELEASED_BY_ADMIN``)."""
        known = cls()
        known._load_articles(session, sorted(set(message_ids)))
        known._load_numbered(session, sorted({n for n in numbers if 0 < n <= LARGEST_TICKET_NUMBER}))
        known._load_released(session, sorted(set(maybe_released)))
        return known

    def _load_articles(self, session: Session, message_ids: list[str]) -> None:
        if not message_ids:
            return
        rows = session.execute(
            select(Article.id, Article.channel_id, Article.message_id, Ticket.id, Ticket.number, Ticket.state)
            .join(Ticket, Article.ticket_id == Ticket.id)
            .where(Article.message_id.in_(message_ids))
            .order_by(Article.id)
        )
        for article_id, channel_id, message_id, ticket_id, number, state in rows:
            article = ArticleRef(article_id, self._ticket(ticket_id, number, state))
            self._articles.setdefault(message_id or "", []).append((channel_id, article))

    def _load_numbered(self, session: Session, numbers: list[int]) -> None:
        if not numbers:
            return
        rows = session.execute(
            select(Ticket.id, Ticket.number, Ticket.state, Customer.email)
            .join(Customer, Ticket.customer_id == Customer.id)
            .where(Ticket.number.in_(numbers))
        )
        numbered: dict[int, TicketRef] = {}
        for ticket_id, number, state, customer_email in rows:
            ticket = numbered[ticket_id] = self._ticket(ticket_id, number, state)
            ticket.participants.add(customer_email.lower())
            self._tickets_by_number[number] = ticket
        self._load_participants(session, numbered)

    def _load_participants(self, session: Session, tickets: dict[int, TicketRef]) -> None:
        if not tickets:
            return
        rows = session.execute(
            select(Article.ticket_id, Article.sender, Article.to_addresses, Article.cc_addresses)
            .where(Article.ticket_id.in_(sorted(tickets)), Article.internal.is_(False))
            .distinct()  # a long conversation between the same few people is a few rows
        )
        for ticket_id, *address_fields in rows:
            for stored in address_fields:
                tickets[ticket_id].participants.update(stored_addresses(stored))

    def _load_released(self, session: Session, row_ids: list[int]) -> None:
        if not row_ids:
            return
        self._released.update(
            session.scalars(
                select(InboundMessage.id).where(
                    InboundMessage.id.in_(row_ids), InboundMessage.reason == RELEASED_BY_ADMIN
                )
            )
        )

    def _ticket(self, ticket_id: int, number: int, state: TicketState) -> TicketRef:
        # One ref per ticket, so that a change the batch makes to it is seen by every message.
        return self._tickets.setdefault(ticket_id, TicketRef(ticket_id, number, state))

    def article_with_message_id(self, channel_id: int, message_id: str) -> ArticleRef | None:
        """The first article of this channel with this Message-ID."""
        for article_channel_id, article in self._articles.get(message_id, ()):
            if article_channel_id == channel_id:
                return article
        return None

    def ticket_holding(self, message_id: str) -> TicketRef | None:
        """The ticket of the latest article, from any channel, with this Message-ID."""
        articles = self._articles.get(message_id)
        return articles[-1][1].ticket if articles else None

    def ticket_numbered(self, number: int) -> TicketRef | None:
        """The ticket with this number, its ``participants`` loaded."""
        return self._tickets_by_number.get(number)

    def released_by_admin(self, row_id: int) -> bool:
        """Whether an admin reprocessed this inbound row (only rows passed as ``maybe_released``)."""
        return row_id in self._released

    def remember(
        self, channel_id: int, message_id: str | None, ticket: TicketRef, *, people: Iterable[str] = ()
    ) -> ArticleRef:
        """A message the batch turns into an article of ``ticket``, sent by or to ``people``: later
        messages can find it, and those people have now taken part in the ticket."""
        article = ArticleRef(None, ticket)
        if message_id is not None:
            self._articles.setdefault(message_id, []).append((channel_id, article))
        ticket.participants.update(address.lower() for address in people)
        return article


def stored_addresses(stored: str) -> list[str]:
    """The lower-case addresses in an article's sender, To or Cc as stored: ``Name <a@b>, c@d``.

    Display names are stored unquoted, so only the part in angle brackets counts when there is one: a
    name that looks like an address must not make its writer a participant.
    """
    found = []
    for entry in stored.split(","):
        _name, bracket, rest = entry.partition("<")
        address = (rest.partition(">")[0] if bracket else entry).strip().lower()
        if "@" in address and not any(character.isspace() for character in address):
            found.append(address)
    return found
