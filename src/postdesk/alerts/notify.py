"""Telling admins: email through a mailbox that works (or a fallback relay), and an optional webhook.

An alert about a mailbox is never sent only through that mailbox: it goes out through another connected
mailbox whose status is ok (SMTP XOAUTH2, as replies do), and when none can send, through the relay in
``POSTDESK_ALERT_SMTP``. A notice counts as delivered when email or the webhook got it; otherwise the
reason is returned, stored on the alert and the notice is tried again at the next evaluation. Nothing
here raises: every failure becomes words.

The webhook receives one JSON POST per notice (see ``webhook_payload`` and docs/runbook.md, "Alerts").
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import httpx
from sqlalchemy import select

from postdesk import __version__
from postdesk.alerts.conditions import Fix
from postdesk.config import Settings
from postdesk.db.models import Alert, Channel, ChannelStatus, Role, User
from postdesk.db.types import utcnow
from postdesk.mail.compose import OutgoingMail, compose, new_message_id
from postdesk.microsoft.identity import MicrosoftIdentity, tls_context
from postdesk.microsoft.tokens import TokenError, acquire_access_token
from postdesk.outbox.sender import default_submission
from postdesk.runtime import Runtime
from postdesk.security.redact import redact
from postdesk.transports.errors import TransportError
from postdesk.transports.smtp import SmtpRefusal, SmtpSubmission

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT = 10.0
RELAY_TIMEOUT = 20.0
SENDER_NAME = "Postdesk"
NO_ROUTE = (
    "no mailbox other than the one in trouble is working to send through, "
    "and no fallback relay (POSTDESK_ALERT_SMTP) is configured"
)


@dataclass(frozen=True)
class Notice:
    """One thing to tell admins: an alert that opened, or one that was resolved."""

    alert_id: int
    event: Literal["opened", "resolved"]
    key: str
    kind: str
    severity: str
    title: str
    message: str
    channel_id: int | None
    channel_email: str | None
    fix: Fix
    created_at: datetime
    resolved_at: datetime | None

    @property
    def subject(self) -> str:
        return f"[Postdesk] {'Resolved: ' if self.event == 'resolved' else ''}{self.title}"

    def may_go_through(self, channel_id: int) -> bool:
        # A mailbox in trouble does not carry news of its own trouble; once resolved it may.
        return self.channel_id != channel_id or self.event == "resolved"


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    error: str | None = None


# -- composing ---------------------------------------------------------------------------------


def alert_body(notice: Notice, *, base_url: str) -> str:
    if notice.event == "resolved":
        resolved = f"{notice.resolved_at:%Y-%m-%d %H:%M} UTC" if notice.resolved_at else "now"
        lines = [
            f"Resolved: {notice.title}",
            "",
            f"Open since {notice.created_at:%Y-%m-%d %H:%M} UTC, resolved {resolved}. Nothing more to do.",
        ]
    else:
        lines = [
            notice.title,
            "",
            notice.message,
            "",
            f"Fix: {notice.fix.label}: {base_url}{notice.fix.url}",
            "",
            f"Severity: {notice.severity}. Since {notice.created_at:%Y-%m-%d %H:%M} UTC.",
        ]
    lines += [
        "",
        "-- ",
        f"Postdesk at {base_url}. Every administrator gets these alerts; "
        "Postdesk tells you again only when it is resolved.",
    ]
    return "\n".join(lines)


def alert_mail(notice: Notice, *, sender: str, recipients: Sequence[str], base_url: str) -> bytes:
    return compose(
        OutgoingMail(
            sender_address=sender,
            sender_name=SENDER_NAME,
            to=tuple(recipients),
            cc=(),
            subject=notice.subject,
            body_text=alert_body(notice, base_url=base_url),
            message_id=new_message_id(sender),
            date=utcnow(),
            auto_submitted="auto-generated",  # RFC 3834: no auto-replies, no tickets from it
        )
    )


def webhook_payload(notice: Notice, *, base_url: str) -> dict[str, Any]:
    """The documented webhook body; ``text`` makes it readable as is by Slack- or Teams-style hooks."""
    fix_url = f"{base_url}{notice.fix.url}"
    mark = "Resolved" if notice.event == "resolved" else notice.severity.capitalize()
    return {
        "event": f"alert.{notice.event}",
        "alert": {
            "id": notice.alert_id,
            "key": notice.key,
            "kind": notice.kind,
            "severity": notice.severity,
            "title": notice.title,
            "message": notice.message,
            "channel": (
                {"id": notice.channel_id, "email": notice.channel_email}
                if notice.channel_id is not None
                else None
            ),
            "fix": {"label": notice.fix.label, "url": fix_url, "page": f"{base_url}{notice.fix.page_url}"},
            "created_at": notice.created_at.isoformat(),
            "resolved_at": notice.resolved_at.isoformat() if notice.resolved_at else None,
        },
        "postdesk": {"url": base_url, "version": __version__},
        "text": f"[Postdesk] {mark}: {notice.title}"
        + ("" if notice.event == "resolved" else f" — {notice.fix.label}: {fix_url}"),
    }


# -- delivering ----------------------------------------------------------------------------------


def deliver(runtime: Runtime, notices: Sequence[Notice]) -> dict[int, Outcome]:
    """Email and webhook for each notice; never raises."""
    if not notices:
        return {}
    emailed = _guarded("email", lambda: send_emails(runtime, notices), notices)
    hooked: dict[int, str | None] = {}
    if runtime.settings.alert_webhook_url is not None:
        hooked = _guarded("webhook", lambda: post_webhooks(runtime.settings, notices), notices)
    outcomes = {}
    for notice in notices:
        errors = {"email": emailed.get(notice.alert_id)}
        if runtime.settings.alert_webhook_url is not None:
            errors["webhook"] = hooked.get(notice.alert_id)
        delivered = any(error is None for error in errors.values())
        words = "; ".join(f"{route}: {error}" for route, error in errors.items() if error)
        outcomes[notice.alert_id] = Outcome(delivered, redact(words, keep_addresses=True) or None)
    return outcomes


def _guarded(
    route: str, send: Callable[[], dict[int, str | None]], notices: Sequence[Notice]
) -> dict[int, str | None]:
    try:
        result = send()
    except Exception as exc:  # a bug in one route must not keep the other from telling anyone
        log.exception("alert %s failed unexpectedly", route)
        return {notice.alert_id: f"unexpected failure ({exc.__class__.__name__})" for notice in notices}
    return result


def recipients(runtime: Runtime) -> list[str]:
    """Every active admin, plus POSTDESK_ALERT_EMAILS, each once."""
    with runtime.sessions() as session:
        admins = session.scalars(
            select(User.email).where(User.role == Role.ADMIN, User.is_active.is_(True)).order_by(User.id)
        ).all()
    everyone = [*admins, *runtime.settings.alert_emails]
    return list(dict.fromkeys(address.strip().lower() for address in everyone if address.strip()))


MAILBOXES_TO_TRY = 3


def send_emails(runtime: Runtime, notices: Sequence[Notice]) -> dict[int, str | None]:
    """Through working mailboxes first, then the fallback relay; each notice's error, or None if sent."""
    to = recipients(runtime)
    if not to:
        return {
            n.alert_id: "no one to email: no active admin, and POSTDESK_ALERT_EMAILS is empty"
            for n in notices
        }
    pending = {notice.alert_id: notice for notice in notices}
    problems: dict[int, list[str]] = {notice.alert_id: [] for notice in notices}
    # A few mailboxes at most: when sending fails through three, it fails through the rest for the same
    # reason (the SMTP host, the network), and trying hundreds would stall the worker for minutes.
    for channel_id in _working_channels(runtime)[:MAILBOXES_TO_TRY]:
        batch = [notice for notice in pending.values() if notice.may_go_through(channel_id)]
        if batch:
            _settle(pending, problems, _send_through_channel(runtime, channel_id, batch, to))
        if not pending:
            break
    if pending and runtime.settings.alert_smtp:
        _settle(pending, problems, _send_through_relay(runtime.settings, list(pending.values()), to))
    elif pending:
        for alert_id in pending:
            problems[alert_id].append(NO_ROUTE)
    return {alert_id: "; ".join(problems[alert_id]) if alert_id in pending else None for alert_id in problems}


