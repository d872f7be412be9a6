"""How a transport failure is reported: transient (retry later) or needing a person, in plain words."""

from __future__ import annotations

import socket
import ssl


class TransportError(Exception):
    """A mail server refused or failed. ``needs_reauth`` means the sign-in itself was refused;
    ``permanent`` means retrying will not help until someone changes something."""

    def __init__(self, message: str, *, permanent: bool = False, needs_reauth: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent or needs_reauth
        self.needs_reauth = needs_reauth


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
    return TransportError(f"{action} failed: {text}")
