"""CA bundles for a desk that must trust some of the test servers (and maybe not others)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class HasCA(Protocol):
    """A test server with its own CA: the sandbox, Dovecot, the submission server."""

    @property
    def ca_path(self) -> Path: ...


def ca_bundle(path: Path, *servers: HasCA) -> Path:
    """Write the CAs of ``servers`` into one PEM file at ``path`` (a POSTDESK_CA_BUNDLE); return it."""
    path.write_text("".join(server.ca_path.read_text() for server in servers))
    return path
