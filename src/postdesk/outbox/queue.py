"""Turning an agent's draft into an outbound article and its queued mail, in one transaction."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from postdesk.config import Settings
from postdesk.db.models import (
    Article,
    Attachment,
    Channel,
    ChannelStatus,
    Direction,
    OutboundMessage,
    Ticket,
    TicketState,
    User,
)
from postdesk.db.types import utcnow
from postdesk.mail.compose import (
    AddressError,
    OutgoingAttachment,
    OutgoingMail,
    compose,
    forwarded,
    new_message_id,
    parse_recipients,
    quote,
    references_for,
    reply_subject,
)
from postdesk.storage import read_bytes, store_bytes, store_many
from postdesk.tickets.service import NewArticle, add_article, change_state

log = logging.getLogger(__name__)

ReplyKind = Literal["reply", "reply_all", "forward"]


class DraftError(ValueError):
    """A draft that cannot be sent as it is; the message says what to change."""


class ReplyNotStored(DraftError):
    """The disk refused the reply's bytes (full, read-only). Not the author's doing, but shown the same
    way, so the web page keeps the draft and the API and command line say what happened."""


# A file an agent attaches is exactly what goes into the mail.
UploadedFile = OutgoingAttachment


@dataclass(frozen=True)
class Draft:
    """What an agent wrote. ``to``/``cc`` None: the recipients the kind implies (see ``recipients_for``);
    ``article_id`` None: answer the latest mail from outside."""

    kind: ReplyKind
    body_text: str
    to: tuple[str, ...] | None = None
    cc: tuple[str, ...] | None = None
    attachments: tuple[UploadedFile, ...] = ()
    article_id: int | None = None


# Exchange Online's default limit for a message sent through a mailbox, after base64 has grown the
# attachments by a third. Refusing here says so at once instead of after a 552 from the server.
MAX_MESSAGE_BYTES = 35 * 1024 * 1024


def queue_reply(
    session: Session, settings: Settings, ticket: Ticket, draft: Draft, *, author: User | None
) -> Article:
    """Store the outbound article, its attachments and its composed mail, queued for sending.

    Flushes but does not commit: the caller commits, so the article and its queue entry appear together.
    Raises ``DraftError`` for anything the author must change (no recipient, a bad address, no mailbox),
    and its ``ReplyNotStored`` when the disk cannot take the files (then nothing was added to the session).
    """
    channel = sending_channel(session, ticket)
    parent = parent_article(ticket, draft.article_id)
    to, cc = _recipients(draft, ticket, parent, own=own_addresses(session))
    if not draft.body_text.strip() and not (draft.kind == "forward" and parent is not None):
        raise DraftError("The reply is empty.")
    files = _attachments(settings, draft, parent)
    mail = OutgoingMail(
        sender_address=channel.email,
        sender_name=channel.sender_name or channel.display_name,
        to=to,
        cc=cc,
        subject=reply_subject(
            parent.subject if parent and parent.subject else ticket.title,
            ticket.number,
            prefix=settings.ticket_prefix,
            forward=draft.kind == "forward",
        ),
        body_text=_body(draft, parent),
        message_id=new_message_id(channel.email),
        date=utcnow(),
        in_reply_to=parent.message_id if parent and draft.kind != "forward" else None,
        references=references_for(parent.message_id, parent.references) if parent else (),
        attachments=files,
    )
    raw = compose(mail)
    if len(raw) > MAX_MESSAGE_BYTES:
        raise DraftError(
            f"The reply would be {len(raw) / 2**20:.1f} MB with its attachments; Microsoft 365 accepts "
            f"{MAX_MESSAGE_BYTES // 2**20} MB. Send fewer or smaller files, or share a link instead."
        )
    # Files first, rows after: a disk that refuses the bytes leaves nothing in the session to undo.
    spooled, attachment_digests = _store_files(settings, raw, mail.attachments)
    article = _store_article(
        session, ticket, mail, draft, author=author, channel=channel, attachment_digests=attachment_digests
    )
    session.add(
        OutboundMessage(
            article=article,
            channel_id=channel.id,
            message_id=mail.message_id,
            mail_from=channel.email,
            recipients="\n".join(mail.envelope_recipients),
            sha256=spooled,
            size=len(raw),
            next_attempt_at=utcnow(),
        )
    )
    if ticket.state is TicketState.NEW:
        change_state(ticket, TicketState.OPEN)
    session.flush()
    return article


def sending_channel(session: Session, ticket: Ticket) -> Channel:
    """The mailbox a ticket's replies go out through: the one it came in by, else the only one there is."""
    if ticket.channel_id is not None:
        channel = session.get(Channel, ticket.channel_id)
    else:
        candidates = session.scalars(select(Channel).where(Channel.status != ChannelStatus.DISABLED)).all()
        channel = candidates[0] if len(candidates) == 1 else None
    if channel is None:
        raise DraftError(
            "This ticket has no mailbox to reply from: it did not come in by mail and more than one "
            "(or no) mailbox is connected. Add a note instead, or connect a mailbox under Channels."
        )
    if channel.status is ChannelStatus.DISABLED:
        raise DraftError(
            f"The mailbox {channel.email} is disabled; enable it under Channels to send replies."
        )
    return channel


