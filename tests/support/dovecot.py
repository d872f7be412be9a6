"""The sandbox's Dovecot mail server, as the tests use it (it lives in postdesk.sandbox for the demo)."""

from email.message import EmailMessage

from postdesk.sandbox.mailserver import (
    IMAP_SCOPE,
    MAIL_USER,
    MAILDIR_FLAGS,
    OUTLOOK_FOLDERS,
    STARTUP_TIMEOUT_SECONDS,
    STOP_TIMEOUT_SECONDS,
    DovecotServer,
    IssueToken,
    access_token_for,
    free_port,
    imap_login,
    mail_user_ids,
    modified_utf7,
    xoauth2_payload,
)
from tests.support.mailfactory import parse_mail

__all__ = [
    "IMAP_SCOPE",
    "MAILDIR_FLAGS",
    "MAIL_USER",
    "OUTLOOK_FOLDERS",
    "STARTUP_TIMEOUT_SECONDS",
    "STOP_TIMEOUT_SECONDS",
    "DovecotServer",
    "IssueToken",
    "access_token_for",
    "free_port",
    "imap_login",
    "inbox",
    "mail_user_ids",
    "modified_utf7",
    "xoauth2_payload",
]


def inbox(dovecot: DovecotServer, mailbox: str) -> list[EmailMessage]:
    """The messages in ``mailbox``'s inbox, parsed."""
    return [parse_mail(raw) for raw in dovecot.messages(mailbox)]
