"""One fetch pass over one mailbox: new mail is made durable here before the server copy is touched.

Order of events for every batch, which is what makes a crash at any point safe:
1. the raw bytes are written to the spool and fsynced (content-addressed, so rewriting is harmless);
2. the inbound rows and the channel's new last UID are committed together;
3. only then is the server copy flagged \\Seen, deleted or moved, and the row marked ``server_done``;
4. once all batches are stored, the rows are processed into articles, a transaction per batch of
   rows (from the bytes still in memory, as far as they were kept, rather than read back).
A crash before 2 refetches the batch; after 2 the rows exist and step 3 is finished at the next pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from postdesk.db.models import (
    BacklogPolicy,
    Channel,
    ChannelEvent,
    ChannelStatus,
    InboundMessage,
    InboundStatus,
    Transport,
)
from postdesk.db.session import insert_ignoring_duplicates
from postdesk.db.types import utcnow
from postdesk.ingest.process import ProcessCounts, process_stored
from postdesk.microsoft.clouds import endpoints_for
from postdesk.microsoft.identity import MicrosoftIdentity, tls_context
from postdesk.microsoft.tokens import TokenError, acquire_access_token
from postdesk.runtime import Runtime
from postdesk.storage import store_many
from postdesk.transports.errors import TransportError
from postdesk.transports.imap import FetchedMessage, FolderState, ImapMailbox
from postdesk.worker.leases import lease_conflict

log = logging.getLogger(__name__)
# A batch is spooled, committed and flagged on the server together: the fsyncs of a batch overlap, so
# fewer, larger batches wait on the disk less often.
BATCH = 200
BATCH_BYTES = 32 * 1024 * 1024
# Fetched bytes kept in memory for processing; past this, processing reads them back from the spool.
KEEP_BYTES = 64 * 1024 * 1024
# Server and Postdesk clocks may differ a little; mail this close to the connection counts as new.
ARRIVAL_MARGIN = timedelta(minutes=2)
BACKLOG_AUTO_IMPORT = 0  # any backlog at all waits for the admin to confirm the count

MailboxFactory = Callable[[Runtime], ImapMailbox]
_channel_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(channel_id: int) -> threading.Lock:
    with _locks_guard:
        return _channel_locks.setdefault(channel_id, threading.Lock())


def default_mailbox(runtime: Runtime) -> ImapMailbox:
    return ImapMailbox(endpoints_for(runtime.settings).imap, ssl_context=tls_context(runtime.settings))


@dataclass
class FetchResult:
    channel_id: int
    email: str = ""
    fetched: int = 0
    processed: ProcessCounts = field(default_factory=ProcessCounts)
    backlog_waiting: int | None = None
    skipped: str | None = None
    error: str | None = None

    @property
    def summary(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        if self.skipped:
            return f"skipped: {self.skipped}"
        p = self.processed
        text = (
            f"{self.fetched} fetched, {p.tickets} new tickets, {p.follow_ups} follow-ups, "
            f"{p.duplicates} duplicates, {p.quarantined} quarantined"
        )
        if self.backlog_waiting:
            text += f"; {self.backlog_waiting} older messages wait for an import decision"
        return text


class _Refused(Exception):
    def __init__(self, message: str, status: ChannelStatus) -> None:
        super().__init__(message)
        self.status = status


def fetch_channel(
    runtime: Runtime,
    channel_id: int,
    *,
    mailbox_factory: MailboxFactory = default_mailbox,
    progress: Callable[[int, int], None] | None = None,
    worker_id: str | None = None,
) -> FetchResult:
    """Fetch and process one mailbox now. Never raises for mail or server trouble: it is in the result
    and on the channel row (``last_error``) in words that say what to do.

    ``worker_id``: the worker fetching under its lease on the mailbox, which it must still hold. Without
    one (``postdesk channel fetch``, "Fetch now") the fetch is skipped while another worker holds a live
    lease: that worker fetches the mailbox anyway. Leases keep workers apart; the unique key on inbound
    mail, not the lease, is what keeps a message from being stored twice."""
    result = FetchResult(channel_id=channel_id)
    lock = _lock_for(channel_id)
    if not lock.acquire(blocking=False):
        result.skipped = "a fetch of this mailbox is already running"
        return result
    try:
        result.skipped = lease_conflict(runtime, channel_id, worker_id=worker_id)
        if result.skipped:
            return result
        spooled = _guarded_fetch(runtime, result, mailbox_factory, progress)
        # Also picks up rows an interrupted earlier pass stored but did not process.
        result.processed = process_stored(runtime, channel_id=channel_id, spooled=spooled)
    finally:
        lock.release()
    _record_success(runtime, result)
    return result


def _guarded_fetch(
    runtime: Runtime,
    result: FetchResult,
    factory: MailboxFactory,
    progress: Callable[[int, int], None] | None,
) -> dict[str, bytes]:
    """Fetch and store; returns the stored bytes it kept in memory for processing, by SHA-256."""
    try:
        return _fetch(runtime, result, factory, progress)
    except _Refused as exc:
        result.error = str(exc)
        _record_failure(runtime, result.channel_id, str(exc), exc.status)
    except TransportError as exc:
        result.error = str(exc)
        _record_failure(
            runtime, result.channel_id, str(exc), ChannelStatus.ERROR if exc.permanent else ChannelStatus.OK
        )
    except OSError as exc:
        result.error = (
            f"cannot write to the mail spool ({exc.strerror or exc}); nothing was removed from the server"
        )
        _record_failure(runtime, result.channel_id, result.error, ChannelStatus.ERROR)
    return {}


def _fetch(
    runtime: Runtime,
    result: FetchResult,
    factory: MailboxFactory,
    progress: Callable[[int, int], None] | None,
) -> dict[str, bytes]:
    with runtime.sessions() as session:
        channel = session.get(Channel, result.channel_id)
        if channel is None:
            result.skipped = "the mailbox no longer exists"
            return {}
        result.email = channel.email
        if channel.status in (ChannelStatus.DISABLED, ChannelStatus.NEEDS_REAUTH):
            result.skipped = f"the mailbox is {channel.status.value.replace('_', ' ')}"
            return {}
        token = _access_token(session, runtime, channel, force=False)
        transport = channel.transport
        session.commit()
    if transport is Transport.GRAPH:
        # Imported here: graph_fetch builds on this module's batches and progress reports.
        from postdesk.ingest.graph_fetch import fetch_graph  # noqa: PLC0415

        def fresh_token() -> str:
            return _fresh_token(runtime, result.channel_id)

        return fetch_graph(runtime, result, token, fresh_token=fresh_token, progress=progress)
    with factory(runtime) as mailbox:
        _login(runtime, mailbox, result.channel_id, result.email, token)
        return _run_pass(runtime, mailbox, result, progress)


def access_token_for_channel(session: Session, runtime: Runtime, channel: Channel) -> str:
    """A usable access token for the channel's mailbox (refreshed by MSAL when it is about to expire)."""
    return _access_token(session, runtime, channel, force=False)


