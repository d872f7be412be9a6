"""Connecting mailboxes: the authorization-code sign-in, checked, and turned into a channel.

The sign-in is MSAL's auth-code flow with PKCE (S256), ``state`` and ``nonce``. Postdesk adds what
MSAL leaves to the application: the flow is single-use and bound to the admin's web session, the
id_token's ``tid``, ``aud`` and ``iss`` are checked, and re-authentication must be by the same
mailbox identity, so a channel can never silently switch to another mailbox.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from postdesk.db.models import Channel, ChannelEvent, ChannelStatus, MicrosoftApp, OAuthFlow, User
from postdesk.db.types import utcnow
from postdesk.microsoft.errors import Explanation, IdentityError, explain, support_reference
from postdesk.microsoft.identity import OIDC_SCOPES, MicrosoftIdentity, SignedInAccount, load_cache
from postdesk.security.redact import redact_email_address

log = logging.getLogger(__name__)

Purpose = Literal["connect", "reauth", "admin_consent"]
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
MULTI_TENANT_AUTHORITIES = frozenset({"common", "organizations"})


class SignInError(Exception):
    """A sign-in that did not connect a mailbox; ``title``/``detail`` are for the admin's screen."""

    def __init__(
        self, title: str, detail: str, *, explanation: Explanation | None = None, reference: str | None = None
    ) -> None:
        super().__init__(f"{title}: {detail}")
        self.title = title
        self.detail = detail
        self.explanation = explanation
        self.reference = reference


def identity_failure(err: IdentityError, identity: MicrosoftIdentity) -> SignInError:
    context = {
        "redirect_uri": identity.settings.oauth_redirect_uri,
        "client_id": identity.registration.client_id,
        "tenant": identity.registration.tenant,
    }
    explanation = explain(err, context=context)
    return SignInError(
        explanation.title, explanation.cause, explanation=explanation, reference=support_reference(err)
    )


def current_registration(session: Session) -> MicrosoftApp | None:
    return session.scalar(select(MicrosoftApp).order_by(MicrosoftApp.id.desc()).limit(1))


@dataclass(frozen=True)
class PendingSignIn:
    auth_uri: str
    state: str


def begin_sign_in(
    session: Session,
    identity: MicrosoftIdentity,
    *,
    web_session_id: str,
    purpose: Literal["connect", "reauth"],
    channel: Channel | None = None,
    login_hint: str | None = None,
) -> PendingSignIn:
    """Start a sign-in; the caller redirects the browser to ``auth_uri``."""
    state = secrets.token_urlsafe(32)
    with warnings.catch_warnings():
        # MSAL recommends response_mode=form_post. That would make Microsoft's answer a cross-site POST,
        # which browsers send without the SameSite=Lax session cookie this flow is bound to. The code
        # in the query is single-use and useless without the PKCE verifier and the client credential,
        # both of which never leave this server.
        warnings.filterwarnings("ignore", message="response_mode='form_post' is recommended")
        flow = identity.client().initiate_auth_code_flow(
            scopes=[*identity.scopes, "email"],
            redirect_uri=identity.settings.oauth_redirect_uri,
            state=state,
            prompt="select_account",
            login_hint=login_hint or (channel.account_username if channel else None),
            response_mode="query",
        )
    session.add(
        OAuthFlow(
            state=state,
            web_session_id=web_session_id,
            purpose=purpose,
            channel_id=channel.id if channel else None,
            flow=json.dumps(flow),
        )
    )
    return PendingSignIn(auth_uri=str(flow["auth_uri"]), state=state)


def begin_admin_consent(session: Session, *, web_session_id: str) -> str:
    state = secrets.token_urlsafe(32)
    session.add(
        OAuthFlow(
            state=state,
            web_session_id=web_session_id,
            purpose="admin_consent",
            flow=json.dumps({"state": state}),
        )
    )
    return state


def claim_flow(session: Session, *, state: str | None, web_session_id: str) -> OAuthFlow:
    """Take the pending sign-in for ``state`` exactly once, and only for the browser that started it."""
    if not state:
        raise SignInError(
            "The sign-in response has no state",
            "Start again from Channels › Add account; do not bookmark the Microsoft sign-in page.",
        )
    flow = session.scalar(select(OAuthFlow).where(OAuthFlow.state == state))
    if flow is None or flow.web_session_id != web_session_id:
        raise SignInError(
            "This sign-in was not started here",
            "The response does not belong to a sign-in started from this browser session. "
            "Start again from Channels › Add account.",
        )
    claimed = session.execute(
        update(OAuthFlow).where(OAuthFlow.id == flow.id, OAuthFlow.used_at.is_(None)).values(used_at=utcnow())
    )
    if getattr(claimed, "rowcount", 0) != 1:
        raise SignInError(
            "This sign-in response was already used",
            "Each sign-in can complete once. Start again from Channels › Add account.",
        )
    return flow


@dataclass(frozen=True)
class ConnectResult:
    channel: Channel
    created: bool
    purpose: Purpose


