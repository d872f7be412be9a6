"""``/api/v1/tickets``: list and filter, get with articles, create, change state, owner and group."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from postdesk.db.models import Channel, Direction, Group, Ticket, TicketState, User
from postdesk.tickets.people import PeopleError, find_user, normalise_email
from postdesk.tickets.service import (
    AssignmentError,
    NewArticle,
    SortKey,
    TicketFilter,
    assign_owner,
    change_state,
    create_ticket,
    get_or_create_customer,
    get_ticket,
    list_tickets,
    move_to_group,
)
from postdesk.web.api.deps import ApiUser, PageParams, error_responses
from postdesk.web.api.schemas import (
    TicketCreate,
    TicketDetailOut,
    TicketOut,
    TicketPageOut,
    TicketUpdate,
    ticket_detail_out,
    ticket_out,
)
from postdesk.web.deps import SessionDep

router = APIRouter(prefix="/tickets", tags=["tickets"], responses=error_responses(401))


def visible_ticket_or_404(db: Session, number: int, viewer: User) -> Ticket:
    """The ticket, if this person may see it; otherwise 404, so numbers of hidden tickets stay hidden."""
    ticket = get_ticket(db, number, viewer=viewer)
    if ticket is None:
        raise HTTPException(status_code=404, detail=f"There is no ticket #{number}, or you cannot see it.")
    return ticket


def group_named(db: Session, name: str) -> Group:
    group = db.scalar(select(Group).where(Group.name == name.strip()))
    if group is None:
        raise HTTPException(status_code=422, detail=f"There is no group named {name!r}.")
    return group


def agent_with_address(db: Session, address: str, *, me: User) -> User:
    person = me if address == "me" else find_user(db, address)
    if person is None:
        raise HTTPException(status_code=422, detail=f"There is no agent with the address {address!r}.")
    return person


@router.get("", summary="List tickets")
def list_endpoint(
    db: SessionDep,
    user: ApiUser,
    paging: PageParams,
    state: Annotated[list[TicketState], Query(description="Repeat for several states.")] = [],  # noqa: B006 - read only
    group: Annotated[str | None, Query(description="Group name.")] = None,
    owner: Annotated[str | None, Query(description="Owner's address, or `me`.")] = None,
    channel_id: int | None = None,
    q: Annotated[str, Query(description="Matches the number, the title or the customer's address.")] = "",
    sort: SortKey = "updated",
    order: Literal["asc", "desc"] = "desc",
) -> TicketPageOut:
    """Tickets the token's owner may see (admins: all; agents: their groups' and ungrouped ones)."""
    spec = TicketFilter(
        states=tuple(state),
        group_id=group_named(db, group).id if group else None,
        owner_id=agent_with_address(db, owner, me=user).id if owner else None,
        channel_id=channel_id,
        search=q,
        sort=sort,
        descending=order == "desc",
        page=paging.page,
        per_page=paging.per_page,
    )
    result = list_tickets(db, spec, viewer=user)
    return TicketPageOut(
        items=[ticket_out(t, article_count=result.article_counts.get(t.id, 0)) for t in result.tickets],
        total=result.total,
        page=paging.page,
        per_page=paging.per_page,
        pages=result.pages,
    )


@router.get("/{number}", summary="Get a ticket with its articles", responses=error_responses(404))
def get_endpoint(number: int, db: SessionDep, user: ApiUser) -> TicketDetailOut:
    return ticket_detail_out(visible_ticket_or_404(db, number, user))


@router.post("", status_code=201, summary="Create a ticket", responses=error_responses(403))
def create_endpoint(body: TicketCreate, db: SessionDep, user: ApiUser) -> TicketDetailOut:
    """A ticket whose first article is the customer's message, as if it had come in. No mail is sent."""
    try:
        address = normalise_email(body.customer_email).lower()
    except PeopleError as exc:
        raise HTTPException(status_code=422, detail=f"customer_email: {exc}.") from None
    channel = _channel(db, body.channel_id) if body.channel_id is not None else None
    group = group_named(db, body.group) if body.group else None
    owner = agent_with_address(db, body.owner, me=user) if body.owner else None
    customer = get_or_create_customer(db, address, body.customer_name.strip())
    name = body.customer_name.strip()
    ticket = create_ticket(
        db,
        title=body.title,
        customer=customer,
        group=group,
        channel=channel,
        first_article=NewArticle(
            direction=Direction.INBOUND,
            body_text=body.body,
            sender=f"{name} <{address}>" if name else address,
            subject=body.title.strip(),
        ),
    )
    if owner is not None:
        _assign(ticket, owner)
    db.commit()
    # Not looked up again with the viewer: an agent may file a ticket for a group they are not in.
    return ticket_detail_out(ticket)


def _channel(db: Session, channel_id: int) -> Channel:
    channel = db.get(Channel, channel_id)
    if channel is None:
        raise HTTPException(status_code=422, detail=f"There is no mailbox with ID {channel_id}.")
    return channel


def _assign(ticket: Ticket, owner: User | None) -> None:
    try:
        assign_owner(ticket, owner)
    except AssignmentError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None


@router.patch(
    "/{number}", summary="Change state, owner or group", responses=error_responses(403, 404)
)
def update_endpoint(number: int, body: TicketUpdate, db: SessionDep, user: ApiUser) -> TicketOut:
    """Only the fields sent are changed. The change is made even if it moves the ticket to a group the
    token's owner is not in (after which they can no longer see it)."""
    ticket = visible_ticket_or_404(db, number, user)
    given = body.model_fields_set
    if "state" in given:
        if body.state is None:
            raise HTTPException(status_code=422, detail="state cannot be null.")
        change_state(ticket, body.state)
    if "owner" in given:
        _assign(ticket, agent_with_address(db, body.owner, me=user) if body.owner else None)
    if "group" in given:
        move_to_group(ticket, group_named(db, body.group) if body.group else None)
    db.commit()
    return ticket_out(ticket, article_count=len(ticket.articles))
