"""Creating tickets and articles, and the queries behind the ticket list and ticket view."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import ColumnElement, Select, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session, joinedload, selectinload

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
from postdesk.db.session import insert_ignoring_duplicates
from postdesk.db.types import utcnow

FIRST_TICKET_NUMBER = 10001
SortKey = Literal["updated", "created", "number", "title"]


_NEXT_NUMBERS = (
    update(TicketCounter)
    .where(TicketCounter.id == 1)
    .values(last_number=TicketCounter.last_number + bindparam("count"))
    .returning(TicketCounter.last_number)
)


def next_ticket_number(session: Session) -> int:
    """Hand out the next ticket number; the row lock of the UPDATE serialises concurrent callers."""
    return next_ticket_numbers(session, 1)[0]


def next_ticket_numbers(session: Session, count: int) -> range:
    """Hand out ``count`` consecutive ticket numbers with one UPDATE (locked like ``next_ticket_number``)."""
    if count < 1:
        return range(0)
    # A Core statement on the session's connection: the ORM's bulk-update machinery (and its
    # autoflush) cost several times the UPDATE itself, and nothing in the session mirrors this row.
    last: int | None = session.connection().scalar(_NEXT_NUMBERS, {"count": count})
    if last is None:
        last = FIRST_TICKET_NUMBER + count - 1
        session.add(TicketCounter(id=1, last_number=last))
        session.flush()
    return range(last - count + 1, last + 1)


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


def get_or_create_customers(session: Session, people: Sequence[tuple[str, str]]) -> list[int]:
    """The customer id for each ``(email, display_name)``, as ``get_or_create_customer`` would give them
    one by one, with a SELECT and an INSERT for all of them (the mail pipeline opens tickets in batches)."""
    names: dict[str, str] = {}
    for email, display_name in people:
        key = email.strip().lower()
        names[key] = names.get(key) or display_name
    if not names:
        return []
    found = _customers_by_email(session, list(names))
    missing = [{"email": email, "display_name": names[email]} for email in names if email not in found]
    if missing:
        # Another worker may add the same customer meanwhile; its row is as good as ours.
        session.execute(insert_ignoring_duplicates(session, Customer), missing)
        found = _customers_by_email(session, list(names))
    unnamed = [
        {"id": customer_id, "display_name": names[email]}
        for email, (customer_id, shown) in found.items()
        if not shown and names[email]
    ]
    if unnamed:
        session.execute(update(Customer), unnamed)
    return [found[email.strip().lower()][0] for email, _name in people]


def _customers_by_email(session: Session, emails: list[str]) -> dict[str, tuple[int, str]]:
    rows = session.execute(
        select(Customer.email, Customer.id, Customer.display_name).where(Customer.email.in_(emails))
    )
    return {email: (customer_id, shown) for email, customer_id, shown in rows}


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


@dataclass(frozen=True)
class TicketDraft:
    """A ticket for ``create_tickets``: what ``create_ticket`` takes, by id, without the first article."""

    title: str
    customer_id: int
    group_id: int | None = None
    channel_id: int | None = None


def create_tickets(
    session: Session, drafts: Sequence[TicketDraft], *, now: datetime
) -> list[tuple[int, int]]:
    """Open many tickets with one multi-row INSERT and return each one's ``(id, number)``, in order.

    For the mail pipeline: the ORM's bookkeeping per object cost more than the INSERTs themselves. The
    caller adds the first articles with ``add_articles`` in the same transaction. Nothing is loaded into
    the session.
    """
    numbers = next_ticket_numbers(session, len(drafts))
    if not drafts:
        return []
    rows = [
        {
            "number": number,
            # The column holds 998 characters; a subject can be longer.
            "title": (draft.title.strip() or "(no subject)")[:998],
            "state": TicketState.NEW,
            "customer_id": draft.customer_id,
            "group_id": draft.group_id,
            "channel_id": draft.channel_id,
            "created_at": now,
            "updated_at": now,
        }
        for draft, number in zip(drafts, numbers, strict=True)
    ]
    # RETURNING with the unique number rather than in parameter order, which SQLite cannot promise
    # for a multi-row INSERT (SQLAlchemy would fall back to one INSERT per ticket).
    inserted = session.execute(insert(Ticket).returning(Ticket.number, Ticket.id), rows)
    ids = {number: ticket_id for number, ticket_id in inserted}
    return [(ids[number], number) for number in numbers]


def add_articles(session: Session, articles: Sequence[tuple[int, NewArticle]], *, now: datetime) -> list[int]:
    """Add many ``(ticket_id, article)`` with multi-row INSERTs; returns the new ids, in order.

    Unlike ``add_article`` this leaves the tickets' ``updated_at`` to the caller (it knows which tickets
    it touched and sets each once).
    """
    # SQLite cannot promise RETURNING in parameter order for a multi-row INSERT, so each INSERT holds
    # at most one article per ticket and the ids are matched by ticket; a ticket's later articles go
    # into later INSERTs, which keeps them in order.
    rounds: list[list[int]] = []
    seen: dict[int, int] = {}
    for position, (ticket_id, _new) in enumerate(articles):
        round_number = seen[ticket_id] = seen.get(ticket_id, -1) + 1
        if round_number == len(rounds):
            rounds.append([])
        rounds[round_number].append(position)
    ids: list[int] = [0] * len(articles)
    for positions in rounds:
        rows = _article_rows([articles[position] for position in positions], now)
        inserted = session.execute(insert(Article).returning(Article.ticket_id, Article.id), rows)
        by_ticket = {ticket_id: article_id for ticket_id, article_id in inserted}
        for position in positions:
            ids[position] = by_ticket[articles[position][0]]
    return ids


def _article_rows(articles: Sequence[tuple[int, NewArticle]], now: datetime) -> list[dict[str, object]]:
    return [
        {
            "ticket_id": ticket_id,
            "direction": new.direction,
            "internal": new.internal,
            "sender": new.sender,
            "to_addresses": new.to_addresses,
            "cc_addresses": new.cc_addresses,
            "subject": new.subject,
            "body_text": new.body_text,
            "body_html": new.body_html,
            "message_id": new.message_id,
            "in_reply_to": new.in_reply_to,
            "references": new.references,
            "author_id": new.author.id if new.author else None,
            "channel_id": new.channel.id if new.channel else None,
            "auto_generated": new.auto_generated,
            "classification": new.classification,
            "created_at": now,
        }
        for ticket_id, new in articles
    ]


DEFAULT_REMINDER = timedelta(days=1)


def change_state(ticket: Ticket, state: TicketState, *, pending_until: datetime | None = None) -> None:
    """Set the state; "pending reminder" waits until ``pending_until`` (default: a day from now), then
    the reminders job opens the ticket again."""
    now = utcnow()
    if state is TicketState.PENDING_REMINDER:
        when = pending_until or now + DEFAULT_REMINDER
        if when <= now:
            raise AssignmentError("The reminder must be in the future.")
        ticket.pending_until = when
    else:
        ticket.pending_until = None
    ticket.state = state
    ticket.updated_at = now
    ticket.closed_at = now if state is TicketState.CLOSED else None


def remind_due_tickets(session: Session, *, now: datetime | None = None) -> list[Ticket]:
    """Open every pending ticket whose reminder time has come, with a note saying so."""
    now = now or utcnow()
    # SKIP LOCKED: with several workers each due ticket is reminded by exactly one of them.
    due = session.scalars(
        select(Ticket)
        .where(Ticket.state == TicketState.PENDING_REMINDER, Ticket.pending_until <= now)
        .with_for_update(skip_locked=True)
    ).all()
    for ticket in due:
        reminder = ticket.pending_until
        change_state(ticket, TicketState.OPEN)
        add_article(
            session,
            ticket,
            NewArticle(
                direction=Direction.OUTBOUND,
                internal=True,
                sender="Postdesk",
                body_text=f"Reminder: this ticket was pending until {reminder:%Y-%m-%d %H:%M} UTC.",
            ),
            flush=False,
        )
    session.flush()
    return list(due)


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
        query = query.where(_search(term))
    return query


def _search(term: str) -> ColumnElement[bool]:
    """``#10042`` is that ticket; anything else matches the subject or the customer's address (and, when
    it is all digits, the ticket number too)."""
    digits = term.lstrip("#")
    if term.startswith("#") and digits.isdigit():
        return Ticket.number == int(digits)  # the unique index answers it at once
    pattern = f"%{_escape_like(term)}%"
    # A subquery over customers (a fifth of the tickets, or fewer) instead of a join on every ticket.
    customers = select(Customer.id).where(Customer.email.ilike(pattern, escape="\\"))
    conditions: list[ColumnElement[bool]] = [
        Ticket.title.ilike(pattern, escape="\\"),
        Ticket.customer_id.in_(customers.scalar_subquery()),
    ]
    if digits.isdigit() and len(digits) <= 18:
        conditions.append(Ticket.number == int(digits))
    return or_(*conditions)


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
            # Many-to-one: joined into the page's own query rather than three more round trips.
            ordered.options(joinedload(Ticket.customer), joinedload(Ticket.group), joinedload(Ticket.owner))
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
            joinedload(Ticket.customer),
        )
    )


class AssignmentError(ValueError):
    """An owner or group change that cannot be made; the message says why."""


def assign_owner(ticket: Ticket, owner: User | None) -> None:
    """Give the ticket to ``owner`` (None: nobody). Only active people can own tickets."""
    if owner is not None and not owner.is_active:
        raise AssignmentError(f"{owner.display_name} is deactivated and cannot own tickets.")
    ticket.owner = owner
    ticket.owner_id = owner.id if owner else None
    ticket.updated_at = utcnow()


def move_to_group(ticket: Ticket, group: Group | None) -> None:
    ticket.group = group
    ticket.group_id = group.id if group else None
    ticket.updated_at = utcnow()
