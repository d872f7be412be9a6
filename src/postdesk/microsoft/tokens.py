"""Access tokens for a channel's mailbox, from its own MSAL token cache.

MSAL answers from the cache while the access token has more than five minutes left and otherwise
redeems the refresh token. Whenever MSAL changed the cache (a new access token, a rotated refresh
token) the caller's transaction stores it encrypted before the token is used, so a rotated refresh
token is never lost.

One mailbox's refresh token is redeemed by one thread at a time: a lock per channel in the process,
held from reading the cache until the transaction that stores the new one ends, and on PostgreSQL a
row lock (``SELECT … FOR UPDATE``) that makes other processes wait and then read the rotated token.

Every failure is classified. One that needs a person sets the channel's status and ``last_error``
right away; a passing one (network, Microsoft's 5xx or throttling) is counted, and only when it
persists (``ESCALATE_AFTER``, ``ESCALATE_COUNT``) does the admin hear about it. That bookkeeping is
committed on its own, whatever the caller then does with its transaction. When Microsoft answers a
passing failure with ``Retry-After``, this process does not ask for that mailbox again before then.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import requests
from msal.exceptions import MsalServiceError
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, SessionTransaction

from postdesk.db.models import Channel, ChannelEvent, ChannelStatus, Transport
from postdesk.db.types import utcnow
from postdesk.microsoft.errors import Explanation, IdentityError, Remedy, explain, support_reference
from postdesk.microsoft.identity import MicrosoftIdentity, UnreadableAnswer, load_cache


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


UNREACHABLE = Explanation(
    title="Microsoft's sign-in service could not be reached",
    cause="The request for a new access token failed on the network or with a server error.",
    fix="Nothing to do if it passes; Postdesk retries with increasing pauses. If it persists, check that "
    "this server can reach the identity platform (DNS, firewall, proxy, POSTDESK_CA_BUNDLE).",
    remedy=Remedy.RETRY,
    transient=True,
    channel_status="ok",
)
UNREADABLE = Explanation(
    title="Microsoft's sign-in service gave an answer Postdesk could not read",
    cause="The request for a new access token was answered with something other than Microsoft's JSON, "
    "often an error page from a proxy or firewall, or a reply cut off on the way.",
    fix="Nothing to do if it passes; Postdesk retries with increasing pauses. If it persists, check for a "
    "proxy or firewall between this server and the identity platform that answers in its place.",
    remedy=Remedy.RETRY,
    transient=True,
    channel_status="ok",
)
ASKED_TO_WAIT = Explanation(
    title="Microsoft asked Postdesk to wait before asking for a new access token",
    cause="The last request for this mailbox's token was throttled or refused for now, with a Retry-After "
    "time; asking again earlier would only prolong it.",
    fix="Nothing to do; Postdesk asks again once the time has passed.",
    remedy=Remedy.RETRY,
    transient=True,
    channel_status="ok",
)
BUSY = Explanation(
    title="Another refresh of this mailbox's sign-in is in progress",
    cause="A different task of this process is redeeming the same refresh token.",
    fix="Nothing to do; the next attempt uses the token it gets.",
    remedy=Remedy.RETRY,
    transient=True,
    channel_status="ok",
)
# A passing failure becomes the admin's business when it lasts this long and happened this often.
ESCALATE_AFTER = timedelta(hours=2)
ESCALATE_COUNT = 5
LOCK_WAIT_SECONDS = 60.0
# The longest Retry-After honoured (as MSAL caps it); a longer one is most likely a mistake.
MAX_RETRY_AFTER = timedelta(hours=1)
TOKEN_LOCK_NAMESPACE = 0x7064  # "pd": keeps Postdesk's advisory locks apart from other users of the database

log = logging.getLogger(__name__)
_locks_guard = threading.Lock()
_locks: dict[int, threading.RLock] = {}
# Per channel: no token request before this time, as Microsoft's Retry-After asked.
_not_before: dict[int, datetime] = {}


def _channel_lock(channel_id: int) -> threading.RLock:
    with _locks_guard:
        return _locks.setdefault(channel_id, threading.RLock())


def acquire_access_token(
    session: Session,
    identity: MicrosoftIdentity,
    channel: Channel,
    *,
    force_refresh: bool = False,
    now: datetime | None = None,
) -> AccessToken:
    """An access token for ``channel``'s mailbox, redeeming its refresh token if needed (serialised per
    channel). Raises ``TokenError``; its failure bookkeeping on the channel row is already committed.

    While a Retry-After from Microsoft is running it raises at once, without asking Microsoft and
    without counting another failure.

    An app-only channel (``channel.app_only``) gets the app's own token through the client
    credentials flow instead: see ``_acquire_app_token``."""
    now = now or utcnow()
    _wait_as_asked(channel.id, now)
    if channel.app_only:
        return _acquire_app_token(session, identity, channel, force_refresh=force_refresh, now=now)
    lock = _channel_lock(channel.id)
    if not lock.acquire(timeout=LOCK_WAIT_SECONDS):
        raise TokenError(BUSY, "refresh in progress")
    held_until_transaction_ends = False
    try:
        _lock_row(session, channel)
        before = channel.token_cache
        try:
            token = _redeem(session, identity, channel, force_refresh=force_refresh)
        except TokenError as exc:
            exc = _note_retry_after(channel.id, exc, identity.retry_after, now)
            raise _note_failure(session, channel.id, exc, now) from exc
        _not_before.pop(channel.id, None)
        _note_success(channel, redeemed=channel.token_cache != before, now=now)
        if channel.token_cache != before:
            # Keep other threads out until the rotated token is committed (or rolled back).
            _release_when_transaction_ends(session, lock)
            held_until_transaction_ends = True
        return token
    finally:
        if not held_until_transaction_ends:
            lock.release()


def _acquire_app_token(
    session: Session, identity: MicrosoftIdentity, channel: Channel, *, force_refresh: bool, now: datetime
) -> AccessToken:
    """The app's own access token for an app-only channel (client credentials, certificate or secret).

    No lock and nothing written on success: there is no refresh token to redeem or rotate, and MSAL
    keeps the token in its in-memory app cache (``MicrosoftIdentity.acquire_token_for_client``).
    Failures are recorded on the channel as for a sign-in."""
    try:
        token = _app_token(identity, channel, force_refresh=force_refresh)
    except TokenError as exc:
        exc = _note_retry_after(channel.id, exc, identity.retry_after, now)
        raise _note_failure(session, channel.id, exc, now) from exc
    _not_before.pop(channel.id, None)
    _note_success(channel, redeemed=False, now=now)
    return token


def _app_token(identity: MicrosoftIdentity, channel: Channel, *, force_refresh: bool) -> AccessToken:
    return app_access_token(identity, force_refresh=force_refresh, transport=channel.transport)


def app_resource(identity: MicrosoftIdentity, transport: Transport) -> str:
    """The resource an app-only token is for: Microsoft Graph, or for IMAP and SMTP the Outlook resource
    (Office 365 Exchange Online), whose token carries the roles IMAP.AccessAsApp and SMTP.SendAsApp."""
    cloud = identity.endpoints.cloud
    return cloud.graph_url if transport is Transport.GRAPH else cloud.outlook_resource


def app_access_token(
    identity: MicrosoftIdentity, *, force_refresh: bool = False, transport: Transport = Transport.GRAPH
) -> AccessToken:
    """The app's own token (client credentials) for ``transport``'s resource. Raises ``TokenError``,
    recording nothing: for checks made before a channel exists."""
    try:
        result = identity.acquire_token_for_client(
            app_resource(identity, transport), force_refresh=force_refresh
        )
    except UnreadableAnswer as exc:  # before RequestException, of which it is one
        raise TokenError(UNREADABLE, str(exc)) from exc
    except (requests.RequestException, ValueError, MsalServiceError) as exc:
        raise TokenError(UNREACHABLE, _network_failure(exc, identity.http_timeout)) from exc
    if "error" in result or "access_token" not in result:
        err = IdentityError.from_token_response(result)
        raise TokenError(explain(err), support_reference(err))
    expires_in = int(result.get("expires_in") or 0)
    return AccessToken(value=str(result["access_token"]), expires_at=utcnow() + timedelta(seconds=expires_in))


def _lock_row(session: Session, channel: Channel) -> None:
    """On PostgreSQL, wait for any other process redeeming this channel's token and read what it stored.

    A transaction-scoped advisory lock rather than ``FOR UPDATE`` on the channel row: the failure
    bookkeeping writes that row from a second transaction, which a row lock of our own would block.
    (SQLite has no such locks; one process per SQLite database is the rule, and the thread lock holds.)
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(TOKEN_LOCK_NAMESPACE, channel.id)))
    if channel in session and not session.is_modified(channel):
        session.refresh(channel, attribute_names=["token_cache"])


