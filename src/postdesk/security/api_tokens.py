"""Personal REST API tokens: created with the secret shown once, checked by hash, revoked by their owner.

A token is ``pd_`` and 40 URL-safe random characters (240 bits). Only its SHA-256 is stored, so a
copy of the database lets nobody call the API. The ``pd_`` prefix lets secret scanners and the log
filter recognise a leaked token.

A token's scope narrows, never widens, what its owner may do: a ``read`` token may only use the safe
HTTP methods, a ``write`` token whatever the owner's role allows. Roles are checked separately, so an
agent's write token still cannot reach an administrator's endpoints.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from postdesk.db.models import ApiToken, User
from postdesk.db.types import utcnow

TOKEN_PREFIX = "pd_"  # noqa: S105 - a marker, not a secret
TOKEN_LENGTH = len(TOKEN_PREFIX) + 40
SHOWN_PREFIX_LENGTH = 10  # "pd_" and 7 random characters: enough to tell tokens apart, useless to guess
NAME_LENGTH = 200
# Writing last_used_at on every request would turn each API read into a write; a minute is precise enough.
LAST_USED_PRECISION = timedelta(minutes=1)
# RFC 9110's safe methods: the only ones a read-only token may use.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class TokenScope(enum.StrEnum):
    READ = "read"  # safe methods only
    WRITE = "write"  # whatever the owner's role allows


class TokenError(ValueError):
    """A token request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class CreatedToken:
    token: ApiToken
    secret: str  # shown once, never stored


@dataclass(frozen=True)
class TokenCheck:
    user: User | None
    reason: str | None = None
    scope: str = TokenScope.READ  # the token's scope once it is accepted; read when it is not


def parse_scope(value: str) -> TokenScope:
    """The scope a person asked for, or a ``TokenError`` that lists the choices."""
    value = value.strip().lower()
    if not value:
        raise TokenError("choose the token's access: read only, or read and write")
    try:
        return TokenScope(value)
    except ValueError:
        raise TokenError(f"unknown scope {value!r}; choose read or write") from None


def scope_allows(scope: str, method: str) -> bool:
    """Whether a token of ``scope`` may make a request with this HTTP method.

    Anything but an exact ``write`` counts as read only, so a scope value this code does not know
    (a row edited by hand, a scope added by a later version) fails closed.
    """
    return scope == TokenScope.WRITE or method.upper() in SAFE_METHODS


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(
    session: Session,
    user: User,
    *,
    name: str,
    scope: str = TokenScope.WRITE,
    expires_at: datetime | None = None,
) -> CreatedToken:
    name = name.strip()
    if not name:
        raise TokenError("give the token a name, so you can tell it apart later")
    if len(name) > NAME_LENGTH:
        raise TokenError(f"the name is longer than {NAME_LENGTH} characters")
    if not user.is_active:
        raise TokenError(f"{user.email} is deactivated and cannot have API tokens")
    if expires_at is not None and expires_at <= utcnow():
        raise TokenError("the expiry date is in the past")
    chosen_scope = parse_scope(scope)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(30)  # 30 bytes are exactly 40 characters
    token = ApiToken(
        user_id=user.id,
        name=name,
        token_hash=hash_secret(secret),
        prefix=secret[:SHOWN_PREFIX_LENGTH],
        scope=chosen_scope.value,
        created_at=utcnow(),
        expires_at=expires_at,
    )
    session.add(token)
    session.flush()
    return CreatedToken(token=token, secret=secret)


def authenticate(session: Session, secret: str, *, now: datetime | None = None) -> TokenCheck:
    """The active person a token belongs to, or why it is refused.

    The lookup is by SHA-256 of the presented token, never by comparing secrets: how long a
    database index takes to find a hash tells an attacker nothing about any real token.
    Updates ``last_used_at`` (at most once a minute) without committing; the caller commits.
    """
    now = now or utcnow()
    if not secret.startswith(TOKEN_PREFIX) or len(secret) != TOKEN_LENGTH:
        return TokenCheck(None, "This is not a Postdesk API token.")
    query = select(ApiToken).where(ApiToken.token_hash == hash_secret(secret))
    token = session.scalar(query.options(selectinload(ApiToken.user)))
    if token is None:
        return TokenCheck(None, "Unknown API token.")
    if token.revoked_at is not None:
        return TokenCheck(None, "This API token was revoked.")
    if token.expires_at is not None and token.expires_at <= now:
        return TokenCheck(None, "This API token has expired; create a new one.")
    if not token.user.is_active:
        return TokenCheck(None, "The owner of this API token is deactivated.")
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_PRECISION:
        token.last_used_at = now
    return TokenCheck(token.user, scope=token.scope)


def list_tokens(session: Session, *, user: User | None = None) -> list[ApiToken]:
    """Tokens newest first: one person's, or (``user=None``) everybody's."""
    query = select(ApiToken).options(selectinload(ApiToken.user)).order_by(ApiToken.id.desc())
    if user is not None:
        query = query.where(ApiToken.user_id == user.id)
    return list(session.scalars(query))


def revoke_token(session: Session, token_id: int, *, owner: User | None = None) -> ApiToken | None:
    """Revoke a token (idempotent). With ``owner``, only that person's token is found."""
    token = session.get(ApiToken, token_id)
    if token is None or (owner is not None and token.user_id != owner.id):
        return None
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    return token


def token_status(token: ApiToken, *, now: datetime | None = None) -> str:
    """``active``, ``expired`` or ``revoked``: what a list shows next to each token."""
    now = now or utcnow()
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= now:
        return "expired"
    return "active"
