"""Connecting mailboxes: the authorization-code sign-in, checked, and turned into a channel.

The sign-in is MSAL's auth-code flow with PKCE (S256), ``state`` and ``nonce``. Postdesk adds what
MSAL leaves to the application: the flow is single-use and bound to the admin's web session, the
id_token's ``tid``, ``aud`` and ``iss`` are checked, and re-authentication must be by the same
mailbox identity, so a channel can never silently switch to another mailbox.

A shared mailbox has no account of its own: a delegate with FullAccess (and SendAs, to reply) signs in,
and Postdesk opens the shared address with the delegate's token, as Exchange Online allows. Whether the
delegation is in place is checked by opening the mailbox right after the sign-in; when it is not, the
admin is shown the PowerShell commands that grant it. Any delegate may re-authenticate a shared mailbox
(the event log names the previous and the new one); the mailbox itself never changes.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from postdesk.db.models import (
    Channel,
    ChannelEvent,
    ChannelStatus,
    MicrosoftApp,
    OAuthFlow,
    Transport,
    User,
)
from postdesk.db.types import utcnow
from postdesk.microsoft.audit import record_delegate_change
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


class DelegationMissing(SignInError):
    """The delegate signed in but cannot open the shared mailbox: the admin must grant the rights."""

    def __init__(self, *, shared: str, delegate: str, problem: str, channel_id: int | None) -> None:
        super().__init__(
            f"{delegate} cannot open the shared mailbox {shared}",
            f"Postdesk signed in as {delegate} and tried to open {shared}: {problem}",
        )
        self.shared = shared
        self.delegate = delegate
        self.problem = problem
        self.channel_id = channel_id

    @property
    def commands(self) -> list[str]:
        return delegation_commands(self.shared, self.delegate)


def delegation_commands(shared: str, delegate: str) -> list[str]:
    """Exchange Online PowerShell that lets ``delegate`` read (FullAccess) and send as (SendAs) ``shared``.

    AutoMapping is off so that Outlook does not add the mailbox to the delegate's own profile.
    """
    return [
        f"Add-MailboxPermission -Identity {shared} -User {delegate} "
        "-AccessRights FullAccess -AutoMapping $false",
        f"Add-RecipientPermission -Identity {shared} -Trustee {delegate} "
        "-AccessRights SendAs -Confirm:$false",
    ]


@dataclass(frozen=True)
class MailboxChoice:
    """What "Add account" asked: whose mailbox, and the transport. Kept with the pending sign-in."""

    shared_address: str | None = None
    transport: Transport = Transport.IMAP

    @property
    def shared(self) -> bool:
        return self.shared_address is not None

    def as_json(self) -> dict[str, str | None]:
        return {"shared_address": self.shared_address, "transport": self.transport.value}

    @classmethod
    def from_json(cls, stored: Mapping[str, Any] | None) -> MailboxChoice:
        stored = stored or {}
        address = stored.get("shared_address")
        return cls(
            shared_address=str(address).lower() if address else None,
            transport=Transport(stored.get("transport") or "imap"),
        )

    @classmethod
    def of_channel(cls, channel: Channel) -> MailboxChoice:
        return cls(shared_address=channel.email if channel.shared else None, transport=channel.transport)


# Opens ``mailbox`` over ``transport`` with ``access_token``: None when it worked, else what went wrong.
AccessCheck = Callable[[Transport, str, str], "str | None"]
# Where the choice rides along in the stored MSAL flow dict (taken out before MSAL sees the dict).
_CHOICE_KEY = "postdesk_mailbox"


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
    choice: MailboxChoice | None = None,
) -> PendingSignIn:
    """Start a sign-in; the caller redirects the browser to ``auth_uri``.

    A re-authentication keeps the channel's own choice (shared or not, transport) whatever is asked.
    """
    choice = MailboxChoice.of_channel(channel) if channel is not None else (choice or MailboxChoice())
    state = secrets.token_urlsafe(32)
    with warnings.catch_warnings():
        # MSAL recommends response_mode=form_post. That would make Microsoft's answer a cross-site POST,
        # which browsers send without the SameSite=Lax session cookie this flow is bound to. The code
        # in the query is single-use and useless without the PKCE verifier and the client credential,
        # both of which never leave this server.
        warnings.filterwarnings("ignore", message="response_mode='form_post' is recommended")
        flow = identity.client().initiate_auth_code_flow(
            scopes=[*identity.endpoints.scopes_for(choice.transport.value), "email"],
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
            flow=json.dumps({**flow, _CHOICE_KEY: choice.as_json()}),
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
    check_access: AccessCheck | None = None,
) -> ConnectResult:
    """Redeem the code and connect (or re-authenticate) the mailbox.

    For a shared mailbox ``check_access`` must open it with the fresh token; a new channel whose check
    fails is saved as needing attention and ``DelegationMissing`` raised after it is flushed (the caller
    commits it, so that "Check again" has a sign-in to use); a re-authentication whose check fails
    changes nothing.
    """
    if params.get("error"):
        raise identity_failure(IdentityError.from_redirect(params), identity)
    cache = load_cache(None)
    flow: dict[str, Any] = json.loads(flow_row.flow)
    choice = MailboxChoice.from_json(flow.pop(_CHOICE_KEY, None))
    result = identity.client(cache).acquire_token_by_auth_code_flow(flow, dict(params))
    if "error" in result:
        raise identity_failure(IdentityError.from_token_response(result), identity)
    account = check_id_token(identity, result.get("id_token_claims") or {})
    channel = _channel_for(session, flow_row, account, choice)
    created = channel.id is None
    problem = _delegation_problem(
        channel, account, choice, str(result.get("access_token") or ""), check_access
    )
    if problem is not None and not created:
        raise DelegationMissing(
            shared=channel.email, delegate=account.username, problem=problem, channel_id=channel.id
        )
    previous = (channel.account_username, channel.account_oid)
    _store_connection(channel, identity, account, cache.serialize())
    session.add(channel)
    session.flush()
    kind = "connected" if created else "reauthenticated"
    _record_sign_in(session, channel, account, actor, kind=kind, previous=previous)
    log.info("channel %s %s by %s", channel.id, kind, redact_email_address(actor.email))
    if problem is not None:
        _needs_delegation(session, channel, account, problem)
        raise DelegationMissing(
            shared=channel.email, delegate=account.username, problem=problem, channel_id=channel.id
        )
    purpose: Purpose = "reauth" if flow_row.purpose == "reauth" else "connect"
    return ConnectResult(channel=channel, created=created, purpose=purpose)


def _delegation_problem(
    channel: Channel,
    account: SignedInAccount,
    choice: MailboxChoice,
    access_token: str,
    check_access: AccessCheck | None,
) -> str | None:
    if not channel.shared or check_access is None:
        return None
    return check_access(choice.transport, channel.email, access_token)


def _record_sign_in(
    session: Session,
    channel: Channel,
    account: SignedInAccount,
    actor: User,
    *,
    kind: str,
    previous: tuple[str | None, str | None],
) -> None:
    if channel.shared:
        message = f"Signed in as {account.username} ({account.display_name}), a delegate of {channel.email}."
    else:
        message = f"Signed in as {account.username} ({account.display_name})."
    session.add(ChannelEvent(channel_id=channel.id, kind=kind, actor_id=actor.id, message=message))
    previous_username, previous_oid = previous
    if channel.shared and previous_oid is not None and previous_oid != account.oid:
        record_delegate_change(
            session,
            channel,
            previous=previous_username or previous_oid,
            current=account.username,
            actor=actor,
        )


def _needs_delegation(session: Session, channel: Channel, account: SignedInAccount, problem: str) -> None:
    channel.status = ChannelStatus.ERROR
    channel.last_error = (
        f"{account.username} cannot open the shared mailbox {channel.email} ({problem}). "
        "Grant FullAccess and SendAs (Channels › the mailbox › Check again shows the commands)."
    )
    channel.last_error_at = utcnow()


def verify_delegation(channel: Channel, access_token: str, check_access: AccessCheck) -> str | None:
    """Open the channel's shared mailbox again ("Check again"): None when it worked."""
    return check_access(channel.transport, channel.email, access_token)


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


