"""Queued mail of a Graph channel, sent through Microsoft Graph ``sendMail`` instead of SMTP.

``GraphSubmission`` has the one method of ``SmtpSubmission`` the sender's loop calls, ``send``, so
the loop, its grouped bookkeeping and its exactly-once rules stay the same for both transports.
Graph takes the recipients from the MIME's To and Cc headers (queued replies carry no Bcc), and Exchange
files a copy in Sent Items, where an interrupted attempt is looked for before any resend.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from postdesk.ingest.graph_fetch import GraphAccount, open_channel_mailbox
from postdesk.runtime import Runtime
from postdesk.transports.errors import TransportError
from postdesk.transports.graph import GraphMailbox


class GraphSubmission:
    """One channel's Graph client for a sending pass. ``fresh_token`` forces a new access token, for
    one retry when Graph refuses the first (a refused request was not sent, so repeating it is safe)."""

    def __init__(
        self, runtime: Runtime, account: GraphAccount, token: str, *, fresh_token: Callable[[], str]
    ) -> None:
        self._token = token
        self._fresh_token = fresh_token
        self._refreshed = False
        self.mailbox: GraphMailbox = open_channel_mailbox(runtime, account, lambda: self._token)

    def __enter__(self) -> GraphSubmission:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.mailbox.close()

    def send(self, mail_from: str, recipients: list[str], raw: bytes) -> str:
        """Send one message; returns the acceptance in words like an SMTP reply. Raises
        ``OutcomeUnknown`` when the connection broke after the message was handed over."""
        try:
            self.mailbox.send_mime(raw)
        except TransportError as exc:
            if not exc.needs_reauth or self._refreshed:
                raise
            self._refreshed = True
            self._token = self._fresh_token()
            self.mailbox.send_mime(raw)
        return f"202 Accepted by Microsoft Graph ({self.mailbox.last_trace})"


def sent_through_graph(
    runtime: Runtime, account: GraphAccount, token: str, message_ids: set[str]
) -> set[str]:
    """Which of these Message-IDs the mailbox's Sent Items hold. The others are sent again, so a draft
    a large one left in Drafts when its send broke off is deleted first."""
    with open_channel_mailbox(runtime, account, token) as mailbox:
        found = mailbox.sent_items_holding(sorted(message_ids))
        mailbox.discard_drafts_of(sorted(message_ids - found))
        return found
