"""One fetch pass over a mailbox read through Microsoft Graph (a channel whose transport is GRAPH).

The promise of the IMAP pass in ``fetch.py``, with a delta link where IMAP has UIDs:
1. each new message's MIME (``/messages/{id}/$value``) is written to the spool and fsynced;
2. its inbound row is committed under the key (channel, folder id, 0, a number derived from the
   message's immutable id), the key IMAP rows use for (folder, UIDVALIDITY, UID);
3. only then is the server copy flagged read, deleted or moved, as the channel says, and the row
   marked ``server_done``;
4. the round's new delta link is saved once every message of the round is stored.
A crash before 4 replays the round from the old link: messages stored already are recognised by their
key before their MIME is downloaded again, and a second insert would be ignored by the unique key.

What counts as new mail: every message a round reports as created in the folder. A round without a
link (the first one, or Graph's full round after it lost the delta state) lists the whole folder; there
only mail received since the mailbox was connected is new. Older mail is the backlog and follows the
channel's first-connection choice, as over IMAP: counted on the first round, imported once the admin
confirms, by a full round of its own whose link is not kept.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from postdesk.db.models import BacklogPolicy, Channel, InboundMessage, InboundStatus
from postdesk.db.session import insert_ignoring_duplicates
from postdesk.db.types import utcnow
from postdesk.ingest.fetch import (
    ARRIVAL_MARGIN,
    BATCH,
    BATCH_BYTES,
    FetchResult,
    _Kept,
    _report_progress,
    move_folder_of,
    move_target,
)
from postdesk.microsoft.clouds import endpoints_for
from postdesk.microsoft.identity import tls_context
from postdesk.runtime import Runtime
from postdesk.storage import store_many
from postdesk.transports.errors import TransportError
from postdesk.transports.graph import DeltaMessage, GraphMailbox, TokenSource

log = logging.getLogger(__name__)

# The folder read when the admin chose none: Graph's well-known name, resolved to its id once.
DEFAULT_FOLDER = "inbox"
# Graph rows have no UIDVALIDITY: the folder id and the message's immutable id identify them.
GRAPH_UIDVALIDITY = 0
UID_MASK = (1 << 63) - 1  # the uid column is a signed 64-bit integer


def uid_for(message_id: str) -> int:
    """The inbound row's uid for a Graph message: the first 8 bytes of its id's SHA-256, in 63 bits.

    Stable because Postdesk asks for immutable ids, which survive moves between folders. Two ids
    colliding in one folder would need about 3 billion messages there."""
    digest = hashlib.sha256(message_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & UID_MASK


# ---------------------------------------------------------------------------------------------
# The channel's mailbox on Graph
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphAccount:
    """Which mailbox a channel reaches through Graph, and as whom."""

    email: str
    delegate: str | None
    shared: bool
    app_only: bool

    @classmethod
    def of(cls, channel: Channel) -> GraphAccount:
        return cls(channel.email, channel.account_username, channel.shared, channel.app_only)

    @property
    def address(self) -> str | None:
        """The mailbox in Graph's URLs: None (``/me``) for the signed-in account's own mailbox."""
        return self.email if self.shared or self.app_only else None


def open_channel_mailbox(runtime: Runtime, account: GraphAccount, token: TokenSource) -> GraphMailbox:
    return GraphMailbox(
        endpoints_for(runtime.settings).graph_url,
        account.address,
        token=token,
        ssl_context=tls_context(runtime.settings),
        delegate=account.delegate,
        app_only=account.app_only,
    )


# ---------------------------------------------------------------------------------------------
# One pass
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What a pass needs from the channel row, read once at its start."""

    channel_id: int
    account: GraphAccount
    folder: str  # the folder's path as the admin chose it ("INBOX", "Inbox/Customers")
    folder_id: str | None
    delta_link: str | None
    delete_after_fetch: bool
    move_to_folder: str | None  # a path ("Archive", "Inbox/Done"); None when deleting or not moving
    new_since: datetime  # a full round's mail received from then on is new mail
    backlog_policy: BacklogPolicy
    backlog_since: datetime | None
    backlog_open: bool  # the backlog is neither imported nor empty
    backlog_confirmed: bool

    @classmethod
    def of(cls, channel: Channel) -> _Plan:
        return cls(
            channel_id=channel.id,
            account=GraphAccount.of(channel),
            folder=channel.folder,
            folder_id=channel.graph_folder_id,
            delta_link=channel.graph_delta_link,
            delete_after_fetch=channel.delete_after_fetch,
            # Deleting wins when both are set: the form offers one or the other.
            move_to_folder=None if channel.delete_after_fetch else move_folder_of(channel),
            new_since=(channel.connected_at or channel.created_at or utcnow()) - ARRIVAL_MARGIN,
            backlog_policy=channel.backlog_policy,
            backlog_since=channel.backlog_since,
            backlog_open=not channel.backlog_done and channel.backlog_policy is not BacklogPolicy.NONE,
            backlog_confirmed=channel.backlog_confirmed,
        )

    def is_new(self, message: DeltaMessage, *, full_round: bool) -> bool:
        return not full_round or message.received is None or message.received >= self.new_since

    def wants_from_backlog(self, message: DeltaMessage) -> bool:
        """An older message the first-connection choice imports."""
        if self.is_new(message, full_round=True):
            return False
        if self.backlog_policy is BacklogPolicy.UNREAD:
            return message.is_read is not True
        if self.backlog_policy is BacklogPolicy.SINCE and self.backlog_since is not None:
            return message.received is None or message.received >= self.backlog_since
        return self.backlog_policy is BacklogPolicy.ALL or self.backlog_policy is BacklogPolicy.SINCE


Progress = Callable[[int, int], None] | None


@dataclass
class _Pass:
    """What one fetch pass carries from round to round: where it reads, what it stored, whom it tells."""

    runtime: Runtime
    mailbox: GraphMailbox
    plan: _Plan
    folder_id: str
    result: FetchResult
    kept: _Kept
    progress: Progress
    move_to_id: str | None = None  # the folder to move fetched mail to, looked up once per pass


def fetch_graph(
    runtime: Runtime,
    result: FetchResult,
    token: str,
    *,
    fresh_token: Callable[[], str],
    progress: Progress = None,
) -> dict[str, bytes]:
    """Fetch and store the channel's new mail through Graph; returns the stored bytes kept in memory
    for processing, by SHA-256. ``fresh_token`` forces a new access token, for one retry when Graph
    refuses the first (revoked, keys rotated)."""
    try:
        return _fetch_pass(runtime, result, token, progress)
    except TransportError as exc:
        if not exc.needs_reauth:
            raise
        log.info("Graph refused the access token of channel %s; trying a fresh one", result.channel_id)
    # Replaying the pass is safe: what the first attempt stored is recognised and skipped.
    return _fetch_pass(runtime, result, fresh_token(), progress)


def _fetch_pass(runtime: Runtime, result: FetchResult, token: str, progress: Progress) -> dict[str, bytes]:
    with runtime.sessions() as session:
        channel = session.get(Channel, result.channel_id)
        assert channel is not None
        plan = _Plan.of(channel)
    kept = _Kept()
    with open_channel_mailbox(runtime, plan.account, token) as mailbox:
        folder_id = plan.folder_id or _settle_folder(runtime, mailbox, plan.channel_id, plan.folder)
        fetch_pass = _Pass(runtime, mailbox, plan, folder_id, result, kept, progress)
        _finish_server_actions(fetch_pass)
        counted = _new_mail_round(fetch_pass)
        if plan.backlog_open and plan.backlog_confirmed:
            _backlog_round(fetch_pass)
        elif counted is not None:
            _note_backlog_count(runtime, plan.channel_id, counted)
            result.backlog_waiting = counted or None
    return kept.by_digest


def _settle_folder(runtime: Runtime, mailbox: GraphMailbox, channel_id: int, folder: str) -> str:
    """The id of the folder chosen by its path (the Inbox by default), kept on the channel: Graph's ids
    survive renames, paths do not. A new folder starts a new delta round."""
    wanted = folder.strip().strip("/").lower()
    if wanted in ("", DEFAULT_FOLDER):
        folder_id = mailbox.folder_id(DEFAULT_FOLDER)
    else:
        found = [choice.id for choice in mailbox.folders() if choice.path.lower() == wanted]
        if not found:
            raise TransportError(
                f"the mailbox has no folder {folder!r}; choose one under Channels › the mailbox › Mail",
                permanent=True,
            )
        folder_id = found[0]
    with runtime.sessions() as session, session.begin():
        session.execute(
            update(Channel)
            .where(Channel.id == channel_id)
            .values(graph_folder_id=folder_id, graph_delta_link=None)
            .execution_options(synchronize_session=False)
        )
    return folder_id


def _new_mail_round(fetch_pass: _Pass) -> int | None:
    """Store what is new since the delta link, then save the round's link. On the first round also
    counts the backlog the first-connection choice would import (returned; None on later rounds)."""
    plan = fetch_pass.plan
    # Only creations: Postdesk's own "read" flags would otherwise come back as changes every round.
    round_ = fetch_pass.mailbox.delta(fetch_pass.folder_id, plan.delta_link, change_type="created")
    first_round = plan.delta_link is None
    backlog = 0
    for page in round_:
        full_round = first_round or page.resync
        new = [m for m in page.messages if plan.is_new(m, full_round=full_round)]
        if first_round and plan.backlog_open:
            backlog += sum(1 for m in page.messages if plan.wants_from_backlog(m))
        _store_messages(fetch_pass, new)
    if round_.resynced:
        log.warning("channel %s: Graph lost the delta state; the folder was read afresh", plan.channel_id)
    save_delta_link(fetch_pass.runtime, plan.channel_id, round_.delta_link)
    return backlog if first_round and plan.backlog_open else None


def save_delta_link(runtime: Runtime, channel_id: int, delta_link: str) -> None:
    """Where the next round starts; saved only once the whole round is stored."""
    with runtime.sessions() as session, session.begin():
        session.execute(
            update(Channel)
            .where(Channel.id == channel_id)
            .values(graph_delta_link=delta_link)
            .execution_options(synchronize_session=False)
        )


def _backlog_round(fetch_pass: _Pass) -> None:
    """Import the confirmed backlog: a full round of its own, keeping the older mail the choice wants.
    Interrupted, it runs again at the next pass; what it stored already is skipped."""
    plan = fetch_pass.plan
    for page in fetch_pass.mailbox.delta(fetch_pass.folder_id):
        wanted = [m for m in page.messages if plan.wants_from_backlog(m)]
        _store_messages(fetch_pass, wanted)
    with fetch_pass.runtime.sessions() as session, session.begin():
        channel = session.get(Channel, plan.channel_id)
        assert channel is not None
        channel.backlog_done = True


def _note_backlog_count(runtime: Runtime, channel_id: int, count: int) -> None:
    with runtime.sessions() as session, session.begin():
        channel = session.get(Channel, channel_id)
        assert channel is not None
        channel.backlog_count = count
        if not count:
            channel.backlog_done = True


# ---------------------------------------------------------------------------------------------
# Storing messages, then touching the server copies
# ---------------------------------------------------------------------------------------------


def _store_messages(fetch_pass: _Pass, messages: Sequence[DeltaMessage]) -> None:
    runtime, mailbox, plan = fetch_pass.runtime, fetch_pass.mailbox, fetch_pass.plan
    folder_id, result = fetch_pass.folder_id, fetch_pass.result
    known = _known_uids(runtime, plan.channel_id, folder_id, [uid_for(m.id) for m in messages])
    todo = [m for m in messages if uid_for(m.id) not in known]
    if todo and plan.move_to_folder is not None:
        # Before anything is downloaded: while the folder is missing, the mail stays where it is.
        _move_target_id(fetch_pass, plan.move_to_folder)
    total = result.fetched + len(todo)  # as far as this page tells: delta rounds have no total
    for batch in _downloaded(mailbox, todo):
        fetch_pass.kept.add(_store_batch(runtime, plan.channel_id, folder_id, batch))
        _server_actions(fetch_pass, [message_id for message_id, _raw in batch])
        result.fetched += len(batch)
        _report_progress(runtime, result, total, fetch_pass.progress)


def _known_uids(runtime: Runtime, channel_id: int, folder_id: str, uids: list[int]) -> set[int]:
    if not uids:
        return set()
    with runtime.sessions() as session:
        return set(
            session.scalars(
                select(InboundMessage.uid).where(
                    InboundMessage.channel_id == channel_id,
                    InboundMessage.folder == folder_id,
                    InboundMessage.uidvalidity == GRAPH_UIDVALIDITY,
                    InboundMessage.uid.in_(uids),
                )
            )
        )


def _downloaded(
    mailbox: GraphMailbox, messages: Sequence[DeltaMessage]
) -> Iterator[list[tuple[str, bytes]]]:
    """(id, MIME) of each message still there, in batches of ``BATCH`` or ``BATCH_BYTES``."""
    batch: list[tuple[str, bytes]] = []
    size = 0
    for message in messages:
        raw = mailbox.raw(message.id)
        if raw is None:  # moved or deleted since the round listed it
            continue
        batch.append((message.id, raw))
        size += len(raw)
        if len(batch) >= BATCH or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _store_batch(
    runtime: Runtime, channel_id: int, folder_id: str, batch: list[tuple[str, bytes]]
) -> dict[str, bytes]:
    """Spool, then commit the rows; returns the bytes of the new rows by SHA-256."""
    digests = store_many(runtime.settings.spool_dir, [raw for _id, raw in batch])
    with runtime.sessions() as session, session.begin():
        known = set(
            session.scalars(
                select(InboundMessage.sha256).where(
                    InboundMessage.channel_id == channel_id, InboundMessage.sha256.in_(digests)
                )
            )
        )
        new: dict[str, tuple[str, bytes]] = {}
        for (message_id, raw), digest in zip(batch, digests, strict=True):
            if digest not in known:  # else the very same bytes again (a copy filed twice)
                new.setdefault(digest, (message_id, raw))
        if new:
            # DO NOTHING on the unique key: a worker whose lease ran out mid-round may store the same
            # message as its successor; the first row stands.
            session.execute(
                insert_ignoring_duplicates(session, InboundMessage),
                [
                    _row(channel_id, folder_id, message_id, raw, digest)
                    for digest, (message_id, raw) in new.items()
                ],
            )
        session.execute(
            update(Channel)
            .where(Channel.id == channel_id)
            .values(last_mail_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return {digest: raw for digest, (_id, raw) in new.items()}


def _row(channel_id: int, folder_id: str, message_id: str, raw: bytes, digest: str) -> dict[str, Any]:
    # Subject, sender and Message-ID are filled in when the row is processed, from the one full parse.
    return {
        "channel_id": channel_id,
        "folder": folder_id,
        "uidvalidity": GRAPH_UIDVALIDITY,
        "uid": uid_for(message_id),
        "remote_id": message_id,
        "sha256": digest,
        "size": len(raw),
        "status": InboundStatus.STORED,
        "fetched_at": utcnow(),
    }


def _server_actions(fetch_pass: _Pass, message_ids: list[str]) -> None:
    """Flag the stored messages read (and move them, if the channel says so) or delete them, then note
    that on their rows. Messages gone meanwhile are skipped by the client."""
    runtime, mailbox, plan = fetch_pass.runtime, fetch_pass.mailbox, fetch_pass.plan
    if plan.delete_after_fetch:
        mailbox.delete(message_ids)
    else:
        mailbox.mark_read(message_ids)  # also before a move, so that the moved copy is read
        if plan.move_to_folder is not None:
            # With immutable ids a message keeps its id in the new folder: its row stays valid.
            mailbox.move(message_ids, _move_target_id(fetch_pass, plan.move_to_folder))
    with runtime.sessions() as session, session.begin():
        session.execute(
            update(InboundMessage)
            .where(
                InboundMessage.channel_id == plan.channel_id,
                InboundMessage.folder == fetch_pass.folder_id,
                InboundMessage.uidvalidity == GRAPH_UIDVALIDITY,
                InboundMessage.uid.in_([uid_for(message_id) for message_id in message_ids]),
            )
            .values(server_done=True)
            .execution_options(synchronize_session=False)
        )


def _move_target_id(fetch_pass: _Pass, path: str) -> str:
    """The id of the folder to move fetched mail to, found by its path as the read folder is."""
    if fetch_pass.move_to_id is None:
        choices = fetch_pass.mailbox.folders()
        found = move_target([choice.path for choice in choices], path, read_folder=fetch_pass.plan.folder)
        fetch_pass.move_to_id = next(choice.id for choice in choices if choice.path == found)
    return fetch_pass.move_to_id


def _finish_server_actions(fetch_pass: _Pass) -> None:
    """Flag, delete or move what an earlier pass stored but did not get to (it was interrupted, or the
    folder to move to was missing)."""
    runtime, plan, folder_id = fetch_pass.runtime, fetch_pass.plan, fetch_pass.folder_id
    with runtime.sessions() as session:
        pending = list(
            session.scalars(
                select(InboundMessage.remote_id).where(
                    InboundMessage.channel_id == plan.channel_id,
                    InboundMessage.folder == folder_id,
                    InboundMessage.uidvalidity == GRAPH_UIDVALIDITY,
                    InboundMessage.server_done.is_(False),
                    InboundMessage.remote_id.is_not(None),
                )
            )
        )
    message_ids = [message_id for message_id in pending if message_id]
    if message_ids:
        # Messages gone meanwhile are skipped by the client; their rows count as done too. A message
        # moved already is found by its immutable id where it is now and sent to that folder again.
        _server_actions(fetch_pass, message_ids)
