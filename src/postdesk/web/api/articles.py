"""``/api/v1/tickets/{number}/replies`` and ``/notes``: answering the customer, noting for colleagues."""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, HTTPException

from postdesk.db.models import Direction
from postdesk.outbox.queue import Draft, DraftError, UploadedFile, queue_reply
from postdesk.tickets.service import NewArticle, add_article
from postdesk.web.api.deps import ApiUser, error_responses
from postdesk.web.api.schemas import ArticleOut, AttachmentIn, NoteIn, ReplyIn, article_out
from postdesk.web.api.tickets import visible_ticket_or_404
from postdesk.web.deps import RuntimeDep, SessionDep

router = APIRouter(prefix="/tickets/{number}", tags=["articles"], responses=error_responses(401, 403, 404))


@router.post("/replies", status_code=201, summary="Reply to the customer (queued for sending)")
def reply_endpoint(
    number: int, body: ReplyIn, db: SessionDep, runtime: RuntimeDep, user: ApiUser
) -> ArticleOut:
    """The reply is stored and its mail queued in one step; `delivery.status` starts as `queued` and
    the worker sends it through the ticket's mailbox. Poll `GET /tickets/{number}` to follow it."""
    ticket = visible_ticket_or_404(db, number, user)
    draft = Draft(
        kind=body.kind,
        body_text=body.body,
        to=tuple(body.to) if body.to is not None else None,
        cc=tuple(body.cc) if body.cc is not None else None,
        attachments=tuple(_decoded(attachment) for attachment in body.attachments),
        article_id=body.article_id,
    )
    try:
        article = queue_reply(db, runtime.settings, ticket, draft, author=user)
    except DraftError as exc:
        db.rollback()
        raise HTTPException(status_code=422, detail=str(exc)) from None
    db.commit()
    return article_out(article)


def _decoded(attachment: AttachmentIn) -> UploadedFile:
    try:
        content = base64.b64decode(attachment.content_base64, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(
            status_code=422, detail=f"The attachment {attachment.filename!r} is not valid base64."
        ) from None
    return UploadedFile(filename=attachment.filename, content=content, content_type=attachment.content_type)


@router.post("/notes", status_code=201, summary="Add an internal note")
def note_endpoint(number: int, body: NoteIn, db: SessionDep, user: ApiUser) -> ArticleOut:
    """An internal article, visible to agents only; never mailed."""
    ticket = visible_ticket_or_404(db, number, user)
    if not body.body.strip():
        raise HTTPException(status_code=422, detail="The note is empty.")
    article = add_article(
        db,
        ticket,
        NewArticle(
            direction=Direction.OUTBOUND,
            internal=True,
            body_text=body.body.strip(),
            sender=user.display_name,
            author=user,
        ),
    )
    db.commit()
    return article_out(article)
