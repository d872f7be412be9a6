"""The help-desk schema: people, tickets and their articles, mail channels and Microsoft credentials."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from postdesk.db.types import EncryptedText, UTCDateTime, utcnow

# Explicit constraint names keep Alembic migrations identical on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

EMAIL_LENGTH = 320  # RFC 5321: 64 for the local part, 255 for the domain, and the "@"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime}


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings with a CHECK constraint, so adding a value is a small migration.
    return Enum(cls, name=name, native_enum=False, length=24, values_callable=lambda e: [m.value for m in e])


class Role(enum.StrEnum):
    ADMIN = "admin"
    AGENT = "agent"


class TicketState(enum.StrEnum):
    NEW = "new"
    OPEN = "open"
    PENDING_REMINDER = "pending_reminder"
    CLOSED = "closed"


class Direction(enum.StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class InboundStatus(enum.StrEnum):
    STORED = "stored"  # raw bytes safe in the spool, not yet turned into an article
    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"


class BacklogPolicy(enum.StrEnum):
    """What to do with mail that was already in the folder when the mailbox was connected."""

    UNREAD = "unread"
    ALL = "all"
    SINCE = "since"
    NONE = "none"


class DeliveryStatus(enum.StrEnum):
    QUEUED = "queued"  # waiting for its first or next attempt
    SENDING = "sending"  # handed to a sender; if the lease runs out, the outcome must be checked
    SENT = "sent"  # the server accepted it
    FAILED = "failed"  # refused for good; the reason is on the row in plain words


class Transport(enum.StrEnum):
    IMAP = "imap"
    GRAPH = "graph"


class ChannelStatus(enum.StrEnum):
    OK = "ok"
    NEEDS_REAUTH = "needs_reauth"
    ERROR = "error"
    DISABLED = "disabled"


group_members = Table(
    "group_members",
    Base.metadata,
    Column("group_id", ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
)


class User(Base):
    """An agent or admin who signs in to the web UI."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(EMAIL_LENGTH), unique=True)
    display_name: Mapped[str] = mapped_column(String(200))
    password_hash: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(_enum(Role, "user_role"), default=Role.AGENT)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None]

    groups: Mapped[list[Group]] = relationship(secondary=group_members, back_populates="members")

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


class Group(Base):
    """A team that owns tickets, e.g. "Support" or "Billing"; each mail channel routes into one."""

    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    members: Mapped[list[User]] = relationship(secondary=group_members, back_populates="groups")


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(EMAIL_LENGTH), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TicketCounter(Base):
    """One row holding the last ticket number handed out (UPDATE … RETURNING keeps it race-free)."""

    __tablename__ = "ticket_counter"

    id: Mapped[int] = mapped_column(primary_key=True)
    last_number: Mapped[int] = mapped_column(Integer)


