"""What the REST API reads and writes: pydantic models, with examples so the OpenAPI is a manual.

Field names follow the ``postdesk … --json`` output where the same thing is shown (a channel's
``id``, ``email``, ``transport``, ``status``, ``last_fetch_at``, ``last_error``; a ticket's
``customer`` address, ``group`` name and ``owner`` address), so scripts can move between the two.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from postdesk.db.models import (
    Article,
    ChannelStatus,
    DeliveryStatus,
    Direction,
    InboundStatus,
    Role,
    Ticket,
    TicketState,
    Transport,
)
from postdesk.mail import sanitise_html
from postdesk.security.api_tokens import TokenScope


class ErrorOut(BaseModel):
    detail: str = Field(examples=["There is no ticket #10042, or you cannot see it."])


class PageInfo(BaseModel):
    total: int = Field(description="How many items match, on all pages.", examples=[137])
    page: int = Field(examples=[1])
    per_page: int = Field(examples=[25])
    pages: int = Field(description="How many pages there are (at least 1).", examples=[6])


# -- people ---------------------------------------------------------------------------------------


class MeOut(BaseModel):
    id: int = Field(examples=[3])
    email: str = Field(examples=["agent@example.com"])
    display_name: str = Field(examples=["Ana Agent"])
    role: Role = Field(examples=["agent"])
    groups: list[str] = Field(examples=[["Billing", "Support"]])
    token_scope: TokenScope = Field(
        description="What the token calling may do: read (GET only) or write.", examples=["read"]
    )


# -- tickets --------------------------------------------------------------------------------------


class TicketOut(BaseModel):
    id: int = Field(examples=[42])
    number: int = Field(description="The number people see: `[Ticket#10042]`.", examples=[10042])
    title: str = Field(examples=["Invoice 2026-1183 charged twice"])
    state: TicketState = Field(examples=["open"])
    customer: str = Field(description="The customer's address.", examples=["jana.novak@example.org"])
    customer_name: str = Field(examples=["Jana Novák"])
    group: str | None = Field(description="Group name.", examples=["Billing"])
    owner: str | None = Field(description="The owning agent's address.", examples=["agent@example.com"])
    channel_id: int | None = Field(description="The mailbox replies go out through.", examples=[1])
    article_count: int = Field(examples=[3])
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None


class AttachmentOut(BaseModel):
    id: int = Field(examples=[7])
    filename: str = Field(examples=["invoice.pdf"])
    content_type: str = Field(examples=["application/pdf"])
    size: int = Field(description="Bytes.", examples=[48213])
    inline: bool = Field(examples=[False])


class DeliveryOut(BaseModel):
    """How the mail of an outbound article is doing."""

    status: DeliveryStatus = Field(examples=["sent"])
    attempts: int = Field(examples=[1])
    sent_at: datetime | None
    next_attempt_at: datetime | None
    last_error: str | None = Field(
        description="What went wrong last, in plain words.",
        examples=["The mailbox is not allowed to send as this address."],
    )
    server_reply: str | None = Field(
        description="The mail server's last reply, verbatim.",
        examples=["250 2.0.0 OK <0123@outlook.office365.com>"],
    )


class ArticleOut(BaseModel):
    id: int = Field(examples=[301])
    direction: Direction = Field(examples=["inbound"])
    internal: bool = Field(description="An internal note, never sent to the customer.", examples=[False])
    sender: str = Field(examples=["Jana Novák <jana.novak@example.org>"])
    to: str = Field(examples=["support@example.com"])
    cc: str = Field(examples=[""])
    subject: str = Field(examples=["Invoice 2026-1183 charged twice"])
    body_text: str = Field(examples=["Hello, my card was charged twice for invoice 2026-1183."])
    body_html: str | None = Field(
        description="The mail's HTML, sanitised as the web UI shows it (no scripts, no remote images)."
    )
    author: str | None = Field(description="The agent who wrote it, if an agent did.", examples=[None])
    auto_generated: bool = Field(
        description="An auto-reply, bounce or list mail, as Postdesk classified it.", examples=[False]
    )
    created_at: datetime
    attachments: list[AttachmentOut]
    delivery: DeliveryOut | None = Field(description="For replies: the state of their mail.")


class TicketDetailOut(TicketOut):
    articles: list[ArticleOut]


class TicketPageOut(PageInfo):
    items: list[TicketOut]


class TicketCreate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "customer_email": "jana.novak@example.org",
                    "customer_name": "Jana Novák",
                    "title": "Phone call: invoice charged twice",
                    "body": "Jana called: her card was charged twice for invoice 2026-1183.",
                    "group": "Billing",
                }
            ]
        }
    )

    customer_email: str = Field(max_length=320)
    customer_name: str = Field(default="", max_length=200)
    title: str = Field(min_length=1, max_length=998)
    body: str = Field(min_length=1, description="The customer's words; becomes the first article.")
    group: str | None = Field(default=None, description="Group name.")
    owner: str | None = Field(default=None, description="The owning agent's address.")
    channel_id: int | None = Field(default=None, description="The mailbox replies go out through.")


class TicketUpdate(BaseModel):
    """Only the fields present are changed; ``"owner": null`` or ``"group": null`` clears them."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"state": "open", "owner": "agent@example.com"}]}
    )

    state: TicketState | None = None
    owner: str | None = Field(default=None, description="The new owner's address, or null for nobody.")
    group: str | None = Field(default=None, description="The new group's name, or null for none.")