def _redeem(
    session: Session, identity: MicrosoftIdentity, channel: Channel, *, force_refresh: bool
) -> AccessToken:
    cache = load_cache(channel.token_cache)
    try:
        app = identity.client(cache)  # reads the tenant's OpenID configuration: network
        account = _account_for(app, channel)
        if account is None:
            raise TokenError(NO_ACCOUNT, "no account in the token cache")
        result = app.acquire_token_silent_with_error(
            identity.scopes_for(channel.transport), account, force_refresh=force_refresh
        )
    except UnreadableAnswer as exc:  # before RequestException, of which it is one
        raise TokenError(UNREADABLE, str(exc)) from exc
    except (requests.RequestException, ValueError, MsalServiceError) as exc:
        # A refused connection, a timeout, a failed TLS handshake, an answer that is not JSON, or a
        # 5xx that MSAL raises for.
        raise TokenError(UNREACHABLE, _network_failure(exc, identity.http_timeout)) from exc
    if not result:
        raise TokenError(NO_ACCOUNT, "no refresh token in the token cache")
    if "error" in result:
        err = IdentityError.from_token_response(result)
        raise TokenError(explain(err), support_reference(err))
    # Only now: on a failure MSAL has merely dropped expired access tokens, and writing that to the row
    # would hold the database lock that the failure bookkeeping's own transaction then waits for.
    if cache.has_state_changed:
        channel.token_cache = cache.serialize()
        session.flush()
    expires_in = int(result.get("expires_in") or 0)
    return AccessToken(value=str(result["access_token"]), expires_at=utcnow() + timedelta(seconds=expires_in))


