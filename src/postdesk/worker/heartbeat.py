"""Token heartbeat: redeem every mailbox's refresh token at least weekly, even when nothing happens.

Microsoft lets a refresh token lapse after 90 days without use (AADSTS700082). A mailbox that Postdesk
polls redeems it every hour anyway, but a disabled mailbox, or one whose fetches keep failing for other
reasons, would silently lose its sign-in. The heartbeat refreshes any mailbox whose last deliberate
refresh is more than a week old, keeps the rotated token, and turns a refusal into a plain-words status
the admin sees, long before mail stops.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from postdesk.db.models import Channel, ChannelEvent, ChannelStatus
from postdesk.db.types import utcnow
from postdesk.microsoft.identity import MicrosoftIdentity
from postdesk.microsoft.tokens import TokenError, acquire_access_token
from postdesk.runtime import Runtime

log = logging.getLogger(__name__)
REFRESH_EVERY = timedelta(days=7)


def refresh_stale_tokens(runtime: Runtime, *, now: datetime | None = None) -> int:
    """Refresh every signed-in mailbox not refreshed for a week; return how many were refreshed."""
    now = now or utcnow()
    with runtime.sessions() as session:
        due = list(
            session.scalars(
                select(Channel.id).where(
                    Channel.status != ChannelStatus.NEEDS_REAUTH,
                    Channel.token_cache.is_not(None),
                    or_(
                        Channel.token_refreshed_at.is_(None),
                        Channel.token_refreshed_at <= now - REFRESH_EVERY,
                    ),
                )
            )
        )
    return sum(_refresh(runtime, channel_id, now) for channel_id in due)


def _refresh(runtime: Runtime, channel_id: int, now: datetime) -> bool:
    with runtime.sessions() as session, session.begin():
        channel = session.get(Channel, channel_id)
        if channel is None or channel.microsoft_app is None:
            return False
        if channel.token_refreshed_at is not None and channel.token_refreshed_at > now - REFRESH_EVERY:
            return False  # another worker (or a fetch) redeemed it since the list was made
        try:
            acquire_access_token(
                session,
                MicrosoftIdentity(runtime.settings, channel.microsoft_app),
                channel,
                force_refresh=True,
                now=now,
            )
        except TokenError as exc:
            _refused(session, channel, exc)
            return False
        channel.token_refreshed_at = now
        session.add(
            ChannelEvent(
                channel_id=channel.id, kind="token-refreshed", message="Sign-in kept alive (weekly refresh)."
            )
        )
    return True


def _refused(session: Session, channel: Channel, exc: TokenError) -> None:
    # acquire_access_token has already put a refusal that needs a person on the channel row (status,
    # last_error, event) and counted a passing one; the heartbeat only says so in its log.
    if exc.explanation.transient:
        log.info("token refresh for mailbox %s will be retried: %s", channel.id, exc.explanation.title)
    else:
        log.warning("token refresh for mailbox %s refused: %s", channel.id, exc.reference)
