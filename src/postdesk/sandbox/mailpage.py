"""A page of the sandbox where anyone trying Postdesk writes an email into a sandbox mailbox.

It plays the customer: the message lands in the mailbox through the sandbox mail server, and Postdesk
fetches it over IMAP like any other mail.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, make_msgid
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

if TYPE_CHECKING:
    from postdesk.sandbox.identity import SandboxDirectory

RenderPage = Callable[..., HTMLResponse]


class MailPage:
    def __init__(self, directory: SandboxDirectory, render: RenderPage) -> None:
        self.directory = directory
        self.render = render

    def _mailboxes(self) -> list[str]:
        return sorted(user.upn for user in self.directory.users.values())

    async def form(self, request: Request) -> Response:
        return self.render(
            "mail.html",
            title="Send a test email",
            mailboxes=self._mailboxes(),
            available=self.directory.mail_delivery is not None,
            sent=None,
        )

    async def send(self, request: Request) -> Response:
        fields: dict[str, Any] = {k: str(v) for k, v in (await request.form()).items()}
        recipient = fields.get("to", "")
        if self.directory.mail_delivery is None or recipient not in self._mailboxes():
            return self.render(
                "mail.html",
                status=400,
                title="Send a test email",
                mailboxes=self._mailboxes(),
                available=self.directory.mail_delivery is not None,
                sent=None,
            )
        self.directory.mail_delivery(recipient, _compose(fields, recipient))
        return self.render(
            "mail.html",
            title="Send a test email",
            mailboxes=self._mailboxes(),
            available=True,
            sent=recipient,
        )


def _compose(fields: dict[str, Any], recipient: str) -> bytes:
    message = EmailMessage()
    message["From"] = formataddr(
        (fields.get("from_name", "")[:100], fields.get("from_address", "")[:200] or "customer@example.org")
    )
    message["To"] = recipient
    message["Subject"] = fields.get("subject", "")[:300] or "Test message"
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain="sandbox.example.org")
    message.set_content(fields.get("body", "") or "Hello from the sandbox.")
    return message.as_bytes()
