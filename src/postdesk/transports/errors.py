"""How a transport failure is reported: transient (retry later) or needing a person, in plain words."""

from __future__ import annotations

import imaplib
import re
import socket
import ssl

RETRIED = "this is usually temporary and is retried automatically"
# Replies meaning the server, or the mailbox behind it, cannot serve right now: RFC 5530's response
# codes for that, and Exchange Online's own wording when a mailbox's backend is down or throttled
# ("User is authenticated but not connected" follows a successful AUTHENTICATE). Retrying helps;
# signing in again does not, so none of these may ever ask the admin for a new sign-in.
_BUSY_REPLIES = (
    "[UNAVAILABLE]",
    "[INUSE]",
    "user is authenticated but not connected",
    "server unavailable",
    "request is throttled",
)
# imaplib's wrapping around the server's words: "command: FETCH => ...", "SELECT command error: BAD
# [b'...']", and IMAPClient's "select failed: ...".
_IMAPLIB_PREFIX = re.compile(r"^(?:command: [A-Z ]+ => |[A-Za-z ]+ command error: [A-Z]+ |[a-z ]+ failed: )")
_BYTES_REPR = re.compile(r"""^\[?b(['"])(.*)\1\]?$""")


class TransportError(Exception):
    """A mail server refused or failed. ``needs_reauth`` means the sign-in itself was refused;
    ``permanent`` means retrying will not help until someone changes something."""

    def __init__(self, message: str, *, permanent: bool = False, needs_reauth: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent or needs_reauth
        self.needs_reauth = needs_reauth


class OutcomeUnknown(TransportError):
    """The connection broke after the message was handed over (SMTP DATA, Graph send): the server may or
    may not have it."""


def server_busy(reply: str) -> bool:
    """Whether a NO or BAD reply means the server is only unable to serve for now."""
    lowered = reply.lower()
    return any(marker.lower() in lowered for marker in _BUSY_REPLIES)


def server_words(reply: str) -> str:
    """The server's own text of a reply, without imaplib's and IMAPClient's wrapping around it."""
    text = reply.strip()
    while (shorter := _IMAPLIB_PREFIX.sub("", text, count=1)) != text:
        text = shorter
    quoted = _BYTES_REPR.match(text)
    return quoted.group(2) if quoted else text


def refusal(
    protocol: str, reply: str, *, action: str, refused: str, needs_reauth: bool = False
) -> TransportError:
    """The server answered NO or BAD to ``action`` ("opening the folder 'INBOX'"). Transient when the
    reply says the server is only unavailable for now; otherwise permanent, worded as ``refused``
    ("cannot open the folder 'INBOX'") and, with ``needs_reauth``, a refused sign-in. ``reply`` is the
    error text as imaplib or IMAPClient raised it."""
    if server_busy(reply):
        return _unavailable(protocol, action, reply)
    return TransportError(f"{refused}: {server_words(reply)}", permanent=True, needs_reauth=needs_reauth)


def _unavailable(protocol: str, action: str, reply: str) -> TransportError:
    return TransportError(
        f"{action} failed: the {protocol} server is unavailable for now ({server_words(reply)}); {RETRIED}. "
        "If it lasts for hours, check the mailbox in the Microsoft 365 admin center"
    )


def connection_failure(protocol: str, action: str, exc: BaseException) -> TransportError:
    """A socket or TLS failure talking to the ``protocol`` ("IMAP", "SMTP") server, in words that name
    the setting to check."""
    text = str(exc).strip() or exc.__class__.__name__
    setting = f"POSTDESK_MICROSOFT_{protocol}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TransportError(
            f"the {protocol} server's TLS certificate is not trusted ({exc.verify_message}); "
            f"check {setting} and POSTDESK_CA_BUNDLE",
            permanent=True,
        )
    if isinstance(exc, socket.gaierror):
        return TransportError(f"cannot resolve the {protocol} host ({text}); check {setting} and DNS")
    return _transient_failure(protocol, action, exc, text) or TransportError(f"{action} failed: {text}")


def _transient_failure(protocol: str, action: str, exc: BaseException, text: str) -> TransportError | None:
    """The failures that say the server is down, restarting or busy, in plain words."""
    if isinstance(exc, ConnectionRefusedError):
        cause = f"the {protocol} server refused the connection ({text})"
    elif isinstance(exc, imaplib.IMAP4.abort | ConnectionError | ssl.SSLEOFError | EOFError):
        # imaplib reports a server's "* BYE" the same way as a dropped connection.
        cause = f"the {protocol} server closed the connection ({server_words(text)})"
    elif isinstance(exc, TimeoutError):
        cause = f"the {protocol} server did not answer in time"
    elif isinstance(exc, imaplib.IMAP4.error) and server_busy(text):
        return _unavailable(protocol, action, text)
    else:
        return None
    return TransportError(
        f"{action} failed: {cause}; {RETRIED}. If it lasts, check POSTDESK_MICROSOFT_{protocol}"
    )
