"""Pure MIME handling: raw bytes in, dataclasses out; no database, no network, no filesystem.

``parse_message`` turns a fetched message into a ``ParsedMail``; ``classify`` tells auto-replies,
bulk mail, bounces and loops from mail written by people; the threading helpers find the ticket a reply
belongs to; ``sanitise_html`` makes mail HTML safe to show and ``html_to_text`` makes it readable.
"""

from postdesk.mail.classify import Classification, classify
from postdesk.mail.filenames import safe_filename
from postdesk.mail.html import html_to_text, sanitise_html
from postdesk.mail.message import Address, MailAttachment, MailParseError, ParsedMail, parse_message
from postdesk.mail.threading import (
    add_ticket_reference,
    strip_reply_prefixes,
    thread_message_ids,
    ticket_numbers_in_subject,
)

__all__ = [
    "Address",
    "Classification",
    "MailAttachment",
    "MailParseError",
    "ParsedMail",
    "add_ticket_reference",
    "classify",
    "html_to_text",
    "parse_message",
    "safe_filename",
    "sanitise_html",
    "strip_reply_prefixes",
    "thread_message_ids",
    "ticket_numbers_in_subject",
]
