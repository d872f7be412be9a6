"""What needs an admin's attention at a given moment: mailboxes that stopped, mailboxes that went quiet,
app credentials about to expire.

Pure apart from ``current_conditions``, which only reads: each function takes the rows and ``now`` and
returns ``Condition`` values, so a test moves the clock by passing another ``now``. A condition's ``key``
names it for as long as it lasts; ``service.py`` turns keys into Alert rows.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, load_only

from postdesk.db.models import Channel, ChannelStatus, MicrosoftApp

# Days before a client secret or certificate expires at which admins are warned, each once.
EXPIRY_WARNING_DAYS = (30, 14, 7, 1)
CRITICAL = "critical"
WARNING = "warning"
APP_FORM = "/channels#app"
# What the conditions read of a channel: never its token cache, which would be decrypted for nothing.
CONDITION_COLUMNS = load_only(
    Channel.id,
    Channel.email,
    Channel.status,
    Channel.last_error,
    Channel.watchdog_hours,
    Channel.last_mail_at,
    Channel.connected_at,
    Channel.created_at,
    raiseload=True,
)


class Kind(enum.StrEnum):
    NEEDS_REAUTH = "needs_reauth"
    CHANNEL_ERROR = "channel_error"
    WATCHDOG = "watchdog"
    SECRET_EXPIRY = "secret_expiry"  # noqa: S105 - the name of a condition, not a secret
    CERTIFICATE_EXPIRY = "certificate_expiry"


# The thresholds of one credential follow each other: a newer one replaces the older without a
# "resolved" notice, because nothing was resolved.
STAGED_KINDS = frozenset({Kind.SECRET_EXPIRY, Kind.CERTIFICATE_EXPIRY})


@dataclass(frozen=True)
class Condition:
    key: str
    kind: Kind
    severity: str
    title: str
    message: str
    channel_id: int | None = None

    @property
    def family(self) -> str:
        return family_of(self.key, self.kind)


@dataclass(frozen=True)
class Fix:
    """Where the admin goes: ``page_url`` shows the problem, ``url`` is the one-step fix."""

    label: str
    url: str
    page_url: str


def family_of(key: str, kind: str) -> str:
    """``secret:1:14d`` and ``secret:1:7d`` are one family; every other key is its own."""
    return key.rpartition(":")[0] if kind in STAGED_KINDS else key


def fix_for(kind: str, channel_id: int | None) -> Fix:
    if channel_id is None or kind in STAGED_KINDS:
        if kind == Kind.CERTIFICATE_EXPIRY:
            return Fix("Replace the certificate", APP_FORM, APP_FORM)
        return Fix("Renew the secret or switch to a certificate", APP_FORM, APP_FORM)
    page = f"/channels/{channel_id}"
    if kind == Kind.NEEDS_REAUTH:
        return Fix("Re-authenticate", f"/auth/microsoft365/start?channel={channel_id}", page)
    if kind == Kind.WATCHDOG:
        return Fix("Check where its mail goes", page, page)
    return Fix("Open the mailbox and follow the last error", page, page)


def current_conditions(session: Session, now: datetime) -> list[Condition]:
    """Everything that needs attention at ``now``, from the channel and app registration rows."""
    channels = session.scalars(
        select(Channel).options(CONDITION_COLUMNS).where(Channel.status != ChannelStatus.DISABLED)
    )
    apps = session.scalars(select(MicrosoftApp))
    return [
        *_each(channel_conditions(c, now) for c in channels),
        *_each(credential_conditions(a, now) for a in apps),
    ]


def _each(groups: Iterable[list[Condition]]) -> list[Condition]:
    return [condition for group in groups for condition in group]


def channel_conditions(channel: Channel, now: datetime) -> list[Condition]:
    if channel.status is ChannelStatus.DISABLED:
        return []  # an admin turned it off on purpose
    found = [attention] if (attention := attention_condition(channel)) else []
    if (silence := watchdog_condition(channel, now)) is not None:
        found.append(silence)
    return found


def attention_condition(channel: Channel) -> Condition | None:
    """The mailbox stopped: it needs a new sign-in, or an error needs a person."""
    key = f"channel:{channel.id}:attention"
    detail = channel.last_error or "No details were recorded."
    if channel.status is ChannelStatus.NEEDS_REAUTH:
        return Condition(
            key,
            Kind.NEEDS_REAUTH,
            CRITICAL,
            f"{channel.email} needs sign-in",
            f"Postdesk cannot fetch or send mail for {channel.email} until someone signs in as this "
            f"mailbox again (Re-authenticate on the mailbox page). {detail}",
            channel.id,
        )
    if channel.status is ChannelStatus.ERROR:
        return Condition(
            key,
            Kind.CHANNEL_ERROR,
            CRITICAL,
            f"{channel.email} has stopped",
            f"Postdesk stopped fetching mail for {channel.email}. Last error: {detail}",
            channel.id,
        )
    return None


def watchdog_condition(channel: Channel, now: datetime) -> Condition | None:
    """No mail for ``watchdog_hours``, counted from the last message (or the connection, if none yet)."""
    hours = channel.watchdog_hours
    if not hours or channel.status is ChannelStatus.DISABLED:
        return None
    since = channel.last_mail_at or channel.connected_at or channel.created_at
    if since is None or now - since < timedelta(hours=hours):
        return None
    what = (
        "The last message arrived"
        if channel.last_mail_at
        else "No message has arrived since it was connected"
    )
    return Condition(
        f"channel:{channel.id}:watchdog",
        Kind.WATCHDOG,
        WARNING,
        f"{channel.email} has received no mail for {hours} hours",
        f"{what} {since:%Y-%m-%d %H:%M} UTC. Check that mail to {channel.email} still reaches this mailbox "
        "(a mail flow rule, forwarding or an MX change can divert it), or change the watchdog on the "
        "mailbox page if the mailbox is often this quiet.",
        channel.id,
    )


def credential_conditions(app: MicrosoftApp, now: datetime) -> list[Condition]:
    """The credential Postdesk signs in with, when it expires within 30 days or has expired."""
    if app.credential_kind == "secret" and app.client_secret_expires_at is not None:
        found = _expiry(app, Kind.SECRET_EXPIRY, app.client_secret_expires_at, now)
    elif app.credential_kind == "certificate" and app.certificate_expires_at is not None:
        found = _expiry(app, Kind.CERTIFICATE_EXPIRY, app.certificate_expires_at, now)
    else:
        found = None
    return [found] if found is not None else []


def _expiry(app: MicrosoftApp, kind: Kind, expires_at: datetime, now: datetime) -> Condition | None:
    left = expires_at - now
    if left > timedelta(days=max(EXPIRY_WARNING_DAYS)):
        return None
    stage = (
        "expired"
        if left <= timedelta(0)
        else f"{min(d for d in EXPIRY_WARNING_DAYS if left <= timedelta(days=d))}d"
    )
    days = math.ceil(left / timedelta(days=1))
    prefix = "secret" if kind is Kind.SECRET_EXPIRY else "certificate"
    severity = CRITICAL if days <= 1 else WARNING
    date = f"{expires_at:%Y-%m-%d}"
    if kind is Kind.SECRET_EXPIRY:
        title, message = _secret_words(app, date, days)
    else:
        title, message = _certificate_words(app, date, days)
    return Condition(f"{prefix}:{app.id}:{stage}", kind, severity, title, message)


def _when(date: str, days: int) -> str:
    if days <= 0:
        return f"expired on {date}"
    return f"expires on {date} (in {days} day{'s' if days != 1 else ''})"


def _secret_words(app: MicrosoftApp, date: str, days: int) -> tuple[str, str]:
    title = f"The Microsoft 365 client secret {_when(date, days)}"
    consequence = (
        "Microsoft now refuses every sign-in with it (AADSTS7000222), so no mailbox can fetch or send mail."
        if days <= 0
        else "When it expires, Microsoft refuses every sign-in with it and no mailbox can fetch or send mail."
    )
    return title, (
        f"{consequence} In the Azure portal, open the app registration {app.client_id} › Certificates & "
        "secrets, add a new client secret and enter its value and expiry date on the Channels page. "
        "Recommended instead: use a certificate. Postdesk generates one (Generate a certificate on the "
        "Channels page); it is valid for longer and its private key never leaves Postdesk."
    )


def _certificate_words(app: MicrosoftApp, date: str, days: int) -> tuple[str, str]:
    title = f"The Microsoft 365 app certificate {_when(date, days)}"
    consequence = (
        "Microsoft now refuses every sign-in with it, so no mailbox can fetch or send mail."
        if days <= 0
        else "When it expires, Microsoft refuses every sign-in with it and no mailbox can fetch or send mail."
    )
    return title, (
        f"{consequence} On the Channels page choose Replace certificate, upload the new certificate to the "
        f"app registration {app.client_id} › Certificates & secrets › Certificates, then choose Use the "
        "certificate."
    )