def _channel_for(
    session: Session, flow_row: OAuthFlow, account: SignedInAccount, choice: MailboxChoice
) -> Channel:
    if flow_row.purpose == "reauth":
        channel = session.get(Channel, flow_row.channel_id)
        if channel is None:
            raise SignInError("The mailbox was deleted", "The channel you re-authenticated no longer exists.")
        _require_same_mailbox(channel, account)
        return channel
    address = choice.shared_address or account.username
    existing = session.scalar(select(Channel).where(Channel.email == address))
    if existing is not None:
        # Connecting an already connected mailbox again is a re-authentication of it.
        if existing.shared != choice.shared:
            raise SignInError(
                "This mailbox is already connected another way",
                f"{address} is connected as {'a shared' if existing.shared else 'a user'} mailbox. "
                "Nothing was changed. Use “Re-authenticate” on its row instead.",
            )
        _require_same_mailbox(existing, account)
        return existing
    if choice.shared_address is not None:
        return Channel(
            email=choice.shared_address,
            display_name=choice.shared_address.split("@")[0],
            shared=True,
            transport=choice.transport,
        )
    return Channel(email=account.username, display_name=account.display_name, transport=choice.transport)


def _require_same_mailbox(channel: Channel, account: SignedInAccount) -> None:
    if channel.shared:
        # Any delegate may sign in for a shared mailbox; opening it afterwards shows whether it may.
        return
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
    if not channel.shared:
        channel.display_name = channel.display_name or account.display_name
    channel.token_cache = cache
    channel.status = ChannelStatus.OK
    channel.connected_at = now
    channel.token_refreshed_at = now
    channel.last_error = None
    channel.last_error_at = None


def requested_scopes(identity: MicrosoftIdentity) -> list[str]:
    return [*identity.scopes, *OIDC_SCOPES]
