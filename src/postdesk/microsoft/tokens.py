"""Access tokens for a channel's mailbox, from its own MSAL token cache.

MSAL answers from the cache while the access token has more than five minutes left and otherwise
redeems the refresh token. Whenever MSAL changed the cache (a new access token, a rotated refresh
token) the caller's transaction stores it encrypted before the token is used, so a rotated refresh
token is never lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from postdesk.db.models import Channel
from postdesk.db.types import utcnow
from postdesk.microsoft.errors import Explanation, IdentityError, Remedy, explain, support_reference
from postdesk.microsoft.identity import MicrosoftIdentity, load_cache


@dataclass(frozen=True)
class AccessToken:
    value: str
    expires_at: datetime

    def __repr__(self) -> str:  # never print the token itself
        return f"AccessToken(expires_at={self.expires_at.isoformat()})"


class TokenError(Exception):
    def __init__(self, explanation: Explanation, reference: str) -> None:
        super().__init__(f"{explanation.title} ({reference})")
        self.explanation = explanation
        self.reference = reference


NO_ACCOUNT = Explanation(
    title="No sign-in stored for this mailbox",
    cause="Postdesk holds no refresh token for this mailbox, so it cannot get an access token.",
    fix="Open Channels, choose Re-authenticate for this mailbox and sign in as the mailbox.",
    remedy=Remedy.REAUTHENTICATE,
    transient=False,
    channel_status="needs_reauth",
)


def _account_for(app: Any, channel: Channel) -> dict[str, Any] | None:
    for account in app.get_accounts():
        if account.get("local_account_id") == channel.account_oid:
            found: dict[str, Any] = account
            return found
    return None


def acquire_access_token(
    session: Session, identity: MicrosoftIdentity, channel: Channel, *, force_refresh: bool = False
) -> AccessToken:
    cache = load_cache(channel.token_cache)
    app = identity.client(cache)
    account = _account_for(app, channel)
    if account is None:
        raise TokenError(NO_ACCOUNT, "no account in the token cache")
    result = app.acquire_token_silent_with_error(identity.scopes, account, force_refresh=force_refresh)
    if cache.has_state_changed:
        channel.token_cache = cache.serialize()
        session.flush()
    if not result:
        raise TokenError(NO_ACCOUNT, "no refresh token in the token cache")
    if "error" in result:
        err = IdentityError.from_token_response(result)
        raise TokenError(explain(err), support_reference(err))
    expires_in = int(result.get("expires_in") or 0)
    return AccessToken(value=str(result["access_token"]), expires_at=utcnow() + timedelta(seconds=expires_in))