def _access_token(session: Session, runtime: Runtime, channel: Channel, *, force: bool) -> str:
    if channel.microsoft_app is None:
        raise _Refused("no Microsoft 365 app is connected; set it up under Channels", ChannelStatus.ERROR)
    identity = MicrosoftIdentity(runtime.settings, channel.microsoft_app)
    try:
        return acquire_access_token(session, identity, channel, force_refresh=force).value
    except TokenError as exc:
        status = ChannelStatus(exc.explanation.channel_status)
        if exc.explanation.transient:
            raise TransportError(f"{exc.explanation.title} ({exc.reference}); retrying later") from exc
        raise _Refused(f"{exc.explanation.title}: {exc.explanation.fix} ({exc.reference})", status) from exc


def _fresh_token(runtime: Runtime, channel_id: int) -> str:
    with runtime.sessions() as session:
        channel = session.get(Channel, channel_id)
        assert channel is not None
        fresh = _access_token(session, runtime, channel, force=True)
        session.commit()
    return fresh


def _login(runtime: Runtime, mailbox: ImapMailbox, channel_id: int, email: str, token: str) -> None:
    try:
        mailbox.login(email, token)
        return
    except TransportError as exc:
        if not exc.needs_reauth:
            raise
    # A refused token may just be stale (revoked, rotated keys): refresh once and try again.
    fresh = _fresh_token(runtime, channel_id)
    try:
        mailbox.login(email, fresh)
    except TransportError as exc:
        if not exc.needs_reauth:
            raise
        raise _Refused(
            f"{exc}. Microsoft issued a fresh token but the IMAP server still refused it. Check that IMAP is "
            f"enabled for the mailbox (Exchange Online PowerShell: Set-CASMailbox -Identity {email} "
            "-ImapEnabled $true) and that the app has the delegated permission IMAP.AccessAsUser.All (for an "
            "app-only mailbox: the application permission IMAP.AccessAsApp, and FullAccess on the mailbox "
            "for the app's service principal through Add-MailboxPermission)",
            ChannelStatus.ERROR,
        ) from exc


