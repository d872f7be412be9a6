"""A Dovecot and a submission server for one test module, for modules whose tests are refused logins.

Refused logins make Dovecot slow down later logins from the same address, so a module that provokes
them imports these two fixtures, which stand in for the session's: the CA bundle (``trusted_cas``,
module-scoped) then trusts this module's servers.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from postdesk.sandbox import SandboxServer
from postdesk.sandbox.mailserver import DovecotServer
from postdesk.sandbox.submission import SubmissionServer


@pytest.fixture(scope="module")
def dovecot(sandbox: SandboxServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotServer]:
    """A Dovecot of the module's own, trusting the sandbox's tokens."""
    server = DovecotServer(
        tmp_path_factory.mktemp("dovecot-own"), sandbox_base_url=sandbox.base_url, sandbox_ca=sandbox.ca_path
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def submission(
    sandbox: SandboxServer, dovecot: DovecotServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SubmissionServer]:
    """A submission server of the module's own, filing accepted mail into the module's Dovecot."""
    server = SubmissionServer(sandbox.directory, tmp_path_factory.mktemp("submission-own"), dovecot=dovecot)
    with server:
        yield server
