"""Browser sessions: random cookie tokens, stored hashed, with an idle and an absolute lifetime."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, joinedload

from postdesk.db.models import User, WebSession
from postdesk.db.types import utcnow

SESSION_COOKIE = "postdesk_session"
ABSOLUTE_LIFETIME = timedelta(days=7)
IDLE_LIFETIME = timedelta(hours=12)
_TOUCH_AFTER = timedelta(minutes=1)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def start_session(session: Session, user: User) -> str:
    """Create a session for ``user`` and return the cookie value (never stored in clear)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(
        WebSession(
            id=_digest(token),
            user_id=user.id,
            created_at=now,
            last_seen_at=now,
            expires_at=now + ABSOLUTE_LIFETIME,
        )
    )
    return token


def resolve_session(session: Session, token: str | None) -> WebSession | None:
    if not token:
        return None
    row = session.scalar(
        select(WebSession)
        .where(WebSession.id == _digest(token))
        .options(joinedload(WebSession.user).selectinload(User.groups))
    )
    now = utcnow()
    if row is None or row.expires_at <= now or row.last_seen_at + IDLE_LIFETIME <= now:
        return None
    if not row.user.is_active:
        return None
    if now - row.last_seen_at > _TOUCH_AFTER:
        row.last_seen_at = now
    return row


def end_session(session: Session, token: str | None) -> None:
    if token:
        session.execute(delete(WebSession).where(WebSession.id == _digest(token)))


def purge_expired_sessions(session: Session) -> int:
    now = utcnow()
    result = session.execute(
        delete(WebSession).where(
            (WebSession.expires_at <= now) | (WebSession.last_seen_at <= now - IDLE_LIFETIME)
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


def session_id_for(token: str) -> str:
    return _digest(token)