def recipients_for(
    ticket: Ticket, kind: ReplyKind, parent: Article | None, *, own: frozenset[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Who a reply, reply-all or forward goes to when the agent does not say: (to, cc)."""
    if kind == "forward":
        return (), ()
    if parent is None or parent.direction is Direction.OUTBOUND:
        to = _addresses(parent.to_addresses) if parent is not None else ()
        to = tuple(a for a in to if a not in own) or (ticket.customer.email,)
    elif ticket.articles and parent.id == ticket.articles[0].id:
        to = (ticket.customer.email,)  # the customer's address honours the first mail's Reply-To
    else:
        to = tuple(a for a in _addresses(parent.sender) if a not in own) or (ticket.customer.email,)
    if kind == "reply" or parent is None:
        return to, ()
    others = _addresses(parent.to_addresses) + _addresses(parent.cc_addresses)
    cc = tuple(dict.fromkeys(a for a in others if a not in own and a not in to))
    return to, cc


def own_addresses(session: Session) -> frozenset[str]:
    return frozenset(email.lower() for email in session.scalars(select(Channel.email)))


def _addresses(header: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(a.lower() for _n, a in getaddresses([header or ""]) if "@" in a))


def parent_article(ticket: Ticket, article_id: int | None) -> Article | None:
    if article_id is not None:
        for article in ticket.articles:
            if article.id == article_id and not article.internal:
                return article
        raise DraftError(f"Article {article_id} is not a message of ticket #{ticket.number}.")
    mails = [a for a in ticket.articles if not a.internal]
    inbound = [a for a in mails if a.direction is Direction.INBOUND]
    candidates = inbound or mails
    return candidates[-1] if candidates else None


def _recipients(
    draft: Draft, ticket: Ticket, parent: Article | None, *, own: frozenset[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    default_to, default_cc = recipients_for(ticket, draft.kind, parent, own=own)
    try:
        to = default_to if draft.to is None else parse_recipients(", ".join(draft.to))
        cc = default_cc if draft.cc is None else parse_recipients(", ".join(draft.cc))
    except AddressError as exc:
        raise DraftError(str(exc)) from exc
    if not to:
        raise DraftError(
            "Say who the message goes to." if draft.kind == "forward" else "The reply has no recipient."
        )
    sent_to_self = [a for a in (*to, *cc) if a in own]
    if sent_to_self:
        raise DraftError(
            f"{sent_to_self[0]} is a mailbox of this help desk; mail sent to it would come back as a ticket."
        )
    return to, tuple(a for a in cc if a not in to)


def _body(draft: Draft, parent: Article | None) -> str:
    text = draft.body_text.strip()
    if parent is None:
        return text
    sender = parent.sender or (parent.author.display_name if parent.author else "")
    if draft.kind == "forward":
        original = forwarded(
            parent.body_text,
            sender=sender,
            sent_at=parent.created_at,
            subject=parent.subject,
            to=parent.to_addresses,
        )
        return f"{text}\n\n{original}" if text else original
    return f"{text}\n\n{quote(parent.body_text, sender=sender, sent_at=parent.created_at)}"


def _attachments(settings: Settings, draft: Draft, parent: Article | None) -> tuple[OutgoingAttachment, ...]:
    files = list(draft.attachments)
    if draft.kind == "forward" and parent is not None:
        files += [
            OutgoingAttachment(a.filename, read_bytes(settings.attachments_dir, a.sha256), a.content_type)
            for a in parent.attachments
            if not a.inline
        ]
    return tuple(files)


def _store_files(
    settings: Settings, raw: bytes, attachments: tuple[OutgoingAttachment, ...]
) -> tuple[str, list[str]]:
    """Write the composed mail to the spool and the attachments to their store: (mail's SHA-256,
    attachments' SHA-256s). Raises ``ReplyNotStored`` when the disk refuses them."""
    try:
        spooled = store_bytes(settings.spool_dir, raw)
        return spooled, store_many(settings.attachments_dir, [a.content for a in attachments])
    except OSError as exc:
        log.error("could not store an outgoing reply: %s", exc)
        raise ReplyNotStored(
            f"The reply was not saved: Postdesk cannot write to its data directory "
            f"({exc.strerror or exc}). Nothing was queued or sent. An administrator must check the disk "
            "that holds POSTDESK_DATA_DIR (is it full, or mounted read-only?); then send the reply again."
        ) from exc


def _store_article(
    session: Session,
    ticket: Ticket,
    mail: OutgoingMail,
    draft: Draft,
    *,
    author: User | None,
    channel: Channel,
    attachment_digests: list[str],
) -> Article:
    sender = f"{mail.sender_name} <{mail.sender_address}>" if mail.sender_name else mail.sender_address
    article = add_article(
        session,
        ticket,
        NewArticle(
            direction=Direction.OUTBOUND,
            body_text=draft.body_text.strip(),
            sender=sender,
            subject=mail.subject,
            to_addresses=", ".join(mail.to),
            cc_addresses=", ".join(mail.cc),
            message_id=mail.message_id,
            in_reply_to=mail.in_reply_to,
            references=" ".join(mail.references) or None,
            author=author,
            channel=channel,
        ),
    )
    for attachment, digest in zip(mail.attachments, attachment_digests, strict=True):
        article.attachments.append(
            Attachment(
                filename=attachment.filename[:255],
                content_type=attachment.content_type[:255],
                size=len(attachment.content),
                sha256=digest,
            )
        )
    return article
