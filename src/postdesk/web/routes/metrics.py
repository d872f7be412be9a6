"""``/metrics`` in Prometheus' text format: mailbox health, tokens, mail ingested, the outbox, tickets.

Labels carry channel IDs, never mailbox addresses, so the endpoint can be scraped without a login from
the monitoring network; put it behind the reverse proxy's access rules like any other internal page.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from postdesk.db.models import (
    Channel,
    ChannelEvent,
    ChannelStatus,
    DeliveryStatus,
    InboundMessage,
    InboundStatus,
    OutboundMessage,
    Ticket,
    TicketState,
)
from postdesk.db.types import utcnow
from postdesk.web.deps import SessionDep

router = APIRouter(include_in_schema=False)


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        rendered = ",".join(f'{key}="{val}"' for key, val in labels.items())
        lines.append(f"{name}{{{rendered}}} {value:g}" if rendered else f"{name} {value:g}")
    return lines


def _channel_metrics(db: Session) -> list[str]:
    channels = db.scalars(select(Channel).order_by(Channel.id)).all()
    status = [
        ({"channel_id": str(c.id), "status": s.value}, float(c.status is s))
        for c in channels
        for s in ChannelStatus
    ]
    fetched = [({"channel_id": str(c.id)}, c.last_fetch_at.timestamp()) for c in channels if c.last_fetch_at]
    failing = [({"channel_id": str(c.id)}, float(c.last_error is not None)) for c in channels]
    refreshes = [({"channel_id": str(c.id)}, float(c.token_refresh_count or 0)) for c in channels]
    token_failures = [({"channel_id": str(c.id)}, float(c.token_failures or 0)) for c in channels]
    return [
        *_family("postdesk_channel_status", "gauge", "1 for the mailbox's current status.", status),
        *_family(
            "postdesk_channel_last_successful_fetch_timestamp_seconds",
            "gauge",
            "When the mailbox was last fetched without an error.",
            fetched,
        ),
        *_family("postdesk_channel_failing", "gauge", "1 while the mailbox's last fetch failed.", failing),
        *_family(
            "postdesk_channel_token_refreshes_total",
            "counter",
            "Refresh tokens redeemed for the mailbox (each keeps its 90-day window open).",
            refreshes,
        ),
        *_family(
            "postdesk_channel_token_failures",
            "gauge",
            "Passing token failures in a row (reset by the next success; escalated when they persist).",
            token_failures,
        ),
        *_family(
            "postdesk_channel_events_total",
            "counter",
            "Events in the mailbox's log by kind: error, send_failed, token-refreshed, recovered, …",
            _event_counts(db),
        ),
    ]


def _event_counts(db: Session) -> list[tuple[dict[str, str], float]]:
    rows = db.execute(
        select(ChannelEvent.channel_id, ChannelEvent.kind, func.count())
        .group_by(ChannelEvent.channel_id, ChannelEvent.kind)
        .order_by(ChannelEvent.channel_id, ChannelEvent.kind)
    )
    return [({"channel_id": str(cid), "kind": kind}, float(count)) for cid, kind, count in rows]


def _outbox_metrics(db: Session) -> list[str]:
    rows = db.execute(select(OutboundMessage.status, func.count()).group_by(OutboundMessage.status))
    counts = {status: count for status, count in rows}
    oldest = db.scalar(
        select(func.min(OutboundMessage.created_at)).where(
            OutboundMessage.status.in_((DeliveryStatus.QUEUED, DeliveryStatus.SENDING))
        )
    )
    age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
    waiting: list[tuple[dict[str, str], float]] = [({}, age)]
    return [
        *_family(
            "postdesk_outbox_messages",
            "gauge",
            "Outbound mail by delivery status (queued and sending are the outbox depth).",
            [({"status": s.value}, float(counts.get(s, 0))) for s in DeliveryStatus],
        ),
        *_family(
            "postdesk_outbox_oldest_waiting_seconds",
            "gauge",
            "Age of the oldest reply not yet accepted by the mail server (0 when none waits).",
            waiting,
        ),
    ]


def _mail_metrics(db: Session) -> list[str]:
    rows = db.execute(
        select(InboundMessage.channel_id, InboundMessage.status, func.count()).group_by(
            InboundMessage.channel_id, InboundMessage.status
        )
    ).all()
    counts = {(channel_id, status): count for channel_id, status, count in rows}
    samples = [
        ({"channel_id": str(cid), "outcome": s.value}, float(counts.get((cid, s), 0)))
        for cid in sorted({cid for cid, _ in counts})
        for s in InboundStatus
    ]
    tickets = {
        state: count for state, count in db.execute(select(Ticket.state, func.count()).group_by(Ticket.state))
    }
    return [
        *_family(
            "postdesk_inbound_messages",
            "gauge",
            "Messages fetched, by what became of them (stored means waiting to be processed).",
            samples,
        ),
        *_family(
            "postdesk_tickets",
            "gauge",
            "Tickets by state.",
            [({"state": s.value}, float(tickets.get(s, 0))) for s in TicketState],
        ),
    ]


@router.get("/metrics")
def metrics(db: SessionDep) -> PlainTextResponse:
    body = "\n".join([*_channel_metrics(db), *_mail_metrics(db), *_outbox_metrics(db)]) + "\n"
    return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")