def _network_failure(exc: Exception, timeout: float) -> str:
    """What went wrong on the way to the identity platform, in a few words for the status line."""
    if isinstance(exc, MsalServiceError):
        return str(exc)  # "HTTP Error: 503"
    if isinstance(exc, requests.Timeout):
        return f"{exc.__class__.__name__}: no answer within {timeout:g} seconds"
    tls = _tls_error(exc)
    if isinstance(tls, ssl.SSLCertVerificationError):
        return f"the server's TLS certificate is not trusted: {tls.verify_message}"
    if tls is not None:
        return f"the TLS handshake failed: {tls.reason or tls.strerror or tls.__class__.__name__}"
    return exc.__class__.__name__


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl`` error under requests' and urllib3's wrappers, if there is one."""
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        pending += [*current.args, getattr(current, "reason", None), current.__cause__, current.__context__]
    return None


def _wait_as_asked(channel_id: int, now: datetime) -> None:
    not_before = _not_before.get(channel_id)
    if not_before is not None and now < not_before:
        raise TokenError(ASKED_TO_WAIT, f"Retry-After: not before {not_before:%H:%M:%S} UTC")


def _note_retry_after(channel_id: int, exc: TokenError, seconds: float | None, now: datetime) -> TokenError:
    """Remember a passing failure's Retry-After for this channel, and say it in the reference."""
    if seconds is None or not exc.explanation.transient:
        _not_before.pop(channel_id, None)
        return exc
    wait = min(timedelta(seconds=seconds), MAX_RETRY_AFTER)
    _not_before[channel_id] = now + wait
    return TokenError(exc.explanation, f"{exc.reference}; Retry-After {wait.total_seconds():g} s")