def _settle(
    pending: dict[int, Notice], problems: dict[int, list[str]], results: dict[int, str | None]
) -> None:
    for alert_id, error in results.items():
        if error is None:
            pending.pop(alert_id, None)
        else:
            problems[alert_id].append(error)


def _working_channels(runtime: Runtime) -> list[int]:
    """Signed-in mailboxes with status ok; those without an open alert of their own first."""
    with runtime.sessions() as session:
        candidates = session.scalars(
            select(Channel.id)
            .where(
                Channel.status == ChannelStatus.OK,
                Channel.token_cache.is_not(None),
                Channel.microsoft_app_id.is_not(None),
            )
            .order_by(Channel.id)
        ).all()
        troubled = set(
            session.scalars(
                select(Alert.channel_id).where(Alert.resolved_at.is_(None), Alert.channel_id.is_not(None))
            )
        )
    return sorted(candidates, key=lambda channel_id: (channel_id in troubled, channel_id))


# -- through a connected mailbox -------------------------------------------------------------------


def _send_through_channel(
    runtime: Runtime, channel_id: int, batch: list[Notice], to: list[str]
) -> dict[int, str | None]:
    try:
        with _signed_in(runtime, channel_id) as (smtp, sender):
            return _send_batch(smtp, sender, batch, to, base_url=runtime.settings.base_url)
    except _CannotSend as exc:
        return {notice.alert_id: str(exc) for notice in batch}
    except Exception as exc:  # one broken mailbox must not keep the next one from sending
        log.exception("sending alerts through mailbox %s failed unexpectedly", channel_id)
        return {notice.alert_id: f"via mailbox {channel_id}: {exc.__class__.__name__}" for notice in batch}