class Ticket(Base):
    __tablename__ = "tickets"
    __table_args__ = (
        Index("ix_tickets_state_updated_at", "state", "updated_at"),
        Index("ix_tickets_group_id_updated_at", "group_id", "updated_at"),
        # "Open tickets of my group", the most common list an agent looks at.
        Index("ix_tickets_group_id_state_updated_at", "group_id", "state", "updated_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    number: Mapped[int] = mapped_column(Integer, unique=True)
    title: Mapped[str] = mapped_column(String(998))
    state: Mapped[TicketState] = mapped_column(_enum(TicketState, "ticket_state"), default=TicketState.NEW)
    group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id", ondelete="SET NULL"))
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    channel_id: Mapped[int | None] = mapped_column(ForeignKey("channels.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    pending_until: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]

    group: Mapped[Group | None] = relationship()
    customer: Mapped[Customer] = relationship()
    owner: Mapped[User | None] = relationship()
    articles: Mapped[list[Article]] = relationship(
        back_populates="ticket", order_by="(Article.created_at, Article.id)", cascade="all, delete-orphan"
    )


class Article(Base):
    """One message in a ticket's conversation: an email in or out, or an internal note."""

    __tablename__ = "articles"

    id: Mapped[int] = mapped_column(primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"), index=True)
    direction: Mapped[Direction] = mapped_column(_enum(Direction, "article_direction"))
    internal: Mapped[bool] = mapped_column(Boolean, default=False)
    sender: Mapped[str] = mapped_column(Text, default="")
    to_addresses: Mapped[str] = mapped_column(Text, default="")
    cc_addresses: Mapped[str] = mapped_column(Text, default="")
    subject: Mapped[str] = mapped_column(Text, default="")
    body_text: Mapped[str] = mapped_column(Text, default="")
    # Stored as received; sanitised when displayed, never trusted.
    body_html: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    in_reply_to: Mapped[str | None] = mapped_column(Text)
    references: Mapped[str | None] = mapped_column(Text)
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    channel_id: Mapped[int | None] = mapped_column(ForeignKey("channels.id", ondelete="SET NULL"))
    # Auto-replies, bulk mail and bounces are kept but never answered automatically.
    auto_generated: Mapped[bool] = mapped_column(Boolean, default=False)
    classification: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    ticket: Mapped[Ticket] = relationship(back_populates="articles")
    author: Mapped[User | None] = relationship()
    attachments: Mapped[list[Attachment]] = relationship(
        back_populates="article", order_by="Attachment.id", cascade="all, delete-orphan"
    )
    delivery: Mapped[OutboundMessage | None] = relationship(back_populates="article")


class Attachment(Base):
    """Metadata of a file attached to an article; the bytes live on disk, addressed by SHA-256."""

    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(primary_key=True)
    article_id: Mapped[int] = mapped_column(ForeignKey("articles.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(255), default="application/octet-stream")
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    content_id: Mapped[str | None] = mapped_column(String(998))
    inline: Mapped[bool] = mapped_column(Boolean, default=False)

    article: Mapped[Article] = relationship(back_populates="attachments")


class MicrosoftApp(Base):
    """The Entra ID app registration Postdesk signs in with (one per installation, in practice)."""

    __tablename__ = "microsoft_apps"

    id: Mapped[int] = mapped_column(primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64))
    tenant: Mapped[str] = mapped_column(String(255))
    cloud: Mapped[str] = mapped_column(String(16), default="global")
    account_types: Mapped[str] = mapped_column(String(24), default="single")
    client_secret: Mapped[str | None] = mapped_column(EncryptedText("microsoft_app.client_secret"))
    client_secret_expires_at: Mapped[datetime | None]
    certificate_pem: Mapped[str | None] = mapped_column(Text)
    certificate_thumbprint: Mapped[str | None] = mapped_column(String(64))
    certificate_private_key: Mapped[str | None] = mapped_column(
        EncryptedText("microsoft_app.certificate_private_key")
    )
    certificate_expires_at: Mapped[datetime | None]
    # A new certificate is used only once the admin says it is uploaded, so sign-ins keep working meanwhile.
    use_certificate: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def credential_kind(self) -> str | None:
        if self.use_certificate and self.certificate_private_key:
            return "certificate"
        return "secret" if self.client_secret else None


class Channel(Base):
    """A connected Microsoft 365 mailbox: where mail is read from and replies are sent through."""

    __tablename__ = "channels"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(EMAIL_LENGTH), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    # The name customers see on replies ("Contoso Support"); empty: the mailbox's own display name.
    sender_name: Mapped[str] = mapped_column(String(200), default="")
    transport: Mapped[Transport] = mapped_column(
        _enum(Transport, "channel_transport"), default=Transport.IMAP
    )
    # A shared mailbox: ``email`` is the shared address, ``account_username`` the delegate who signed in
    # (FullAccess to read, SendAs to reply). App-only: no one signs in; the app's own permissions.
    shared: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    app_only: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    status: Mapped[ChannelStatus] = mapped_column(
        _enum(ChannelStatus, "channel_status"), default=ChannelStatus.OK
    )
    group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id", ondelete="SET NULL"))
    microsoft_app_id: Mapped[int | None] = mapped_column(ForeignKey("microsoft_apps.id", ondelete="SET NULL"))
    tenant_id: Mapped[str | None] = mapped_column(String(64))
    # The identity that signed in; re-authentication must be by the same one.
    account_oid: Mapped[str | None] = mapped_column(String(64))
    account_username: Mapped[str | None] = mapped_column(String(EMAIL_LENGTH))
    token_cache: Mapped[str | None] = mapped_column(EncryptedText("channel.token_cache"))
    # When the refresh token was last redeemed on purpose; the heartbeat keeps it under a week.
    token_refreshed_at: Mapped[datetime | None]
    folder: Mapped[str] = mapped_column(String(255), default="INBOX")
    delete_after_fetch: Mapped[bool] = mapped_column(Boolean, default=False)
    # Where a fetched message is moved once stored (a path like "Archive" or "Inbox/Done"); None: it
    # stays in ``folder``. ``delete_after_fetch`` wins when both are set.
    move_to_folder: Mapped[str | None] = mapped_column(String(255))
    max_message_bytes: Mapped[int] = mapped_column(Integer, default=25 * 1024 * 1024)
    fetch_interval_seconds: Mapped[int] = mapped_column(Integer, default=30)
    # Where the folder stood when it was first opened: UIDs below the baseline are the backlog.
    imap_uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    imap_baseline_uid: Mapped[int | None] = mapped_column(BigInteger)
    imap_last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    # Graph: the folder read (its id) and the delta link that says where the last round ended.
    graph_folder_id: Mapped[str | None] = mapped_column(String(512))
    graph_delta_link: Mapped[str | None] = mapped_column(Text)
    backlog_policy: Mapped[BacklogPolicy] = mapped_column(
        _enum(BacklogPolicy, "backlog_policy"), default=BacklogPolicy.UNREAD
    )
    backlog_since: Mapped[datetime | None]
    backlog_count: Mapped[int | None] = mapped_column(Integer)
    backlog_confirmed: Mapped[bool] = mapped_column(Boolean, default=False)
    backlog_done: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    connected_at: Mapped[datetime | None]
    last_fetch_at: Mapped[datetime | None]
    last_fetch_summary: Mapped[str] = mapped_column(String(200), default="")
    last_mail_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None]
    # Alert when no mail arrived for this many hours (None: off, for quiet mailboxes).
    watchdog_hours: Mapped[int | None] = mapped_column(Integer)
    # Transient token failures in a row, and since when: escalated to an error only when they persist.
    token_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    token_failing_since: Mapped[datetime | None]
    token_refresh_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Which worker fetches this mailbox, until when (renewed by its heartbeat; free to take after).
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_until: Mapped[datetime | None]

    group: Mapped[Group | None] = relationship()
    microsoft_app: Mapped[MicrosoftApp | None] = relationship()


class InboundMessage(Base):
    """One message fetched from a mailbox: its raw bytes are in the spool before this row is committed,
    and the row is committed before the server copy is flagged or deleted."""

    __tablename__ = "inbound_messages"
    __table_args__ = (
        UniqueConstraint("channel_id", "folder", "uidvalidity", "uid"),
        Index("ix_inbound_messages_channel_id_status", "channel_id", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    channel_id: Mapped[int] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"))
    folder: Mapped[str] = mapped_column(String(255))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uid: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(Integer)
    status: Mapped[InboundStatus] = mapped_column(
        _enum(InboundStatus, "inbound_status"), default=InboundStatus.STORED
    )
    reason: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    subject: Mapped[str] = mapped_column(Text, default="")
    sender: Mapped[str] = mapped_column(Text, default="")
    # Graph: the message's id in the mailbox (the uid is derived from it, the key stays unique).
    remote_id: Mapped[str | None] = mapped_column(String(512))
    # Whether the server copy has been flagged \Seen or deleted as the channel asks.
    server_done: Mapped[bool] = mapped_column(Boolean, default=False)
    article_id: Mapped[int | None] = mapped_column(ForeignKey("articles.id", ondelete="SET NULL"))
    fetched_at: Mapped[datetime] = mapped_column(default=utcnow)
    processed_at: Mapped[datetime | None]

    channel: Mapped[Channel] = relationship()


class ChannelEvent(Base):
    """The audit trail of a channel: connected, re-authenticated, disabled, errors — by whom and when."""

    __tablename__ = "channel_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    channel_id: Mapped[int] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text, default="")
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    actor: Mapped[User | None] = relationship()


class WebSession(Base):
    """A signed-in browser. The cookie holds a random token; only its SHA-256 is stored here."""

    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)

    user: Mapped[User] = relationship()


class OAuthFlow(Base):
    """A sign-in with Microsoft in progress; single use, bound to the admin's web session."""

    __tablename__ = "oauth_flows"
    __table_args__ = (UniqueConstraint("state"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(String(128))
    web_session_id: Mapped[str] = mapped_column(ForeignKey("web_sessions.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(24))
    channel_id: Mapped[int | None] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"))
    # MSAL's flow dict: holds the PKCE code_verifier and nonce, hence encrypted.
    flow: Mapped[str] = mapped_column(EncryptedText("oauth_flow.flow"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    used_at: Mapped[datetime | None]


class OutboundMessage(Base):
    """An outbound article's mail, queued in the same transaction as the article.

    The composed message (with its Message-ID) is in the spool before the row is committed, so every
    attempt sends the same bytes and the customer's mail client sees one message however often it
    was retried.
    """

    __tablename__ = "outbound_messages"
    __table_args__ = (Index("ix_outbound_messages_status_next_attempt_at", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    article_id: Mapped[int] = mapped_column(ForeignKey("articles.id", ondelete="CASCADE"), unique=True)
    channel_id: Mapped[int | None] = mapped_column(ForeignKey("channels.id", ondelete="SET NULL"), index=True)
    message_id: Mapped[str] = mapped_column(String(998), unique=True)
    mail_from: Mapped[str] = mapped_column(String(EMAIL_LENGTH))
    # Envelope recipients, one address per line.
    recipients: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    status: Mapped[DeliveryStatus] = mapped_column(
        _enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.QUEUED
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A sender owns a SENDING row until then; after it, another sender checks the outcome first.
    lease_until: Mapped[datetime | None]
    last_attempt_at: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]
    # The server's last reply, verbatim (e.g. "554 5.2.252 SendAsDenied; …"), and what it means.
    server_reply: Mapped[str | None] = mapped_column(Text)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    article: Mapped[Article] = relationship(back_populates="delivery")
    channel: Mapped[Channel | None] = relationship()


class ApiToken(Base):
    """A personal REST API token. The secret is shown once; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the token, so a person can tell their tokens apart in the list.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    # "read": GET only; "write": whatever its owner may do.
    scope: Mapped[str] = mapped_column(String(16), default="write", server_default="write")

    user: Mapped[User] = relationship()


class Alert(Base):
    """Something an admin must hear about: a mailbox that stopped, a secret about to expire, silence.

    ``key`` names the condition (``channel:5:attention``, ``secret:1:14d``); while an alert with that
    key is open (not resolved) the condition is not announced again.
    """

    __tablename__ = "alerts"
    __table_args__ = (Index("ix_alerts_key_resolved_at", "key", "resolved_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(40))
    severity: Mapped[str] = mapped_column(String(16), default="warning")
    channel_id: Mapped[int | None] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(String(300))
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When admins were told (email and/or webhook), and what went wrong telling them.
    notified_at: Mapped[datetime | None]
    notify_error: Mapped[str | None] = mapped_column(Text)
    resolved_at: Mapped[datetime | None]

    channel: Mapped[Channel | None] = relationship()


class Worker(Base):
    """A running ``postdesk worker`` (or ``serve`` with its embedded worker): who shares the mailboxes."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class LoginAttempt(Base):
    """A sign-in attempt counted against the client address it came from (``security/throttle.py``).

    A row is written before the password is checked, so that concurrent attempts in several web
    processes see each other; it is deleted again when the sign-in succeeds, and otherwise kept as a
    failure until it is older than the throttle window.
    """

    __tablename__ = "login_attempts"
    __table_args__ = (Index("ix_login_attempts_client_attempted_at", "client", "attempted_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # An IPv4 address, or the /64 network of an IPv6 address.
    client: Mapped[str] = mapped_column(String(64))
    # A keyed hash of the address typed, never the text: people type passwords into that field too.
    account: Mapped[str] = mapped_column(String(64))
    attempted_at: Mapped[datetime] = mapped_column(index=True)