def _run_pass(
    runtime: Runtime, mailbox: ImapMailbox, result: FetchResult, progress: Callable[[int, int], None] | None
) -> dict[str, bytes]:
    with runtime.sessions() as session:
        channel = session.get(Channel, result.channel_id)
        assert channel is not None
        folder = channel.folder
        after_fetch = _AfterFetch.of(channel)
        state = mailbox.open(folder)
        _finish_server_actions(session, mailbox, channel, state, after_fetch)
        _note_folder_state(session, mailbox, channel, state)
        uids = mailbox.uids_after(channel.imap_last_uid)
        uids = [uid for uid in uids if channel.imap_baseline_uid is None or uid >= channel.imap_baseline_uid]
        backlog = _backlog(session, mailbox, channel)
        waiting = not channel.backlog_confirmed and not channel.backlog_done
        result.backlog_waiting = channel.backlog_count if waiting else None
        session.commit()
    total = len(backlog) + len(uids)
    if total:
        after_fetch.prepare(mailbox)
    kept = _Kept()
    for is_backlog, todo in ((True, backlog), (False, uids)):
        for batch in _in_batches(mailbox.fetch(todo)):
            stored = _store_batch(runtime, result, folder, state, batch, is_backlog=is_backlog)
            _server_actions(runtime, mailbox, stored, after_fetch)
            kept.add(stored.spooled)
            result.fetched += len(batch)
            _report_progress(runtime, result, total, progress)
    if backlog:
        with runtime.sessions() as session, session.begin():
            channel = session.get(Channel, result.channel_id)
            assert channel is not None
            channel.backlog_done = True
    return kept.by_digest


def _in_batches(messages: Iterable[FetchedMessage]) -> Iterator[list[FetchedMessage]]:
    """Fetched mail in batches of ``BATCH`` messages, or fewer if they hold ``BATCH_BYTES`` already."""
    batch: list[FetchedMessage] = []
    size = 0
    for message in messages:
        batch.append(message)
        size += len(message.raw)
        if len(batch) >= BATCH or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@dataclass
class _Kept:
    """The bytes this pass stored, kept so that processing need not read them back from the spool; up
    to ``KEEP_BYTES`` in all (processing reads the rest from the spool)."""

    by_digest: dict[str, bytes] = field(default_factory=dict)
    size: int = 0

    def add(self, spooled: dict[str, bytes]) -> None:
        for digest, raw in spooled.items():
            if self.size + len(raw) <= KEEP_BYTES:
                self.by_digest[digest] = raw
                self.size += len(raw)


def _report_progress(
    runtime: Runtime, result: FetchResult, total: int, progress: Callable[[int, int], None] | None
) -> None:
    if progress is not None:
        progress(result.fetched, total)
    if total > BATCH:  # a large import: let the channel page show how far it got
        with runtime.sessions() as session, session.begin():
            session.execute(
                update(Channel)
                .where(Channel.id == result.channel_id)
                .values(last_fetch_summary=f"importing: {result.fetched} of {total} messages fetched")
                .execution_options(synchronize_session=False)
            )


def _note_folder_state(session: Session, mailbox: ImapMailbox, channel: Channel, state: FolderState) -> None:
    """Where new mail starts: at the first message that arrived after the mailbox was connected.

    Taken from arrival times (INTERNALDATE) rather than from UIDNEXT at the first fetch, so that mail
    sent in the seconds between signing in and the first fetch is new mail, not backlog. The same rule
    applies when the server renumbers the folder (UIDVALIDITY changes): what arrived since connecting
    is read again (stored copies are recognised and skipped), older mail stays as the admin decided.
    """
    if channel.imap_uidvalidity == state.uidvalidity:
        return
    since = (channel.connected_at or utcnow()) - ARRIVAL_MARGIN
    baseline = min(mailbox.uids_arrived_since(since), default=state.uidnext)
    if channel.imap_uidvalidity is not None:
        session.add(
            ChannelEvent(
                channel_id=channel.id,
                kind="resync",
                message=f"UIDVALIDITY changed from {channel.imap_uidvalidity} to {state.uidvalidity}; mail "
                "received since the mailbox was connected is read again without duplicating it.",
            )
        )
        # The old backlog decision stands, but its count refers to the old numbering.
        channel.backlog_count = None
    channel.imap_uidvalidity = state.uidvalidity
    channel.imap_baseline_uid = baseline
    channel.imap_last_uid = baseline - 1