class _CannotSend(Exception):
    """This route cannot send at all right now; the message says why (never with a token in it)."""


def _token(runtime: Runtime, channel_id: int, *, force: bool = False) -> tuple[str, str, str]:
    """(access token, SMTP login name, mailbox address) of a connected mailbox."""
    with runtime.sessions() as session:
        channel = session.get(Channel, channel_id)
        if channel is None or channel.microsoft_app is None:
            raise _CannotSend(f"mailbox {channel_id} is gone or has no Microsoft 365 app")
        try:
            token = acquire_access_token(
                session,
                MicrosoftIdentity(runtime.settings, channel.microsoft_app),
                channel,
                force_refresh=force,
            )
        except TokenError as exc:
            session.rollback()
            raise _CannotSend(f"via {channel.email}: {exc.explanation.title} ({exc.reference})") from exc
        session.commit()  # a rotated refresh token must not be lost
        return token.value, channel.account_username or channel.email, channel.email


@contextmanager
def _signed_in(runtime: Runtime, channel_id: int) -> Iterator[tuple[SmtpSubmission, str]]:
    token, login_name, email = _token(runtime, channel_id)
    with default_submission(runtime) as smtp:
        try:
            try:
                smtp.login(login_name, token)
            except SmtpRefusal as refusal:
                if refusal.code != 535 or "5.7.3" not in refusal.text:
                    raise
                # The token may be stale (revoked, keys rotated): one fresh one before giving up.
                smtp.close()
                smtp.login(login_name, _token(runtime, channel_id, force=True)[0])
        except TransportError as exc:
            raise _CannotSend(f"via {email}: {exc}") from exc
        yield smtp, email


def _send_batch(
    smtp: SmtpSubmission, sender: str, batch: list[Notice], to: list[str], *, base_url: str
) -> dict[int, str | None]:
    results: dict[int, str | None] = {}
    for position, notice in enumerate(batch):
        raw = alert_mail(notice, sender=sender, recipients=to, base_url=base_url)
        try:
            smtp.send(sender, to, raw)
        except SmtpRefusal as refusal:
            results[notice.alert_id] = f"via {sender}: refused, {refusal.reply}"
            if refusal.stage != "connect":
                continue
        except TransportError as exc:
            results[notice.alert_id] = f"via {sender}: {exc}"
        else:
            results[notice.alert_id] = None
            log.info("alert %d mailed to %d admins via mailbox %s", notice.alert_id, len(to), sender)
            continue
        # The connection is unusable: the rest wait for another route.
        for rest in batch[position + 1 :]:
            results[rest.alert_id] = f"via {sender}: the connection broke"
        break
    return results


