"""Building test messages as a customer's mail client would send them."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

_counter = itertools.count(1)


def customer_mail(
    *,
    to: str,
    subject: str = "",
    sender: str = "Jana Novák <jana.novak@example.org>",
    body: str = "Hello, my printer is on fire.",
    message_id: str | None = None,
    in_reply_to: str | None = None,
    attachment: tuple[str, bytes] | None = None,
    extra_headers: dict[str, str] | None = None,
) -> bytes:
    number = next(_counter)
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject or f"Question number {number}"
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = message_id or make_msgid(idstring=f"t{number}", domain="example.org")
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to
        message["References"] = in_reply_to
    for name, value in (extra_headers or {}).items():
        message[name] = value
    message.set_content(body)
    if attachment is not None:
        name, content = attachment
        message.add_attachment(content, maintype="application", subtype="octet-stream", filename=name)
    return message.as_bytes()


def parse_mail(raw: bytes) -> EmailMessage:
    """A message as the tests read it: with the modern API (``get_body``, ``iter_attachments``)."""
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed
