"""``/api/v1/quarantine`` (admins): mail that could not become a ticket, and reprocessing it."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from postdesk.db.models import Article, InboundMessage, InboundStatus
from postdesk.ingest.quarantine import reprocess
from postdesk.web.api.deps import ApiAdmin, PageParams, error_responses
from postdesk.web.api.schemas import QuarantinedOut, QuarantinePageOut, ReprocessOut
from postdesk.web.deps import RuntimeDep, SessionDep

router = APIRouter(prefix="/quarantine", tags=["quarantine"], responses=error_responses(401, 403))


@router.get("", summary="List quarantined mail, newest first")
def list_endpoint(
    db: SessionDep, admin: ApiAdmin, paging: PageParams, channel_id: int | None = None
) -> QuarantinePageOut:
    query = select(InboundMessage).where(InboundMessage.status == InboundStatus.QUARANTINED)
    if channel_id is not None:
        query = query.where(InboundMessage.channel_id == channel_id)
    total = db.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = db.scalars(
        query.options(selectinload(InboundMessage.channel))
        .order_by(InboundMessage.id.desc())
        .limit(paging.per_page)
        .offset(paging.offset)
    )
    return QuarantinePageOut(
        items=[
            QuarantinedOut(
                id=row.id,
                channel_id=row.channel_id,
                channel=row.channel.email,
                subject=row.subject,
                sender=row.sender,
                message_id=row.message_id,
                size=row.size,
                reason=row.reason,
                fetched_at=row.fetched_at,
                sha256=row.sha256,
            )
            for row in rows
        ],
        total=total,
        page=paging.page,
        per_page=paging.per_page,
        pages=paging.pages(total),
    )


@router.post(
    "/{message_id}/reprocess",
    summary="Run a quarantined message through the pipeline again",
    responses=error_responses(404),
)
def reprocess_endpoint(message_id: int, db: SessionDep, runtime: RuntimeDep, admin: ApiAdmin) -> ReprocessOut:
    """For example after raising the mailbox's size limit. The answer says whether the message was
    released (`processed`, `duplicate`) or is still in quarantine, with the reason."""
    row, _counts = reprocess(runtime, message_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"Message {message_id} is not in quarantine.")
    article = db.get(Article, row.article_id) if row.article_id is not None else None
    return ReprocessOut(
        id=row.id,
        status=row.status,
        reason=row.reason,
        ticket_number=article.ticket.number if article is not None else None,
    )
