"""Sending queued mail: claim due rows, submit them over SMTP XOAUTH2 (or Microsoft Graph for a Graph
channel), and record the outcome.

Exactly-once, as far as SMTP allows: a row is claimed with a conditional UPDATE (state SENDING plus a
lease), so two workers never send it at the same time. The outcome is committed right after the
server answers. If the process dies between the server's acceptance and that commit, the row's lease
runs out with the state still SENDING; whoever claims it next first looks for its Message-ID in the
mailbox's Sent Items (Exchange Online files every message submitted over SMTP or Graph there), over
IMAP or Graph as the channel reads mail, and only sends again when it is not there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from postdesk.db.models import (
    Channel,
    ChannelEvent,
    ChannelStatus,
    DeliveryStatus,
    OutboundMessage,
    Transport,
)
from postdesk.db.types import utcnow
from postdesk.ingest.graph_fetch import GraphAccount
from postdesk.microsoft.clouds import endpoints_for
from postdesk.microsoft.identity import MicrosoftIdentity, tls_context
from postdesk.microsoft.tokens import TokenError, acquire_access_token
from postdesk.outbox.explain import DeliveryExplanation, Retry, explain_refusal
from postdesk.outbox.graph_send import GraphSubmission, sent_through_graph
from postdesk.runtime import Runtime
from postdesk.security.redact import redact
from postdesk.storage import read_bytes
from postdesk.transports.errors import OutcomeUnknown, TransportError
from postdesk.transports.graph import GraphRefusal
from postdesk.transports.imap import ImapMailbox
from postdesk.transports.smtp import SmtpRefusal, SmtpSubmission

log = logging.getLogger(__name__)

# How long a sender owns a row it claimed; a dead sender's rows are checked and retried after it.
LEASE = timedelta(minutes=10)
# After a connection broke mid-message, wait this long before looking in Sent Items (Exchange files
# the copy within seconds; the margin keeps a slow day from causing a duplicate).
OUTCOME_CHECK_DELAY = timedelta(minutes=2)
BACKOFF = (
    timedelta(minutes=1),
    timedelta(minutes=2),
    timedelta(minutes=5),
    timedelta(minutes=15),
    timedelta(minutes=30),
    timedelta(hours=1),
    timedelta(hours=2),
    timedelta(hours=4),
)
# Rows the server accepted are recorded in groups of this many (one commit each): a commit per message
# cost more than sending it.
SENT_GROUP = 50
SENT_GROUP_WAIT = timedelta(seconds=1)  # and no later than this after the first of a group was accepted
MAX_ATTEMPTS = 12  # about a day of trying before a transient failure becomes a failure
WAIT_FOR_MAILBOX = timedelta(minutes=15)

SubmissionFactory = Callable[[Runtime], SmtpSubmission]
MailboxFactory = Callable[[Runtime], ImapMailbox]


class _Submits(Protocol):
    """What the sending loop needs of a transport: ``SmtpSubmission`` or ``GraphSubmission``."""

    def send(self, mail_from: str, recipients: list[str], raw: bytes) -> str: ...


@dataclass
class SendReport:
    sent: int = 0
    failed: int = 0
    retrying: int = 0
    already_sent: int = 0  # found in Sent Items after an interrupted attempt
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.sent} sent"]
        if self.already_sent:
            parts.append(f"{self.already_sent} found already sent")
        parts += [f"{self.retrying} to retry", f"{self.failed} failed"]
        return ", ".join(parts)


def default_submission(runtime: Runtime) -> SmtpSubmission:
    return SmtpSubmission(endpoints_for(runtime.settings).smtp, ssl_context=tls_context(runtime.settings))


def default_mailbox(runtime: Runtime) -> ImapMailbox:
    return ImapMailbox(endpoints_for(runtime.settings).imap, ssl_context=tls_context(runtime.settings))


def send_due(
    runtime: Runtime,
    *,
    include_waiting: bool = False,
    limit: int = 200,
    submission: SubmissionFactory = default_submission,
    mailbox: MailboxFactory = default_mailbox,
) -> SendReport:
    """Send what is due (``include_waiting``: also what waits for a retry). One connection per mailbox."""
    report = SendReport()
    claimed = _claim(runtime, include_waiting=include_waiting, limit=limit)
    by_channel: dict[int | None, list[tuple[int, bool]]] = {}
    for row_id, channel_id, in_doubt in claimed:
        by_channel.setdefault(channel_id, []).append((row_id, in_doubt))
    for channel_id, rows in by_channel.items():
        _ChannelRun(runtime, channel_id, rows, report, submission=submission, mailbox=mailbox).run()
    return report


def _due(now: datetime, *, include_waiting: bool) -> ColumnElement[bool]:
    queued: ColumnElement[bool] = OutboundMessage.status == DeliveryStatus.QUEUED
    if not include_waiting:
        queued = and_(queued, OutboundMessage.next_attempt_at <= now)
    abandoned = and_(OutboundMessage.status == DeliveryStatus.SENDING, OutboundMessage.lease_until < now)
    return or_(queued, abandoned)


def _claim(runtime: Runtime, *, include_waiting: bool, limit: int) -> list[tuple[int, int | None, bool]]:
    """Take up to ``limit`` due rows: (id, channel id, in doubt = an earlier attempt may have sent it).

    One conditional UPDATE takes them all; RETURNING says which it got, since another worker may have
    taken some of them between the SELECT and the UPDATE."""
    now = utcnow()
    due = _due(now, include_waiting=include_waiting)
    with runtime.sessions() as session:
        candidates = session.execute(
            select(OutboundMessage.id, OutboundMessage.channel_id, OutboundMessage.status)
            .where(due)
            .order_by(OutboundMessage.next_attempt_at, OutboundMessage.id)
            .limit(limit)
        ).all()
        if not candidates:
            return []
        taken = set(
            session.scalars(
                update(OutboundMessage)
                .where(OutboundMessage.id.in_([row_id for row_id, _channel, _status in candidates]), due)
                .values(
                    status=DeliveryStatus.SENDING,
                    lease_until=now + LEASE,
                    last_attempt_at=now,
                    attempts=OutboundMessage.attempts + 1,
                )
                .returning(OutboundMessage.id)
                .execution_options(synchronize_session=False)
            )
        )
        session.commit()
    return [
        (row_id, channel_id, status is DeliveryStatus.SENDING)
        for row_id, channel_id, status in candidates
        if row_id in taken
    ]


class _ChannelRun:
    """One mailbox's share of a pass: one sign-in, one connection, its rows in order."""

    def __init__(
        self,
        runtime: Runtime,
        channel_id: int | None,
        rows: list[tuple[int, bool]],
        report: SendReport,
        *,
        submission: SubmissionFactory,
        mailbox: MailboxFactory,
    ) -> None:
        self.runtime = runtime
        self.channel_id = channel_id
        self.rows = rows
        self.report = report
        self.submission = submission
        self.mailbox = mailbox
        self.email = ""
        self.login_name = ""
        self.transport = Transport.IMAP
        self.account: GraphAccount | None = None
        self._sent: list[tuple[int, str, datetime]] = []  # accepted by the server, not yet recorded

    def run(self) -> None:
        try:
            token = self._token()
        except _Wait as wait:
            self._postpone([row_id for row_id, _ in self.rows], wait.reason, wait.delay)
            return
        pending = self._settle_doubts(token)
        if pending:
            self._send(token, pending)

    # -- signing in

    def _token(self, *, force: bool = False) -> str:
        with self.runtime.sessions() as session:
            channel = session.get(Channel, self.channel_id) if self.channel_id is not None else None
            if channel is None:
                raise _Wait("the mailbox this reply was to go out through has been deleted", None)
            self.email = channel.email
            self.login_name = channel.account_username or channel.email
            self.transport = channel.transport
            self.account = GraphAccount.of(channel)
            if channel.status is ChannelStatus.DISABLED:
                raise _Wait(
                    f"the mailbox {channel.email} is disabled; enable it under Channels", WAIT_FOR_MAILBOX
                )
            if channel.microsoft_app is None:
                raise _Wait("no Microsoft 365 app is connected; set it up under Channels", WAIT_FOR_MAILBOX)
            try:
                token = acquire_access_token(
                    session,
                    MicrosoftIdentity(self.runtime.settings, channel.microsoft_app),
                    channel,
                    force_refresh=force,
                ).value
            except TokenError as exc:
                session.commit()
                words = f"{exc.explanation.title}: {exc.explanation.fix} ({exc.reference})"
                delay = BACKOFF[0] if exc.explanation.transient else WAIT_FOR_MAILBOX
                raise _Wait(f"waiting for the mailbox's sign-in — {words}", delay) from exc
            session.commit()
            return token

    # -- interrupted attempts

    def _settle_doubts(self, token: str) -> list[int]:
        """Rows whose earlier attempt may have gone through: mark those found in Sent Items as sent."""
        doubtful = [row_id for row_id, in_doubt in self.rows if in_doubt]
        pending = [row_id for row_id, in_doubt in self.rows if not in_doubt]
        if not doubtful:
            return pending
        try:
            found = self._look_in_sent_items(token, doubtful)
        except TransportError as exc:
            # Sending blind could duplicate; keep them in doubt and look again later.
            self._hold_in_doubt(doubtful, f"could not check Sent Items for an interrupted attempt: {exc}")
            return pending
        for row_id in doubtful:
            if row_id in found:
                self._mark_sent(row_id, "found in Sent Items after an interrupted attempt", already=True)
            else:
                pending.append(row_id)
        return sorted(pending)

    def _look_in_sent_items(self, token: str, row_ids: list[int]) -> set[int]:
        with self.runtime.sessions() as session:
            found = session.execute(
                select(OutboundMessage.id, OutboundMessage.message_id).where(OutboundMessage.id.in_(row_ids))
            )
            message_ids = {row_id: message_id for row_id, message_id in found}
        if self.transport is Transport.GRAPH and self.account is not None:
            sent = sent_through_graph(self.runtime, self.account, token, set(message_ids.values()))
            return {row_id for row_id, mid in message_ids.items() if mid in sent}
        with self.mailbox(self.runtime) as imap:
            imap.login(self.login_name, token)
            folder = imap.sent_folder()
            return {row_id for row_id, mid in message_ids.items() if imap.holds_message_id(folder, mid)}

    # -- sending

    def _send(self, token: str, row_ids: list[int]) -> None:
        if self.transport is Transport.GRAPH and self.account is not None:
            # One Graph client for the channel's whole run; no sign-in step, the token goes with each request.
            with GraphSubmission(self.runtime, self.account, token, fresh_token=self._graph_token) as graph:
                self._send_rows(graph, row_ids)
            return
        with self.submission(self.runtime) as smtp:
            try:
                self._login(smtp, token)
            except _Wait as wait:
                self._postpone(row_ids, wait.reason, wait.delay)
                return
            except SmtpRefusal as refusal:
                self._refused(row_ids, refusal)
                return
            except TransportError as exc:
                self._retry_later(row_ids, str(exc))
                return
            self._send_rows(smtp, row_ids)

    def _send_rows(self, submission: _Submits, row_ids: list[int]) -> None:
        with self.runtime.sessions() as session:
            envelopes = {
                row_id: (mail_from, recipients.split("\n"), sha256)
                for row_id, mail_from, recipients, sha256 in session.execute(
                    select(
                        OutboundMessage.id,
                        OutboundMessage.mail_from,
                        OutboundMessage.recipients,
                        OutboundMessage.sha256,
                    ).where(OutboundMessage.id.in_(row_ids))
                )
            }
        stopped = (
            "Microsoft Graph did not take the previous message"
            if self.transport is Transport.GRAPH
            else "the connection to the SMTP server broke"
        )
        try:
            for position, row_id in enumerate(row_ids):
                if not self._send_one(submission, row_id, *envelopes[row_id]):
                    self._retry_later(row_ids[position + 1 :], stopped)
                    return
        finally:
            self._record_sent()

    def _graph_token(self) -> str:
        """A fresh access token for a Graph run; a sign-in that cannot give one refuses the send."""
        try:
            return self._token(force=True)
        except _Wait as wait:
            raise TransportError(wait.reason, permanent=True, needs_reauth=True) from wait

    def _login(self, smtp: SmtpSubmission, token: str) -> None:
        try:
            smtp.login(self.login_name, token)
        except SmtpRefusal as refusal:
            if refusal.code != 535 or "5.7.3" not in refusal.text:
                raise
            # The token may be stale (revoked, keys rotated): one fresh one before giving up.
            smtp.close()
            smtp.login(self.login_name, self._token(force=True))

    def _send_one(
        self, smtp: _Submits, row_id: int, mail_from: str, recipients: list[str], sha256: str
    ) -> bool:
        """Send one row; False when the connection is unusable afterwards."""
        try:
            raw = read_bytes(self.runtime.settings.spool_dir, sha256)
        except OSError as exc:
            self._record_sent()  # the rows sent so far, before this row's outcome
            self._fail(
                [row_id],
                DeliveryExplanation(
                    title="The composed message cannot be read from the spool",
                    fix=f"check the disk that holds POSTDESK_DATA_DIR ({exc.strerror or exc})",
                    retry=Retry.NO,
                ),
                "",
            )
            return True
        try:
            reply = smtp.send(mail_from, recipients, raw)
        except SmtpRefusal as refusal:
            self._record_sent()
            self._refused([row_id], refusal)
            # A 421 closes the connection (RFC 5321 3.8), whatever the stage: the rest of the pass
            # waits for the next one instead of failing on the closed socket with smtplib's words.
            return refusal.stage != "connect" and refusal.code != 421
        except OutcomeUnknown as exc:
            self._record_sent()
            self._hold_in_doubt([row_id], str(exc), delay=OUTCOME_CHECK_DELAY)
            return False
        except TransportError as exc:
            self._record_sent()
            if self.transport is Transport.GRAPH and exc.permanent:
                return self._refused_by_graph(row_id, exc)
            self._retry_later([row_id], str(exc))
            return False
        self._sent.append((row_id, reply, utcnow()))
        if len(self._sent) >= SENT_GROUP or utcnow() - self._sent[0][2] > SENT_GROUP_WAIT:
            self._record_sent()
        return True

    # -- bookkeeping

    def _record_sent(self) -> None:
        """Commit the rows the server accepted since the last call, in one transaction.

        Committing in groups is safe: a row accepted but not yet recorded when the process dies is
        still SENDING when its lease runs out, and is looked for in Sent Items before any resend."""
        if not self._sent:
            return
        accepted, self._sent = self._sent, []
        outcomes = {row_id: (reply, when) for row_id, reply, when in accepted}
        with self.runtime.sessions() as session:
            for row in session.scalars(select(OutboundMessage).where(OutboundMessage.id.in_(outcomes))):
                _mark(row, *outcomes[row.id])
            session.commit()
        self.report.sent += len(accepted)
        log.info("sent %d outbound message(s) through channel %s", len(accepted), self.channel_id)

    def _mark_sent(self, row_id: int, reply: str, *, already: bool = False) -> None:
        with self.runtime.sessions() as session:
            row = session.get(OutboundMessage, row_id)
            assert row is not None
            _mark(row, reply, utcnow())
            session.commit()
        if already:
            self.report.already_sent += 1
        else:
            self.report.sent += 1
        log.info("sent outbound message %d through channel %s", row_id, self.channel_id)

    def _refused(self, row_ids: list[int], refusal: SmtpRefusal) -> None:
        explanation = explain_refusal(refusal.code, refusal.text)
        if explanation.retry is Retry.NO:
            self._fail(row_ids, explanation, refusal.reply)
        elif explanation.retry is Retry.LATER:
            self._postpone(row_ids, explanation.sentence(), timedelta(hours=1), reply=refusal.reply)
        else:
            self._retry_later(row_ids, explanation.sentence(), reply=refusal.reply)

    def _refused_by_graph(self, row_id: int, exc: TransportError) -> bool:
        """A Graph refusal retrying cannot cure; False when the rest of the run cannot go either."""
        if exc.needs_reauth:
            # The mailbox's sign-in, not the message: wait for it without using up attempts.
            self._postpone([row_id], f"waiting for the mailbox's sign-in — {exc}", WAIT_FOR_MAILBOX)
            return False
        reply = f"{exc.status} {exc.code}" if isinstance(exc, GraphRefusal) else ""
        explanation = DeliveryExplanation(
            title="Microsoft Graph refused to send the message",
            fix=str(exc),
            retry=Retry.NO,
            sign_in=isinstance(exc, GraphRefusal) and exc.status == 403,
        )
        self._fail([row_id], explanation, reply)
        return True

    def _fail(self, row_ids: list[int], explanation: DeliveryExplanation, reply: str) -> None:
        with self.runtime.sessions() as session:
            for row in session.scalars(select(OutboundMessage).where(OutboundMessage.id.in_(row_ids))):
                _finish(row, DeliveryStatus.FAILED, explanation.sentence(), reply)
            if explanation.sign_in or reply.startswith("535"):
                _note_on_channel(
                    session, self.channel_id, f"Sending failed: {explanation.sentence()} ({reply})"
                )
            session.commit()
        self.report.failed += len(row_ids)
        self.report.problems.append(f"{self.email}: {explanation.title} ({reply})")

    def _retry_later(self, row_ids: list[int], reason: str, *, reply: str | None = None) -> None:
        if not row_ids:
            return
        with self.runtime.sessions() as session:
            for row in session.scalars(select(OutboundMessage).where(OutboundMessage.id.in_(row_ids))):
                if row.attempts >= MAX_ATTEMPTS:
                    since = f"{row.created_at:%Y-%m-%d %H:%M} UTC"
                    words = f"Gave up after {row.attempts} attempts since {since}: {reason}"
                    _finish(row, DeliveryStatus.FAILED, words, reply)
                    self.report.failed += 1
                    continue
                delay = BACKOFF[min(max(row.attempts - 1, 0), len(BACKOFF) - 1)]
                _finish(row, DeliveryStatus.QUEUED, reason, reply, next_attempt=utcnow() + delay)
                self.report.retrying += 1
            session.commit()
        self.report.problems.append(f"{self.email}: {redact(reason, keep_addresses=True)}")

    def _postpone(
        self, row_ids: list[int], reason: str, delay: timedelta | None, *, reply: str | None = None
    ) -> None:
        """Not the message's fault (the mailbox needs attention): wait without using up attempts."""
        with self.runtime.sessions() as session:
            for row in session.scalars(select(OutboundMessage).where(OutboundMessage.id.in_(row_ids))):
                if delay is None:
                    _finish(row, DeliveryStatus.FAILED, f"Not sent: {reason}.", reply)
                    continue
                row.attempts = max(row.attempts - 1, 0)
                _finish(
                    row, DeliveryStatus.QUEUED, f"Waiting: {reason}.", reply, next_attempt=utcnow() + delay
                )
            session.commit()
        if delay is None:
            self.report.failed += len(row_ids)
        else:
            self.report.retrying += len(row_ids)
        self.report.problems.append(
            f"{self.email or 'deleted mailbox'}: {redact(reason, keep_addresses=True)}"
        )

    def _hold_in_doubt(self, row_ids: list[int], reason: str, *, delay: timedelta = WAIT_FOR_MAILBOX) -> None:
        with self.runtime.sessions() as session:
            for row in session.scalars(select(OutboundMessage).where(OutboundMessage.id.in_(row_ids))):
                row.status = DeliveryStatus.SENDING
                row.lease_until = utcnow() + delay
                row.last_error = f"Checking whether it went out: {reason}"
            session.commit()
        self.report.retrying += len(row_ids)
        self.report.problems.append(f"{self.email}: {redact(reason, keep_addresses=True)}")