class AttachmentIn(BaseModel):
    filename: str = Field(min_length=1, max_length=255, examples=["steps.pdf"])
    content_type: str = Field(default="application/octet-stream", examples=["application/pdf"])
    content_base64: str = Field(description="The file, base64-encoded.", examples=["JVBERi0xLjcK..."])


class ReplyIn(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"body": "Hello Jana,\n\nwe have refunded the second charge."}]}
    )

    kind: Literal["reply", "reply_all", "forward"] = "reply"
    body: str = Field(description="Plain text. The quoted earlier mail is added by Postdesk.")
    to: list[str] | None = Field(
        default=None, description="Recipients; leave out for the ones the kind implies (like the web UI)."
    )
    cc: list[str] | None = None
    article_id: int | None = Field(
        default=None, description="The article answered; leave out for the latest mail from outside."
    )
    attachments: list[AttachmentIn] = Field(default_factory=list)


class NoteIn(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"body": "Refund approved by finance."}]})

    body: str = Field(min_length=1)


# -- channels and quarantine ----------------------------------------------------------------------


class ChannelOut(BaseModel):
    id: int = Field(examples=[1])
    email: str = Field(examples=["support@example.com"])
    display_name: str = Field(examples=["Support"])
    transport: Transport = Field(examples=["imap"])
    status: ChannelStatus = Field(examples=["ok"])
    signed_in_as: str | None = Field(examples=["admin@example.com"])
    tenant_id: str | None = Field(examples=["72f988bf-86f1-41af-91ab-2d7cd011db47"])
    connected_at: datetime | None
    last_fetch_at: datetime | None
    last_error: str | None = Field(
        description="What went wrong last and how to fix it, in plain words.", examples=[None]
    )


class ChannelStatusOut(ChannelOut):
    folder: str = Field(examples=["INBOX"])
    group: str | None = Field(description="The group new tickets go to.", examples=["Support"])
    last_fetch_summary: str = Field(examples=["2 new mails: 1 ticket, 1 follow-up"])
    last_mail_at: datetime | None
    last_error_at: datetime | None
    token_refreshed_at: datetime | None


class ChannelPageOut(PageInfo):
    items: list[ChannelOut]


class QuarantinedOut(BaseModel):
    id: int = Field(examples=[12])
    channel_id: int = Field(examples=[1])
    channel: str = Field(description="The mailbox's address.", examples=["support@example.com"])
    subject: str = Field(examples=["Scanned contract"])
    sender: str = Field(examples=["Jana Novák <jana.novak@example.org>"])
    message_id: str | None = Field(examples=["<CAF1234@mail.example.org>"])
    size: int = Field(examples=[31457280])
    reason: str | None = Field(
        examples=["the message is 30.0 MB, over this mailbox's limit of 25 MB; raise the limit and reprocess"]
    )
    fetched_at: datetime
    sha256: str


class QuarantinePageOut(PageInfo):
    items: list[QuarantinedOut]


class ReprocessOut(BaseModel):
    id: int = Field(examples=[12])
    status: InboundStatus = Field(
        description="`processed` or `duplicate` when released; `quarantined` when it failed again.",
        examples=["processed"],
    )
    reason: str | None = Field(examples=["opened ticket 10043"])
    ticket_number: int | None = Field(description="The ticket the mail now belongs to.", examples=[10043])


def article_out(article: Article) -> ArticleOut:
    delivery = article.delivery
    return ArticleOut(
        id=article.id,
        direction=article.direction,
        internal=article.internal,
        sender=article.sender,
        to=article.to_addresses,
        cc=article.cc_addresses,
        subject=article.subject,
        body_text=article.body_text,
        body_html=sanitise_html(article.body_html) if article.body_html else None,
        author=article.author.email if article.author else None,
        auto_generated=article.auto_generated,
        created_at=article.created_at,
        attachments=[
            AttachmentOut(
                id=a.id, filename=a.filename, content_type=a.content_type, size=a.size, inline=a.inline
            )
            for a in article.attachments
        ],
        delivery=None
        if delivery is None
        else DeliveryOut(
            status=delivery.status,
            attempts=delivery.attempts,
            sent_at=delivery.sent_at,
            next_attempt_at=delivery.next_attempt_at if delivery.status is DeliveryStatus.QUEUED else None,
            last_error=delivery.last_error,
            server_reply=delivery.server_reply,
        ),
    )


def ticket_out(ticket: Ticket, *, article_count: int) -> TicketOut:
    return TicketOut(**_ticket_fields(ticket), article_count=article_count)


def ticket_detail_out(ticket: Ticket) -> TicketDetailOut:
    return TicketDetailOut(
        **_ticket_fields(ticket),
        article_count=len(ticket.articles),
        articles=[article_out(article) for article in ticket.articles],
    )


def _ticket_fields(ticket: Ticket) -> dict[str, Any]:
    return {
        "id": ticket.id,
        "number": ticket.number,
        "title": ticket.title,
        "state": ticket.state,
        "customer": ticket.customer.email,
        "customer_name": ticket.customer.display_name,
        "group": ticket.group.name if ticket.group else None,
        "owner": ticket.owner.email if ticket.owner else None,
        "channel_id": ticket.channel_id,
        "created_at": ticket.created_at,
        "updated_at": ticket.updated_at,
        "closed_at": ticket.closed_at,
    }