def _backlog(session: Session, mailbox: ImapMailbox, channel: Channel) -> list[int]:
    baseline = channel.imap_baseline_uid
    if baseline is None or channel.backlog_done or channel.backlog_policy is BacklogPolicy.NONE:
        return []
    since = (
        channel.backlog_since.date()
        if channel.backlog_policy is BacklogPolicy.SINCE and channel.backlog_since
        else None
    )
    uids = mailbox.backlog_uids(
        baseline, unseen_only=channel.backlog_policy is BacklogPolicy.UNREAD, since=since
    )
    channel.backlog_count = len(uids)
    if not uids:
        channel.backlog_done = True
        return []
    return uids if channel.backlog_confirmed else []


@dataclass
class _Stored:
    uids: list[int]  # every message of the batch, now safe: the server copies may be flagged
    spooled: dict[str, bytes] = field(default_factory=dict)  # the bytes of the new rows, by SHA-256
    row_ids: list[int] = field(default_factory=list)  # the rows this batch added


def _store_batch(
    runtime: Runtime,
    result: FetchResult,
    folder: str,
    state: FolderState,
    messages: list[FetchedMessage],
    *,
    is_backlog: bool,
) -> _Stored:
    """Spool, then commit rows and the new last UID together."""
    digests = store_many(runtime.settings.spool_dir, [message.raw for message in messages])
    stored = _Stored(uids=[message.uid for message in messages])
    with runtime.sessions() as session, session.begin():
        # By digest alone, then the mailbox: given the channel too, PostgreSQL may walk all of the
        # mailbox's rows comparing each with every digest (20 ms a batch at 10,000 rows).
        known = {
            digest
            for channel_id, digest in session.execute(
                select(InboundMessage.channel_id, InboundMessage.sha256).where(
                    InboundMessage.sha256.in_(digests)
                )
            )
            if channel_id == result.channel_id
        }
        new: dict[str, FetchedMessage] = {}
        for message, digest in zip(messages, digests, strict=True):
            if digest not in known:  # else the same bytes again, e.g. after a UIDVALIDITY change
                new.setdefault(digest, message)
        if new:
            # DO NOTHING on the unique (channel, folder, UIDVALIDITY, UID): a worker whose lease ran out
            # while it fetched may store the same message as its successor; the first row stands.
            added = session.execute(
                insert_ignoring_duplicates(session, InboundMessage).returning(InboundMessage.id),
                [_row(result.channel_id, folder, state, message, digest) for digest, message in new.items()],
            )
            stored.row_ids = list(added.scalars())
            stored.spooled = {digest: message.raw for digest, message in new.items()}
        if messages:
            _note_new_mail(session, result.channel_id, max(stored.uids), is_backlog=is_backlog)
    return stored


def _row(
    channel_id: int, folder: str, state: FolderState, message: FetchedMessage, digest: str
) -> dict[str, object]:
    # Subject, sender and Message-ID are filled in when the row is processed, from the one full parse.
    return {
        "channel_id": channel_id,
        "folder": folder,
        "uidvalidity": state.uidvalidity,
        "uid": message.uid,
        "sha256": digest,
        "size": len(message.raw),
        "status": InboundStatus.STORED,
        "fetched_at": utcnow(),
    }


def _note_new_mail(session: Session, channel_id: int, highest_uid: int, *, is_backlog: bool) -> None:
    values: dict[str, object] = {"last_mail_at": utcnow()}
    if not is_backlog:
        values["imap_last_uid"] = case(
            (Channel.imap_last_uid < highest_uid, highest_uid), else_=Channel.imap_last_uid
        )
    session.execute(
        update(Channel)
        .where(Channel.id == channel_id)
        .values(values)
        .execution_options(synchronize_session=False)
    )


@dataclass
class _AfterFetch:
    """What becomes of the server copy of a stored message, as the channel says: flagged read (the
    default), deleted, or flagged read and moved to another folder. Read once per pass."""

    delete: bool
    move_to: str | None  # the folder as the admin named it ("Archive", "Inbox/Done")
    read_folder: str
    target: str | None = field(default=None, init=False)  # move_to as the server spells it

    @classmethod
    def of(cls, channel: Channel) -> _AfterFetch:
        # Deleting wins when both are set: the form offers one or the other.
        move_to = None if channel.delete_after_fetch else move_folder_of(channel)
        return cls(channel.delete_after_fetch, move_to, channel.folder)

    def prepare(self, mailbox: ImapMailbox) -> None:
        """Look up the folder to move to before any mail is fetched: while it is missing, the mail stays
        where it is, unfetched, and the channel says why. Looked up once per pass, and only when there
        is mail to act on."""
        if self.move_to is not None and self.target is None:
            self.target = move_target(mailbox.folders(), self.move_to, read_folder=self.read_folder)

    def apply(self, mailbox: ImapMailbox, uids: list[int]) -> None:
        if self.delete:
            mailbox.delete(uids)
            return
        mailbox.mark_seen(uids)  # also before a move, so that the moved copy is read
        if self.move_to is not None:
            self.prepare(mailbox)
            assert self.target is not None
            mailbox.move(uids, self.target)


