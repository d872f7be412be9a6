"""What the connection doctor reports: one ``Check`` per layer, in order, and a mailbox's ``Diagnosis``.

The JSON forms (``Check.as_json``, ``Diagnosis.as_json``) are what ``postdesk doctor --json`` prints;
their fields are documented in the command's help and in docs/runbook.md and only ever grow.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any, Literal

from postdesk.db.models import Transport
from postdesk.microsoft.clouds import Cloud, Endpoints, endpoints_for
from postdesk.microsoft.identity import MicrosoftIdentity, tls_context
from postdesk.runtime import Runtime
from postdesk.transports.imap import ImapMailbox
from postdesk.transports.smtp import SmtpSubmission

CheckStatus = Literal["ok", "failed", "skipped"]
# Shorter than the transports' 30 s: an admin is waiting in front of the page.
NETWORK_TIMEOUT = 15.0


@dataclass(frozen=True)
class Check:
    name: str  # stable identifier for scripts, e.g. "smtp_auth"
    label: str  # the layer in words, e.g. "SMTP AUTH"
    status: CheckStatus
    detail: str = ""  # what was looked at and what came back
    cause: str | None = None  # failed only: what is wrong
    fix: str | None = None  # failed only: what to do
    command: str | None = None  # failed only, when the fix is on Exchange's side: PowerShell to run

    def as_json(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "label": self.label,
            "status": self.status,
            "detail": self.detail,
            "cause": self.cause,
            "fix": self.fix,
            "command": self.command,
        }


@dataclass(frozen=True)
class Diagnosis:
    channel_id: int
    email: str
    transport: str
    checks: tuple[Check, ...]

    @property
    def failure(self) -> Check | None:
        return next((check for check in self.checks if check.status == "failed"), None)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def summary(self) -> str:
        failure = self.failure
        if failure is not None:
            return f"Connection test failed at “{failure.label}”: {failure.cause}"
        passed = sum(1 for check in self.checks if check.status == "ok")
        return f"Connection test passed: {passed} checks OK, {len(self.checks) - passed} not applicable."

    def as_json(self) -> dict[str, Any]:
        failure = self.failure
        return {
            "channel_id": self.channel_id,
            "email": self.email,
            "transport": self.transport,
            "ok": failure is None,
            "failed_check": failure.name if failure else None,
            "checks": [check.as_json() for check in self.checks],
        }


class CheckFailed(Exception):
    """A check found the problem; the run stops here."""

    def __init__(self, cause: str, fix: str, *, command: str | None = None, detail: str = "") -> None:
        super().__init__(cause)
        self.cause = cause
        self.fix = fix
        self.command = command
        self.detail = detail


class CheckSkipped(Exception):
    """The check does not apply to this mailbox or this run."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass
class Probe:
    """What one run has learned so far: later checks build on what earlier ones found."""

    runtime: Runtime
    channel_id: int
    email: str
    # Who signs in: the account that connected the mailbox (a delegate, for a shared mailbox).
    login_name: str
    display_name: str
    folder: str
    transport: Transport
    send_test_to: str | None = None
    identity: MicrosoftIdentity | None = None
    access_token: str | None = field(default=None, repr=False)  # memory only: never printed or logged
    imap: ImapMailbox | None = None
    smtp: SmtpSubmission | None = None

    @property
    def endpoints(self) -> Endpoints:
        """Where mail goes, as the fetcher and the sender compute it."""
        return endpoints_for(self.runtime.settings)

    @property
    def cloud(self) -> Cloud:
        return self.identity.endpoints.cloud if self.identity else self.endpoints.cloud

    @property
    def shared(self) -> bool:
        """Whether another account signed in for this mailbox (it needs delegation on it)."""
        return self.login_name.lower() != self.email.lower()

    def ssl_context(self) -> ssl.SSLContext:
        return tls_context(self.runtime.settings)

    def close(self) -> None:
        imap, smtp, self.imap, self.smtp = self.imap, self.smtp, None, None
        if imap is not None:
            imap.close()
        if smtp is not None:
            smtp.close()
