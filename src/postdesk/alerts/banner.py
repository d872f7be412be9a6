"""The "needs attention" banner admins see on every page: open alerts, and mailboxes that stopped.

Two small queries per page. A mailbox's status is read live, so a mailbox that breaks shows at once and
one that was just re-authenticated disappears at once, without waiting for the alerts job.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from postdesk.alerts.conditions import CONDITION_COLUMNS, CRITICAL, Kind, attention_condition, fix_for
from postdesk.db.models import Alert, Channel, ChannelStatus

_LIVE_KINDS = (Kind.NEEDS_REAUTH.value, Kind.CHANNEL_ERROR.value)
_LIMIT = 20


@dataclass(frozen=True)
class AttentionItem:
    severity: str
    title: str
    page_url: str
    fix_label: str
    fix_url: str


def attention_items(session: Session) -> list[AttentionItem]:
    stopped = session.scalars(
        select(Channel)
        .options(CONDITION_COLUMNS)
        .where(Channel.status.in_((ChannelStatus.NEEDS_REAUTH, ChannelStatus.ERROR)))
        .order_by(Channel.email)
        .limit(_LIMIT)
    ).all()
    live = [condition for channel in stopped if (condition := attention_condition(channel)) is not None]
    items = [_item(c.severity, c.title, c.kind.value, c.channel_id) for c in live]
    alerts = session.execute(
        select(Alert.severity, Alert.title, Alert.kind, Alert.channel_id)
        .where(Alert.resolved_at.is_(None), Alert.kind.not_in(_LIVE_KINDS))
        .order_by(Alert.created_at, Alert.id)
        .limit(_LIMIT)
    ).all()
    items += [_item(severity, title, kind, channel_id) for severity, title, kind, channel_id in alerts]
    return sorted(items, key=lambda item: item.severity != CRITICAL)


def _item(severity: str, title: str, kind: str, channel_id: int | None) -> AttentionItem:
    fix = fix_for(kind, channel_id)
    return AttentionItem(severity, title, fix.page_url, fix.label, fix.url)