# -- through the fallback relay -------------------------------------------------------------------


def _send_through_relay(settings: Settings, batch: list[Notice], to: list[str]) -> dict[int, str | None]:
    assert settings.alert_smtp is not None and settings.alert_from is not None  # config.py insists
    host, _, port = settings.alert_smtp.rpartition(":")
    results: dict[int, str | None] = {}
    try:
        with smtplib.SMTP(host, int(port), timeout=RELAY_TIMEOUT) as relay:
            _relay_session(relay, settings)
            for notice in batch:
                raw = alert_mail(
                    notice, sender=settings.alert_from, recipients=to, base_url=settings.base_url
                )
                try:
                    relay.sendmail(settings.alert_from, to, raw)
                except (
                    smtplib.SMTPRecipientsRefused,
                    smtplib.SMTPSenderRefused,
                    smtplib.SMTPDataError,
                ) as exc:
                    results[notice.alert_id] = (
                        f"the fallback relay {settings.alert_smtp} refused it: {_reply(exc)}"
                    )
                    continue
                results[notice.alert_id] = None
                log.info("alert %d mailed to %d admins via the fallback relay", notice.alert_id, len(to))
    except (OSError, smtplib.SMTPException, _CannotSend) as exc:
        error = f"the fallback relay {settings.alert_smtp}: {_reply(exc)}"
        for notice in batch:
            results.setdefault(notice.alert_id, error)
    return results


def _relay_session(relay: smtplib.SMTP, settings: Settings) -> None:
    """STARTTLS always (the password and the alert must not cross the network in clear), then AUTH."""
    relay.ehlo()
    if not relay.has_extn("starttls"):
        raise _CannotSend("it does not offer STARTTLS, and Postdesk never sends to a relay unencrypted")
    code, reply = relay.starttls(context=tls_context(settings))
    if code != 220:
        raise _CannotSend(f"STARTTLS refused: {code} {reply.decode(errors='replace')}")
    relay.ehlo()  # RFC 3207: forget what was said before TLS
    if settings.alert_smtp_username is None or settings.alert_smtp_password is None:
        return
    code, reply = relay.login(settings.alert_smtp_username, settings.alert_smtp_password.get_secret_value())
    if code != 235:  # smtplib also takes 503 ("already authenticated") as success
        raise _CannotSend(f"sign-in refused: {code} {reply.decode(errors='replace')}")


def _reply(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "; ".join(
            f"{rcpt}: {code} {text.decode(errors='replace')}" for rcpt, (code, text) in exc.recipients.items()
        )
    if isinstance(exc, smtplib.SMTPResponseException):
        text = (
            exc.smtp_error.decode(errors="replace")
            if isinstance(exc.smtp_error, bytes)
            else str(exc.smtp_error)
        )
        return f"{exc.smtp_code} {' '.join(text.split())}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its TLS certificate is not trusted ({exc.verify_message}); check POSTDESK_CA_BUNDLE"
    return str(exc).strip() or exc.__class__.__name__


# -- webhook -------------------------------------------------------------------------------------


def post_webhooks(settings: Settings, notices: Sequence[Notice]) -> dict[int, str | None]:
    """One POST per notice; a 2xx answer counts as delivered. The URL is a secret: never in errors."""
    assert settings.alert_webhook_url is not None
    url = settings.alert_webhook_url.get_secret_value()
    results: dict[int, str | None] = {}
    # trust_env off: proxies and CA variables of the environment do not apply, as for every other call.
    with httpx.Client(verify=tls_context(settings), trust_env=False, timeout=WEBHOOK_TIMEOUT) as client:
        for notice in notices:
            try:
                response = client.post(url, json=webhook_payload(notice, base_url=settings.base_url))
            except httpx.HTTPError as exc:
                text = str(exc).replace(url, "<webhook URL>") or exc.__class__.__name__
                results[notice.alert_id] = f"could not reach the webhook ({text})"
                continue
            ok = response.is_success
            results[notice.alert_id] = None if ok else f"the webhook answered HTTP {response.status_code}"
    return results
