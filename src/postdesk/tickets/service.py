"""Creating tickets and articles, and the queries behind the ticket list and ticket view."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import ColumnElement, Select, func, or_, select, update
from sqlalchemy.orm import Session, selectinload

from postdesk.db.models import (
    Article,
    Channel,
    Customer,
    Direction,
    Group,
    Ticket,
    TicketCounter,
    TicketState,
    User,
)
from postdesk.db.types import utcnow

FIRST_TICKET_NUMBER = 10001
SortKey = Literal["updated", "created", "number", "title"]


_NEXT_NUMBER = (
    update(TicketCounter)
    .where(TicketCounter.id == 1)
    .values(last_number=TicketCounter.last_number + 1)
    .returning(TicketCounter.last_number)
)


def next_ticket_number(session: Session) -> int:
    """Hand out the next ticket number; the row lock of the UPDATE serialises concurrent callers."""
    # A Core statement on the session's connection: the ORM's bulk-update machinery (and its
    # autoflush) cost several times the UPDATE itself, and nothing in the session mirrors this row.
    number: int | None = session.connection().scalar(_NEXT_NUMBER)
    if number is None:
        session.add(TicketCounter(id=1, last_number=FIRST_TICKET_NUMBER))
        session.flush()
        return FIRST_TICKET_NUMBER
    return number


def get_or_create_customer(session: Session, email: str, display_name: str = "") -> Customer:
    email = email.strip().lower()
    customer = session.scalar(select(Customer).where(Customer.email == email))
    if customer is None:
        customer = Customer(email=email, display_name=display_name)
        session.add(customer)
        session.flush()
    elif display_name and not customer.display_name:
        customer.display_name = display_name
    return customer


@dataclass(frozen=True)
class NewArticle:
    """What a new article says; the same shape for mail, web replies and notes."""

    direction: Direction
    body_text: str
    sender: str = ""
    subject: str = ""
    to_addresses: str = ""
    cc_addresses: str = ""
    body_html: str | None = None
    internal: bool = False
    message_id: str | None = None
    in_reply_to: str | None = None
    references: str | None = None
    author: User | None = None
    channel: Channel | None = None
    auto_generated: bool = False
    classification: str = ""


def create_ticket(
    session: Session,
    *,
    title: str,
    customer: Customer,
    first_article: NewArticle,
    group: Group | None = None,
    channel: Channel | None = None,
    flush: bool = True,
) -> Ticket:
    """A new ticket with its first article; ``flush=False`` leaves the INSERTs to the caller's next
    flush (the article's and ticket's ids are unset until then), so a batch can write them at once."""
    now = utcnow()
    ticket = Ticket(
        number=next_ticket_number(session),
        title=title.strip() or "(no subject)",
        state=TicketState.NEW,
        customer=customer,
        group=group,
        channel_id=channel.id if channel else None,
        created_at=now,
        updated_at=now,
    )
    session.add(ticket)
    add_article(session, ticket, first_article, flush=flush)
    return ticket


def add_article(session: Session, ticket: Ticket, new: NewArticle, *, flush: bool = True) -> Article:
    article = Article(
        direction=new.direction,
        internal=new.internal,
        sender=new.sender,
        to_addresses=new.to_addresses,
        cc_addresses=new.cc_addresses,
        subject=new.subject,
        body_text=new.body_text,
        body_html=new.body_html,
        message_id=new.message_id,
        in_reply_to=new.in_reply_to,
        references=new.references,
        author=new.author,
        channel_id=new.channel.id if new.channel else None,
        auto_generated=new.auto_generated,
        classification=new.classification,
        created_at=utcnow(),
    )
    ticket.articles.append(article)
    ticket.updated_at = article.created_at
    if flush:
        session.flush()
    return article


def change_state(ticket: Ticket, state: TicketState) -> None:
    ticket.state = state
    ticket.updated_at = utcnow()
    ticket.closed_at = ticket.updated_at if state is TicketState.CLOSED else None


@dataclass(frozen=True)
class TicketFilter:
    states: tuple[TicketState, ...] = ()
    group_id: int | None = None
    owner_id: int | None = None
    channel_id: int | None = None
    search: str = ""
    sort: SortKey = "updated"
    descending: bool = True
    page: int = 1
    per_page: int = 50


@dataclass(frozen=True)
class TicketPage:
    tickets: list[Ticket]
    total: int
    filter: TicketFilter
    article_counts: dict[int, int] = field(default_factory=dict)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.filter.per_page))


_SORT_COLUMNS = {
    "updated": Ticket.updated_at,
    "created": Ticket.created_at,
    "number": Ticket.number,
    "title": Ticket.title,
}


def visible_tickets(viewer: User | None) -> Select[Ticket]:
    """Tickets a person may see: admins all; agents their groups' tickets and unassigned ones."""
    query = select(Ticket)
    if viewer is not None and not viewer.is_admin:
        group_ids = [group.id for group in viewer.groups]
        query = query.where(or_(Ticket.group_id.is_(None), Ticket.group_id.in_(group_ids)))
    return query


def _apply_filter(query: Select[Ticket], spec: TicketFilter) -> Select[Ticket]:
    if spec.states:
        query = query.where(Ticket.state.in_(spec.states))
    for column, value in (
        (Ticket.group_id, spec.group_id),
        (Ticket.owner_id, spec.owner_id),
        (Ticket.channel_id, spec.channel_id),
    ):
        if value is not None:
            query = query.where(column == value)
    term = spec.search.strip()
    if term:
        query = query.join(Customer, Ticket.customer_id == Customer.id)
        conditions: list[ColumnElement[bool]] = [
            Ticket.title.ilike(f"%{_escape_like(term)}%", escape="\\"),
            Customer.email.ilike(f"%{_escape_like(term)}%", escape="\\"),
        ]
        digits = term.lstrip("#")
        if digits.isdigit():
            conditions.append(Ticket.number == int(digits))
        query = query.where(or_(*conditions))
    return query


def _escape_like(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_tickets(session: Session, spec: TicketFilter, *, viewer: User | None = None) -> TicketPage:
    query = _apply_filter(visible_tickets(viewer), spec)
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
    column = _SORT_COLUMNS[spec.sort]
    ordered = query.order_by(column.desc() if spec.descending else column.asc(), Ticket.id.desc())
    page = max(1, spec.page)
    tickets = list(
        session.scalars(
            ordered.options(
                selectinload(Ticket.customer), selectinload(Ticket.group), selectinload(Ticket.owner)
            )
            .limit(spec.per_page)
            .offset((page - 1) * spec.per_page)
        )
    )
    counts = _article_counts(session, [ticket.id for ticket in tickets])
    return TicketPage(tickets=tickets, total=total, filter=spec, article_counts=counts)


def _article_counts(session: Session, ticket_ids: list[int]) -> dict[int, int]:
    if not ticket_ids:
        return {}
    rows = session.execute(
        select(Article.ticket_id, func.count())
        .where(Article.ticket_id.in_(ticket_ids))
        .group_by(Article.ticket_id)
    )
    return {ticket_id: count for ticket_id, count in rows}


def get_ticket(session: Session, number: int, *, viewer: User | None = None) -> Ticket | None:
    query = visible_tickets(viewer).where(Ticket.number == number)
    return session.scalar(
        query.options(
            selectinload(Ticket.articles).selectinload(Article.attachments),
            selectinload(Ticket.customer),
        )
    )
