"""What the matching steps look up, for a batch of messages: loaded with two queries, then kept current.

One query finds every article whose Message-ID the batch mentions (its own ids, for duplicates; the ids
its replies and bounces point at, for threading), another the tickets its subjects name by number. As the
batch is decided, each message that becomes an article is remembered here too, so a reply fetched in the
same batch as its question still finds it, and a second copy of a message is still a duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from postdesk.db.models import Article, Ticket, TicketState


@dataclass(eq=False)
class TicketRef:
    """A ticket a message can join: one in the database, or one this batch opens (``id`` set on insert)."""

    id: int | None
    number: int | None
    state: TicketState
    new: bool = False  # opened by this batch
    updated_at: datetime | None = None  # set when the batch adds an article to it
    reopened: bool = False


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

    @classmethod
    def load(cls, session: Session, message_ids: Iterable[str], numbers: Iterable[int]) -> Known:
        known = cls()
        known._load_articles(session, sorted(set(message_ids)))
        known._load_numbered(session, sorted(set(numbers)))
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
            select(Ticket.id, Ticket.number, Ticket.state).where(Ticket.number.in_(numbers))
        )
        for ticket_id, number, state in rows:
            self._tickets_by_number[number] = self._ticket(ticket_id, number, state)

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
        return self._tickets_by_number.get(number)

    def remember(self, channel_id: int, message_id: str | None, ticket: TicketRef) -> ArticleRef:
        """A message the batch turns into an article of ``ticket``: later messages can find it."""
        article = ArticleRef(None, ticket)
        if message_id is not None:
            self._articles.setdefault(message_id, []).append((channel_id, article))
        return article
