"""One ticket: the conversation, the composer (reply, reply all, forward, note), state/owner/group.

Every form works as a plain POST followed by a redirect; with htmx the same forms swap only the
ticket (``#ticket``) so the agent keeps their place, and outbound articles poll their delivery status.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from postdesk.db.models import Article, Direction, Group, OutboundMessage, Ticket, TicketState, User
from postdesk.outbox.queue import (
    Draft,
    DraftError,
    UploadedFile,
    own_addresses,
    parent_article,
    queue_reply,
    recipients_for,
    sending_channel,
)
from postdesk.outbox.sender import retry_delivery, start_sending
from postdesk.tickets.service import (
    AssignmentError,
    NewArticle,
    add_article,
    assign_owner,
    change_state,
    get_ticket,
    move_to_group,
)
from postdesk.web.deps import CurrentUser, RuntimeDep, SessionDep
from postdesk.web.routes.tickets import STATE_LABELS
from postdesk.web.templating import render

router = APIRouter(include_in_schema=False)

ComposerKind = Literal["reply", "reply_all", "forward", "note"]
KIND_LABELS: dict[str, str] = {
    "reply": "Reply",
    "reply_all": "Reply all",
    "forward": "Forward",
    "note": "Note",
}
# Per file and per reply; Exchange Online's own limit for the whole message is 35 MB after encoding.
MAX_UPLOAD_BYTES = 25 * 1024 * 1024


@dataclass
class Composer:
    kind: ComposerKind
    article_id: int | None
    to: str = ""
    cc: str = ""
    body: str = ""
    error: str | None = None
    cannot_send: str | None = None  # why only notes are possible on this ticket


def _ticket_or_404(db: Session, number: int, user: User) -> Ticket:
    ticket = get_ticket(db, number, viewer=user)
    if ticket is None:
        raise HTTPException(status_code=404, detail=f"There is no ticket #{number}, or you cannot see it.")
    return ticket


def _composer(db: Session, ticket: Ticket, kind: ComposerKind, article_id: int | None) -> Composer:
    try:
        sending_channel(db, ticket)
    except DraftError as exc:
        return Composer(kind="note", article_id=None, cannot_send=str(exc))
    if kind == "note":
        return Composer(kind="note", article_id=None)
    try:
        parent = parent_article(ticket, article_id)
    except DraftError:
        parent = parent_article(ticket, None)
    to, cc = recipients_for(ticket, kind, parent, own=own_addresses(db))
    return Composer(kind=kind, article_id=parent.id if parent else None, to=", ".join(to), cc=", ".join(cc))


def _page(
    request: Request, db: Session, user: User, ticket: Ticket, composer: Composer, *, status: int = 200
) -> Response:
    return render(
        request,
        "tickets/view.html",
        {
            "section": "tickets",
            "user": user,
            "ticket": ticket,
            "composer": composer,
            "kind_labels": KIND_LABELS,
            "state_labels": STATE_LABELS,
            "agents": db.scalars(select(User).where(User.is_active).order_by(User.display_name)).all(),
            "groups": db.scalars(select(Group).order_by(Group.name)).all(),
        },
        status_code=status,
    )


@router.get("/tickets/{number}")
def ticket_view(
    request: Request,
    number: int,
    db: SessionDep,
    user: CurrentUser,
    compose: ComposerKind = "reply",
    article: int | None = None,
) -> Response:
    ticket = _ticket_or_404(db, number, user)
    return _page(request, db, user, ticket, _composer(db, ticket, compose, article))


@router.get("/tickets/{number}/compose")
def composer_fragment(
    request: Request,
    number: int,
    db: SessionDep,
    user: CurrentUser,
    kind: ComposerKind = "reply",
    article: int | None = None,
) -> Response:
    """The composer alone, for htmx to swap in when the agent picks Reply, Reply all, Forward or Note."""
    ticket = _ticket_or_404(db, number, user)
    return render(
        request,
        "tickets/_composer.html",
        {"ticket": ticket, "composer": _composer(db, ticket, kind, article), "kind_labels": KIND_LABELS},
    )


@router.post("/tickets/{number}/reply")
async def ticket_reply(
    request: Request,
    number: int,
    db: SessionDep,
    runtime: RuntimeDep,
    user: CurrentUser,
    kind: Annotated[ComposerKind, Form()],
    body: Annotated[str, Form()] = "",
    to: Annotated[str, Form()] = "",
    cc: Annotated[str, Form()] = "",
    article_id: Annotated[int | None, Form()] = None,
    attachments: Annotated[list[UploadFile] | None, File()] = None,
) -> Response:
    ticket = _ticket_or_404(db, number, user)
    composer = Composer(kind=kind, article_id=article_id, to=to, cc=cc, body=body)
    try:
        files = await _uploads(attachments or [])
        if kind == "note":
            article = _add_note(db, ticket, body, user, files)
        else:
            draft = Draft(
                kind=kind,
                body_text=body,
                to=(to,),
                cc=(cc,) if cc.strip() else (),
                attachments=files,
                article_id=article_id,
            )
            article = queue_reply(db, runtime.settings, ticket, draft, author=user)
    except DraftError as exc:
        db.rollback()
        composer.error = str(exc)
        return _page(request, db, user, _ticket_or_404(db, number, user), composer, status=422)
    db.commit()
    if kind != "note":
        start_sending(runtime)
    return RedirectResponse(f"/tickets/{number}#article-{article.id}", status_code=303)


async def _uploads(files: list[UploadFile]) -> tuple[UploadedFile, ...]:
    uploads = []
    for upload in files:
        if not upload.filename:
            continue  # the browser's empty file field
        content = await upload.read(MAX_UPLOAD_BYTES + 1)
        if len(content) > MAX_UPLOAD_BYTES:
            raise DraftError(f"{upload.filename} is larger than {MAX_UPLOAD_BYTES // 2**20} MB.")
        uploads.append(
            UploadedFile(upload.filename, content, upload.content_type or "application/octet-stream")
        )
    return tuple(uploads)


def _add_note(db: Session, ticket: Ticket, body: str, user: User, files: tuple[UploadedFile, ...]) -> Article:
    if not body.strip():
        raise DraftError("The note is empty.")
    if files:
        raise DraftError("Notes cannot carry attachments; send them in a reply, or link to them.")
    return add_article(
        db,
        ticket,
        NewArticle(
            direction=Direction.OUTBOUND,
            internal=True,
            body_text=body.strip(),
            sender=user.display_name,
            author=user,
        ),
    )


@router.post("/tickets/{number}/notes")
def ticket_add_note(number: int, db: SessionDep, user: CurrentUser, body: Annotated[str, Form()]) -> Response:
    ticket = _ticket_or_404(db, number, user)
    if not body.strip():
        raise HTTPException(status_code=422, detail="The note is empty.")
    article = _add_note(db, ticket, body, user, ())
    db.commit()
    return RedirectResponse(f"/tickets/{number}#article-{article.id}", status_code=303)


@router.post("/tickets/{number}/state")
def ticket_change_state(
    number: int, db: SessionDep, user: CurrentUser, state: Annotated[TicketState, Form()]
) -> Response:
    change_state(_ticket_or_404(db, number, user), state)
    db.commit()
    return RedirectResponse(f"/tickets/{number}", status_code=303)


@router.post("/tickets/{number}/properties")
def ticket_properties(
    request: Request,
    number: int,
    db: SessionDep,
    user: CurrentUser,
    state: Annotated[TicketState, Form()],
    owner: Annotated[str, Form()] = "",
    group: Annotated[str, Form()] = "",
    pending_until: Annotated[str, Form()] = "",
) -> Response:
    """State, owner and group in one form; an empty owner or group means none. "Pending reminder" takes
    the reminder time (UTC; empty: a day from now)."""
    ticket = _ticket_or_404(db, number, user)
    new_owner = db.get(User, int(owner)) if owner.isdigit() else None
    new_group = db.get(Group, int(group)) if group.isdigit() else None
    if (owner.isdigit() and new_owner is None) or (group.isdigit() and new_group is None):
        raise HTTPException(status_code=422, detail="That owner or group does not exist (any more).")
    try:
        reminder = _reminder_time(pending_until)
        if ticket.state is not state or (reminder and reminder != ticket.pending_until):
            change_state(ticket, state, pending_until=reminder)
        if ticket.owner_id != (new_owner.id if new_owner else None):
            assign_owner(ticket, new_owner)
    except AssignmentError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    if ticket.group_id != (new_group.id if new_group else None):
        move_to_group(ticket, new_group)
    db.commit()
    # Moving a ticket to a group the agent is not in takes it out of their sight.
    still_visible = get_ticket(db, number, viewer=user) is not None
    if not still_visible and request.headers.get("hx-request"):
        # htmx would follow a 303 inside the XHR and find no #ticket in the list page to swap in,
        # leaving the agent on an empty ticket page: have it load the list instead.
        return Response(status_code=204, headers={"HX-Redirect": "/tickets"})
    return RedirectResponse(f"/tickets/{number}" if still_visible else "/tickets", status_code=303)


def _reminder_time(value: str) -> datetime | None:
    if not value.strip():
        return None
    try:
        return datetime.fromisoformat(value.strip()).replace(tzinfo=UTC)
    except ValueError as exc:
        raise AssignmentError("Give the reminder as a date and time, for example 2026-12-01T09:00.") from exc


def _delivery_or_404(
    db: Session, number: int, article_id: int, user: User
) -> tuple[Article, OutboundMessage]:
    ticket = _ticket_or_404(db, number, user)
    article = next((a for a in ticket.articles if a.id == article_id), None)
    if article is None or article.delivery is None:
        raise HTTPException(status_code=404, detail="That article was not sent by mail.")
    return article, article.delivery


@router.get("/tickets/{number}/articles/{article_id}/delivery")
def delivery_status(
    request: Request, number: int, article_id: int, db: SessionDep, user: CurrentUser
) -> Response:
    """The delivery badge of one outbound article (htmx polls it while the mail is on its way)."""
    article, _delivery = _delivery_or_404(db, number, article_id, user)
    return render(request, "tickets/_delivery.html", {"ticket": article.ticket, "article": article})


@router.post("/tickets/{number}/articles/{article_id}/retry")
def delivery_retry(
    number: int, article_id: int, db: SessionDep, runtime: RuntimeDep, user: CurrentUser
) -> Response:
    _article, delivery = _delivery_or_404(db, number, article_id, user)
    retry_delivery(db, delivery)
    db.commit()
    start_sending(runtime)
    return RedirectResponse(f"/tickets/{number}#article-{article_id}", status_code=303)
