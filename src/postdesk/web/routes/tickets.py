"""The agent's ticket list and ticket view."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select

from postdesk.db.models import Attachment, Channel, Group, TicketState, User
from postdesk.storage import read_bytes
from postdesk.tickets.service import SortKey, TicketFilter, get_ticket, list_tickets
from postdesk.web.deps import CurrentUser, RuntimeDep, SessionDep
from postdesk.web.downloads import content_disposition
from postdesk.web.templating import render

router = APIRouter(include_in_schema=False)

STATE_LABELS = {
    TicketState.NEW: "New",
    TicketState.OPEN: "Open",
    TicketState.PENDING_REMINDER: "Pending reminder",
    TicketState.CLOSED: "Closed",
}


@router.get("/")
def home() -> Response:
    return RedirectResponse("/tickets", status_code=303)


@router.get("/tickets")
def ticket_list(
    request: Request,
    db: SessionDep,
    user: CurrentUser,
    state: Annotated[list[TicketState], Query()] = [],  # noqa: B006 - FastAPI reads, never mutates
    group: str = "",
    owner: str = "",
    channel: str = "",
    q: str = "",
    sort: SortKey = "updated",
    order: str = "desc",
    page: Annotated[int, Query(ge=1)] = 1,
) -> Response:
    spec = TicketFilter(
        states=tuple(state),
        group_id=_id(group),
        owner_id=_id(owner),
        channel_id=_id(channel),
        search=q,
        sort=sort,
        descending=order != "asc",
        page=page,
    )
    result = list_tickets(db, spec, viewer=user)
    context = {
        "section": "tickets",
        "user": user,
        "result": result,
        "state_labels": STATE_LABELS,
        "groups": db.scalars(select(Group).order_by(Group.name)).all(),
        "agents": db.scalars(select(User).where(User.is_active).order_by(User.display_name)).all(),
        "channels": db.scalars(select(Channel).order_by(Channel.email)).all(),
    }
    template = "tickets/_results.html" if request.headers.get("hx-request") else "tickets/list.html"
    return render(request, template, context)


def _id(value: str) -> int | None:
    """Filter selects send "" for "any"; anything that is not a positive number means no filter."""
    return int(value) if value.isdigit() else None


@router.get("/attachments/{attachment_id}")
def download_attachment(
    attachment_id: int, db: SessionDep, runtime: RuntimeDep, user: CurrentUser
) -> Response:
    attachment = db.get(Attachment, attachment_id)
    if attachment is None or get_ticket(db, attachment.article.ticket.number, viewer=user) is None:
        raise HTTPException(status_code=404, detail="There is no such attachment, or you cannot see it.")
    # Always a download, never rendered: an attached .html or .svg is as hostile as the mail it came in.
    return Response(
        read_bytes(runtime.settings.attachments_dir, attachment.sha256),
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": content_disposition(attachment.filename),
            "X-Content-Type-Options": "nosniff",
        },
    )
