"""Composing outbound mail: a reply's fields in, the exact bytes to submit out. Pure: no DB, no network.

Every header value that came from a person (names, subjects, addresses) goes through the stdlib's
header registry, which folds and encodes it; control characters are refused or replaced first, so no
field can smuggle in a header of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses, make_msgid

from postdesk.mail.threading import add_ticket_reference, strip_reply_prefixes

# RFC 5322 asks for the first Message-ID and the newest ones when References grows long.
MAX_REFERENCES = 20
MAX_RECIPIENTS = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WIRE_POLICY = policy.SMTP  # CRLF line ends, as submission servers expect


class AddressError(ValueError):
    """An address a person typed that cannot be sent to; the message names it."""


@dataclass(frozen=True)
class OutgoingAttachment:
    filename: str
    content: bytes
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class OutgoingMail:
    """Everything that goes into one outbound message."""

    sender_address: str
    sender_name: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    subject: str
    body_text: str
    message_id: str
    date: datetime
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    attachments: tuple[OutgoingAttachment, ...] = ()
    # "auto-replied" or "auto-generated" for mail no person wrote (RFC 3834); None for agents' replies.
    auto_submitted: str | None = None

    @property
    def envelope_recipients(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(address.lower() for address in (*self.to, *self.cc)))


def compose(mail: OutgoingMail) -> bytes:
    message = EmailMessage(policy=policy.default)
    message["From"] = Address(display_name=_one_line(mail.sender_name), addr_spec=mail.sender_address)
    message["To"] = [Address(addr_spec=address) for address in mail.to]
    if mail.cc:
        message["Cc"] = [Address(addr_spec=address) for address in mail.cc]
    message["Subject"] = _one_line(mail.subject)
    message["Date"] = format_datetime(mail.date)
    message["Message-ID"] = mail.message_id
    if mail.in_reply_to:
        message["In-Reply-To"] = mail.in_reply_to
    if mail.references:
        message["References"] = " ".join(mail.references)
    if mail.auto_submitted:
        message["Auto-Submitted"] = mail.auto_submitted
    message.set_content(_normalise_newlines(mail.body_text), subtype="plain", charset="utf-8")
    for attachment in mail.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        message.add_attachment(
            attachment.content,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=_one_line(attachment.filename) or "attachment",
        )
    return message.as_bytes(policy=_WIRE_POLICY)


def new_message_id(sender_address: str) -> str:
    """A globally unique Message-ID in the sending mailbox's own domain."""
    return make_msgid(domain=sender_address.rpartition("@")[2].lower())


def parse_recipients(text: str) -> tuple[str, ...]:
    """Addresses from what a person typed: separated by commas, semicolons or new lines, with or
    without display names. Each is checked; duplicates are dropped, order kept."""
    separated = text.replace("\r\n", ",").replace("\n", ",").replace(";", ",").replace("\t", " ")
    if _CONTROL.search(separated):
        raise AddressError("The recipients contain control characters.")
    separated = re.sub(r"(?:\s*,)+", ",", separated).strip(" ,")
    pairs = getaddresses([separated])
    if any(not address for _name, address in pairs) and separated:
        # The stdlib answers ('', '') for a list it cannot read; refusing beats dropping someone.
        raise AddressError(f"Cannot read the recipients {text.strip()!r}; separate addresses with commas.")
    found = [check_address(address) for _name, address in pairs if address]
    unique = tuple(dict.fromkeys(found))
    if len(unique) > MAX_RECIPIENTS:
        raise AddressError(f"{len(unique)} recipients is more than the {MAX_RECIPIENTS} a reply may have.")
    return unique


def check_address(address: str) -> str:
    """``address`` if it is one plain addr-spec (local@domain.tld), else ``AddressError``."""
    candidate = address.strip()
    local, at, domain = candidate.rpartition("@")
    if not at or not local or "." not in domain or _CONTROL.search(candidate) or " " in candidate:
        raise AddressError(f"{address!r} is not an email address.")
    try:
        parsed = Address(addr_spec=candidate)
    except (HeaderParseError, ValueError, IndexError) as exc:
        raise AddressError(f"{address!r} is not an email address.") from exc
    if parsed.addr_spec != candidate or not parsed.domain:
        raise AddressError(f"{address!r} is not an email address.")
    return f"{parsed.username}@{parsed.domain.lower()}"


def reply_subject(original: str, number: int, *, prefix: str, forward: bool = False) -> str:
    """``Re: [Ticket#N] original`` (or ``Fwd:``), with the ticket reference once and one marker only."""
    base = strip_reply_prefixes(_one_line(original)) or "(no subject)"
    return add_ticket_reference(f"{'Fwd' if forward else 'Re'}: {base}", number, prefix=prefix)


def references_for(parent_message_id: str | None, parent_references: str | None) -> tuple[str, ...]:
    """The References of a reply: the parent's chain plus the parent itself, trimmed to the first id
    and the newest ones."""
    chain = re.findall(r"<[^<>\s]+>", parent_references or "")
    if parent_message_id:
        chain.append(parent_message_id)
    chain = list(dict.fromkeys(chain))
    if len(chain) > MAX_REFERENCES:
        chain = [chain[0], *chain[-(MAX_REFERENCES - 1) :]]
    return tuple(chain)


def quote(text: str, *, sender: str, sent_at: datetime, limit: int = 20_000) -> str:
    """The original below a reply, ``> ``-prefixed, cut after ``limit`` characters."""
    body = _normalise_newlines(text).strip()
    if len(body) > limit:
        body = body[:limit] + "\n[…]"
    quoted = "\n".join(f"> {line}" if line else ">" for line in body.split("\n"))
    return f"On {sent_at.strftime('%a, %d %b %Y %H:%M')} UTC, {_one_line(sender)} wrote:\n{quoted}"


def forwarded(text: str, *, sender: str, sent_at: datetime, subject: str, to: str) -> str:
    header = "\n".join(
        [
            "---------- Forwarded message ----------",
            f"From: {_one_line(sender)}",
            f"Date: {sent_at.strftime('%a, %d %b %Y %H:%M')} UTC",
            f"Subject: {_one_line(subject)}",
            f"To: {_one_line(to)}",
        ]
    )
    return f"{header}\n\n{_normalise_newlines(text).strip()}"


def _one_line(value: str) -> str:
    return " ".join(_CONTROL.sub(" ", value).split())


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")
