"""How a transport failure is reported: transient (retry later) or needing a person, in plain words."""

from __future__ import annotations


class TransportError(Exception):
    """A mail server refused or failed. ``needs_reauth`` means the sign-in itself was refused;
    ``permanent`` means retrying will not help until someone changes something."""

    def __init__(self, message: str, *, permanent: bool = False, needs_reauth: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent or needs_reauth
        self.needs_reauth = needs_reauth