class _Wait(Exception):
    """The mailbox cannot send right now; ``delay`` None means it never will (it was deleted)."""

    def __init__(self, reason: str, delay: timedelta | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


def _mark(row: OutboundMessage, reply: str, when: datetime) -> None:
    row.status = DeliveryStatus.SENT
    row.sent_at = when
    row.lease_until = None
    row.server_reply = reply[:1000]
    row.last_error = None


def _finish(
    row: OutboundMessage,
    status: DeliveryStatus,
    words: str,
    reply: str | None,
    *,
    next_attempt: datetime | None = None,
) -> None:
    row.status = status
    row.lease_until = None
    row.last_error = words
    if reply is not None:
        row.server_reply = reply[:1000]
    if next_attempt is not None:
        row.next_attempt_at = next_attempt


def _note_on_channel(session: Session, channel_id: int | None, message: str) -> None:
    channel = session.get(Channel, channel_id) if channel_id is not None else None
    if channel is None:
        return
    channel.last_error = message
    channel.last_error_at = utcnow()
    session.add(ChannelEvent(channel_id=channel.id, kind="send_failed", message=message))


def retry_delivery(session: Session, row: OutboundMessage) -> None:
    """An agent's "Retry" on a failed message: queue it again now, with the same bytes and Message-ID."""
    if row.status is not DeliveryStatus.FAILED:
        return
    row.status = DeliveryStatus.QUEUED
    row.next_attempt_at = utcnow()
    row.attempts = 0
    row.last_error = None


_kick_lock = threading.Lock()
_kick_again = threading.Event()


def start_sending(runtime: Runtime) -> None:
    """Send what is due in a background thread now (after a reply), instead of at the worker's next tick.
    One such thread per process; a request while it runs makes it go round once more."""
    _kick_again.set()
    if not _kick_lock.acquire(blocking=False):
        return

    def run() -> None:
        try:
            while _kick_again.is_set():
                _kick_again.clear()
                send_due(runtime)
        except Exception:
            log.exception("sending queued mail failed")
        finally:
            _kick_lock.release()
        if _kick_again.is_set():  # a request that came in while this thread was finishing
            start_sending(runtime)

    threading.Thread(target=run, daemon=True, name="postdesk-send").start()