def _note_success(channel: Channel, *, redeemed: bool, now: datetime) -> None:
    if channel.token_failures or channel.token_failing_since is not None:
        channel.token_failures = 0
        channel.token_failing_since = None
    if redeemed:
        # Any redemption keeps the 90-day inactivity window open, not just the heartbeat's.
        channel.token_refreshed_at = now
        channel.token_refresh_count = (channel.token_refresh_count or 0) + 1


def _note_failure(session: Session, channel_id: int, exc: TokenError, now: datetime) -> TokenError:
    """Record the failure in its own transaction; return the error to raise (escalated if it persists)."""
    try:
        return _record_failure(session, channel_id, exc, now)
    except OperationalError as db_error:  # the caller's transaction holds a write lock on the row
        log.warning("token failure of mailbox %s not recorded: %s", channel_id, db_error.orig)
        return exc


def _record_failure(session: Session, channel_id: int, exc: TokenError, now: datetime) -> TokenError:
    with Session(bind=session.get_bind()) as own, own.begin():
        if own.get_bind().dialect.name == "postgresql":
            own.execute(text("SET LOCAL lock_timeout = '5s'"))
        channel = own.get(Channel, channel_id)
        if channel is None:
            return exc
        if exc.explanation.transient:
            channel.token_failures = (channel.token_failures or 0) + 1
            channel.token_failing_since = channel.token_failing_since or now
            lasted = now - channel.token_failing_since
            if lasted < ESCALATE_AFTER or channel.token_failures < ESCALATE_COUNT:
                log.info(
                    "token for mailbox %s: passing failure %d (%s)",
                    channel_id,
                    channel.token_failures,
                    exc.reference,
                )
                return exc
            exc = _escalated(exc, lasted, channel.token_failures)
            status = ChannelStatus.ERROR
        else:
            status = ChannelStatus(exc.explanation.channel_status)
        message = f"{exc.explanation.title}: {exc.explanation.fix} ({exc.reference})"
        if channel.last_error != message:
            own.add(ChannelEvent(channel_id=channel_id, kind="error", message=message))
        channel.last_error = message
        channel.last_error_at = now
        if channel.status is not ChannelStatus.DISABLED:
            channel.status = status
    log.warning("token for mailbox %s refused: %s", channel_id, exc.reference)
    return exc


def _escalated(exc: TokenError, lasted: timedelta, failures: int) -> TokenError:
    hours = lasted.total_seconds() / 3600
    explanation = replace(
        exc.explanation,
        title=f"No access token for {hours:.1f} hours ({failures} attempts): {exc.explanation.title}",
        fix="Check that this server reaches Microsoft's identity platform (DNS, firewall, proxy, "
        "POSTDESK_CA_BUNDLE) and whether Microsoft reports an outage (https://status.cloud.microsoft). "
        "Postdesk keeps retrying and clears this message by itself once a token is issued",
        channel_status="error",
    )
    return TokenError(explanation, exc.reference)


def _release_when_transaction_ends(session: Session, lock: threading.RLock) -> None:
    held: list[threading.RLock] | None = session.info.get(_HELD_LOCKS)
    if held is None:
        held = session.info[_HELD_LOCKS] = []

        def release(_session: Session, transaction: SessionTransaction) -> None:
            if transaction.parent is not None:
                return  # a savepoint or nested transaction; the outer one still holds the new token
            while held:
                held.pop().release()

        event.listen(session, "after_transaction_end", release)
    held.append(lock)


_HELD_LOCKS = "postdesk.token_locks"