def complete_sign_in(
    session: Session,
    identity: MicrosoftIdentity,
    *,
    flow_row: OAuthFlow,
    params: Mapping[str, str],
    actor: User,
) -> ConnectResult:
    if params.get("error"):
        raise identity_failure(IdentityError.from_redirect(params), identity)
    cache = load_cache(None)
    flow: dict[str, Any] = json.loads(flow_row.flow)
    result = identity.client(cache).acquire_token_by_auth_code_flow(flow, dict(params))
    if "error" in result:
        raise identity_failure(IdentityError.from_token_response(result), identity)
    account = check_id_token(identity, result.get("id_token_claims") or {})
    channel = _channel_for(session, flow_row, account)
    created = channel.id is None
    _store_connection(channel, identity, account, cache.serialize())
    session.add(channel)
    session.flush()
    kind = "connected" if flow_row.purpose == "connect" else "reauthenticated"
    session.add(
        ChannelEvent(
            channel_id=channel.id,
            kind=kind,
            actor_id=actor.id,
            message=f"Signed in as {account.username} ({account.display_name}).",
        )
    )
    log.info("channel %s %s by %s", channel.id, kind, redact_email_address(actor.email))
    purpose: Purpose = "reauth" if flow_row.purpose == "reauth" else "connect"
    return ConnectResult(channel=channel, created=created, purpose=purpose)


def check_id_token(identity: MicrosoftIdentity, claims: Mapping[str, Any]) -> SignedInAccount:
    """What MSAL does not check (RECIPES: it validates nonce and state, not tid, aud or iss)."""
    tenant_id = str(claims.get("tid") or "")
    if claims.get("aud") != identity.registration.client_id:
        raise SignInError(
            "The sign-in was for another app",
            "The id_token's audience is not this app's client ID. Check the Application (client) "
            "ID under Channels › Microsoft 365 app.",
        )
    if not tenant_id or claims.get("iss") != identity.expected_issuer(tenant_id):
        raise SignInError(
            "The sign-in came from an unexpected issuer",
            f"Expected tokens issued by {identity.expected_issuer(tenant_id or '<tenant>')}.",
        )
    _check_tenant(identity, tenant_id)
    username = str(claims.get("preferred_username") or claims.get("email") or claims.get("upn") or "").lower()
    oid = str(claims.get("oid") or "")
    if "@" not in username or not oid:
        raise SignInError(
            "The account has no mailbox address",
            "Microsoft did not return an email address for this account. Sign in with a "
            "work account that has an Exchange Online mailbox.",
        )
    return SignedInAccount(
        oid=oid, tenant_id=tenant_id, username=username, display_name=str(claims.get("name") or username)
    )


def _check_tenant(identity: MicrosoftIdentity, tenant_id: str) -> None:
    configured = identity.registration.tenant.lower()
    if configured in MULTI_TENANT_AUTHORITIES:
        return
    expected = configured if _GUID.match(configured) else _tenant_id_of_domain(identity)
    if tenant_id.lower() != expected.lower():
        raise SignInError(
            "The account belongs to another organisation",
            f"You signed in with an account from tenant {tenant_id}, but the app is configured "
            f"for {identity.registration.tenant}. Sign in with an account of your organisation.",
        )


def _tenant_id_of_domain(identity: MicrosoftIdentity) -> str:
    # The issuer in a tenant's OpenID configuration names the tenant's GUID.
    issuer = str(identity.openid_configuration().get("issuer", ""))
    parts = issuer.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else ""


def _channel_for(session: Session, flow_row: OAuthFlow, account: SignedInAccount) -> Channel:
    if flow_row.purpose == "reauth":
        channel = session.get(Channel, flow_row.channel_id)
        if channel is None:
            raise SignInError("The mailbox was deleted", "The channel you re-authenticated no longer exists.")
        _require_same_mailbox(channel, account)
        return channel
    existing = session.scalar(select(Channel).where(Channel.email == account.username))
    if existing is not None:
        # Connecting an already connected mailbox again is a re-authentication of it.
        _require_same_mailbox(existing, account)
        return existing
    return Channel(email=account.username, display_name=account.display_name)


def _require_same_mailbox(channel: Channel, account: SignedInAccount) -> None:
    same_identity = channel.account_oid is None or channel.account_oid == account.oid
    if not same_identity or channel.email != account.username:
        raise SignInError(
            "You signed in as a different mailbox",
            f"This channel is {channel.email}, but you signed in as {account.username}. Nothing was changed. "
            f"Choose “Re-authenticate” again and pick {channel.email} in Microsoft's account list "
            "(use “Use another account” if it is not shown).",
        )


def _store_connection(
    channel: Channel, identity: MicrosoftIdentity, account: SignedInAccount, cache: str
) -> None:
    now = utcnow()
    channel.microsoft_app_id = identity.registration.id
    channel.tenant_id = account.tenant_id
    channel.account_oid = account.oid
    channel.account_username = account.username
    channel.display_name = channel.display_name or account.display_name
    channel.token_cache = cache
    channel.status = ChannelStatus.OK
    channel.connected_at = now
    channel.token_refreshed_at = now
    channel.last_error = None
    channel.last_error_at = None


def requested_scopes(identity: MicrosoftIdentity) -> list[str]:
    return [*identity.scopes, *OIDC_SCOPES]