def move_folder_of(channel: Channel) -> str | None:
    """The folder the channel moves fetched mail to, as a path without outer slashes; None: none."""
    return (channel.move_to_folder or "").strip().strip("/") or None


def move_target(folders: Sequence[str], wanted: str, *, read_folder: str) -> str:
    """The folder to move fetched mail to, as the server spells it: ``wanted`` exactly, else the folder
    whose path differs from it only in case ("Inbox/Done" for "INBOX/Done")."""
    matches = [name for name in folders if name == wanted] or [
        name for name in folders if name.lower() == wanted.lower()
    ]
    if not matches:
        raise TransportError(
            f"the folder {wanted!r} to move fetched mail to does not exist in the mailbox; create it in "
            "Outlook or choose another under Channels › the mailbox › Mail. Until then new mail stays "
            f"in {read_folder!r}, unfetched",
            permanent=True,
        )
    if matches[0].lower() == read_folder.lower():
        # Moving into the folder read would give each message a new UID: it would come back forever.
        raise TransportError(
            f"fetched mail is to be moved to {wanted!r}, the folder Postdesk reads; choose another "
            "under Channels › the mailbox › Mail",
            permanent=True,
        )
    return matches[0]


def _server_actions(
    runtime: Runtime, mailbox: ImapMailbox, stored: _Stored, after_fetch: _AfterFetch
) -> None:
    """Flag, delete or move the batch's server copies, then mark the rows it added done. A row another
    worker added meanwhile stays to be done: that worker, or the next pass, finishes it."""
    if not stored.uids:
        return
    after_fetch.apply(mailbox, stored.uids)
    if not stored.row_ids:
        return
    with runtime.sessions() as session, session.begin():
        session.execute(
            update(InboundMessage)
            .where(InboundMessage.id.in_(stored.row_ids))
            .values(server_done=True)
            .execution_options(synchronize_session=False)
        )


def _finish_server_actions(
    session: Session, mailbox: ImapMailbox, channel: Channel, state: FolderState, after_fetch: _AfterFetch
) -> None:
    """Flag, delete or move what an earlier pass stored but did not get to (it was interrupted, or the
    folder to move to was missing). Messages moved already are not found in the folder: skipped."""
    rows = list(
        session.scalars(
            select(InboundMessage).where(
                InboundMessage.channel_id == channel.id,
                InboundMessage.server_done.is_(False),
                InboundMessage.uidvalidity == state.uidvalidity,
                InboundMessage.folder == channel.folder,
            )
        )
    )
    if not rows:
        return
    after_fetch.apply(mailbox, [row.uid for row in rows])
    for row in rows:
        row.server_done = True


def _record_failure(runtime: Runtime, channel_id: int, message: str, status: ChannelStatus) -> None:
    log.warning("fetching channel %s failed: %s", channel_id, message)
    with runtime.sessions() as session, session.begin():
        channel = session.get(Channel, channel_id)
        if channel is None:
            return
        if channel.last_error != message:
            session.add(ChannelEvent(channel_id=channel_id, kind="error", message=message))
        channel.last_error = message
        channel.last_error_at = utcnow()
        if status is not ChannelStatus.OK:
            channel.status = status


def _record_success(runtime: Runtime, result: FetchResult) -> None:
    if result.error or result.skipped:
        return
    with runtime.sessions() as session, session.begin():
        channel = session.get(Channel, result.channel_id)
        if channel is None:
            return
        channel.last_fetch_at = utcnow()
        channel.last_fetch_summary = result.summary[:200]
        if result.processed.quarantined:
            # Every pass's counts are in last_fetch_summary; the log keeps the ones an admin must act on.
            session.add(
                ChannelEvent(
                    channel_id=channel.id,
                    kind="quarantined",
                    message=f"{result.summary[:180]}. Review them under Quarantine.",
                )
            )
        if channel.last_error:
            session.add(
                ChannelEvent(channel_id=channel.id, kind="recovered", message="Fetching works again.")
            )
        channel.last_error = None
        channel.last_error_at = None
        if channel.status is ChannelStatus.ERROR:
            channel.status = ChannelStatus.OK
