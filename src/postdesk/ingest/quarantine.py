"""Quarantined mail: listed for admins, downloadable as raw bytes, and reprocessed on request."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from postdesk.db.models import InboundMessage, InboundStatus
from postdesk.ingest.known import RELEASED_BY_ADMIN
from postdesk.ingest.process import ProcessCounts, process_stored
from postdesk.runtime import Runtime


def quarantined(session: Session, *, limit: int = 500) -> list[InboundMessage]:
    query = (
        select(InboundMessage)
        .where(InboundMessage.status == InboundStatus.QUARANTINED)
        .options(selectinload(InboundMessage.channel))
        .order_by(InboundMessage.id.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


def reprocess(
    runtime: Runtime, row_id: int, *, override_loop: bool = True
) -> tuple[InboundMessage | None, ProcessCounts]:
    """Run the pipeline again on a quarantined message (after a fix, a raised limit, a new version).

    Every caller is an admin acting on this one message, having read why it was kept: with
    ``override_loop`` (the default) mail from one of Postdesk's own mailboxes then becomes a ticket, since
    the rules alone would refuse it again forever. The other checks (size, readability, bounces) still
    apply; ``override_loop=False`` applies them all again.
    """
    with runtime.sessions() as session, session.begin():
        row = session.get(InboundMessage, row_id)
        if row is None or row.status is not InboundStatus.QUARANTINED:
            return None, ProcessCounts()
        row.status = InboundStatus.STORED
        # Whoever processes the row next (this call, or a worker first) reads the admin's word here.
        row.reason = RELEASED_BY_ADMIN if override_loop else None
        channel_id = row.channel_id
    counts = process_stored(runtime, channel_id=channel_id)
    with runtime.sessions() as session:
        return session.get(InboundMessage, row_id), counts
