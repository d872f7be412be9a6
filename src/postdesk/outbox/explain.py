"""What Exchange Online's SMTP refusals mean, in words an agent or admin can act on.

Matched on the enhanced status code (RFC 3463) and a marker in the text, because Exchange reuses
``535 5.7.3`` and ``554 5.2.0`` for several causes and only the text tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Retry(Enum):
    NO = "no"  # someone must change something; the message is marked failed
    SOON = "soon"  # a busy or unreachable server: back off and try again
    LATER = "later"  # a quota that resets: try again in an hour or so


@dataclass(frozen=True)
class DeliveryExplanation:
    title: str
    fix: str
    retry: Retry
    # The mailbox's sign-in itself is the problem: re-authenticating (after the fix) is part of the cure.
    sign_in: bool = False

    def sentence(self) -> str:
        return f"{self.title}. {self.fix}"


@dataclass(frozen=True)
class _Rule:
    status: str  # enhanced status code, or "" for any
    marker: str  # lower-case text that must appear, or "" for any
    explanation: DeliveryExplanation


_SEND_AS = DeliveryExplanation(
    title="Microsoft 365 refused to send as this address",
    fix=(
        "The account that signed in for this mailbox may not send as its From address. Either "
        "re-authenticate the channel as the mailbox itself, or give the signed-in account 'Send as' on "
        "the mailbox (Exchange admin center › Recipients › Mailboxes › the mailbox › Delegation › "
        "Send as), wait about an hour for it to apply, then retry"
    ),
    retry=Retry.NO,
)

_RULES = (
    _Rule(
        "5.7.139",
        "",
        DeliveryExplanation(
            title="SMTP AUTH is turned off for this mailbox or the whole tenant",
            fix=(
                "Microsoft 365 only accepts sending through SMTP when Authenticated SMTP is allowed. In the "
                "Microsoft 365 admin center › Users › the mailbox › Mail › Manage email apps, tick "
                "Authenticated SMTP (PowerShell: Set-CASMailbox -Identity <mailbox> "
                "-SmtpClientAuthenticationDisabled $false). If the tenant switch is off "
                "(Set-TransportConfig -SmtpClientAuthenticationDisabled $false) or security defaults are "
                "on, an admin has to change those too. Then retry"
            ),
            retry=Retry.NO,
        ),
    ),
    _Rule(
        "5.7.3",
        "",
        DeliveryExplanation(
            title="Microsoft 365 did not accept the mailbox's sign-in for sending",
            fix=(
                "The token was refused by the SMTP server. Usually the app registration lacks the delegated "
                "permission SMTP.Send (Entra ID › App registrations › API permissions: add it and grant "
                "consent), or the mailbox was connected by a different account than its address. Fix that, "
                "then choose Re-authenticate for the channel and retry"
            ),
            retry=Retry.NO,
            sign_in=True,
        ),
    ),
    _Rule("5.2.252", "", _SEND_AS),
    _Rule("5.7.60", "", _SEND_AS),
    _Rule("5.2.0", "sendasdenied", _SEND_AS),
    _Rule(
        "5.2.0",
        "submissionquotaexceeded",
        DeliveryExplanation(
            title="The mailbox reached Microsoft 365's sending limit",
            fix=(
                "Exchange Online limits how much one mailbox may send (10,000 recipients a day, 30 messages "
                "a minute). Postdesk tries again in an hour; nothing needs doing unless it keeps happening"
            ),
            retry=Retry.LATER,
        ),
    ),
    _Rule(
        "5.2.0",
        "outboundspam",
        DeliveryExplanation(
            title="Microsoft 365 blocked this mailbox from sending: it was flagged for outbound spam",
            fix=(
                "An admin must release the mailbox in the Microsoft Defender portal › Email & collaboration "
                "› Review › Restricted entities, and should check the mailbox for compromise. Then retry"
            ),
            retry=Retry.NO,
        ),
    ),
    _Rule(
        "5.1.8",
        "",
        DeliveryExplanation(
            title="Microsoft 365 blocked this mailbox from sending",
            fix=(
                "The mailbox is on Microsoft's restricted list (typically after sending spam). An admin must "
                "release it in the Microsoft Defender portal › Restricted entities. Then retry"
            ),
            retry=Retry.NO,
        ),
    ),
    _Rule(
        "5.3.4",
        "",
        DeliveryExplanation(
            title="The message is too large for Microsoft 365",
            fix=(
                "Exchange Online refuses messages over the mailbox's send limit (35 MB by default; "
                "attachments grow by about a third when encoded). Send fewer or smaller attachments, or "
                "a link to the file"
            ),
            retry=Retry.NO,
        ),
    ),
    _Rule(
        "5.7.57",
        "",
        DeliveryExplanation(
            title="The SMTP server says Postdesk did not sign in before sending",
            fix="This points at a proxy or a server other than Microsoft's; check POSTDESK_MICROSOFT_SMTP",
            retry=Retry.NO,
        ),
    ),
    _Rule(
        "5.1.1",
        "",
        DeliveryExplanation(
            title="A recipient address does not exist",
            fix="Check the address for typos and send the reply again to the right one",
            retry=Retry.NO,
        ),
    ),
    _Rule(
        "5.1.10",
        "",
        DeliveryExplanation(
            title="A recipient address does not exist",
            fix="Check the address for typos and send the reply again to the right one",
            retry=Retry.NO,
        ),
    ),
)

_BUSY = DeliveryExplanation(
    title="The mail server is busy or unavailable for a moment",
    fix="Postdesk tries again automatically with increasing pauses; nothing needs doing",
    retry=Retry.SOON,
)
_OTHER_PERMANENT = DeliveryExplanation(
    title="The mail server refused the message",
    fix="Read the server's reply below; fix what it names, then retry",
    retry=Retry.NO,
)


def explain_refusal(code: int, text: str) -> DeliveryExplanation:
    """The explanation for an SMTP reply such as ``554`` + ``5.2.252 SendAsDenied; …``."""
    status = text.split(" ", 1)[0] if text[:1].isdigit() else ""
    lowered = text.lower()
    for rule in _RULES:
        if rule.status and rule.status != status:
            continue
        if rule.marker and rule.marker not in lowered:
            continue
        if code >= 500 or rule.explanation.retry is not Retry.NO:
            return rule.explanation
    return _BUSY if code < 500 else _OTHER_PERMANENT
