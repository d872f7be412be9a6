"""Failed sign-ins per client address, limited across every web process.

The per-account lockout (``tickets/people.py``) stops guessing one password; this stops one address
from guessing many accounts' passwords. The counts live in the database, not in a process, so the
limit holds however many web processes or hosts serve ``POST /login``.

An attempt is written (and committed) *before* its password is checked and counted afterwards, so a
burst of parallel requests cannot all pass the check before any of them is recorded. It is deleted
again when the sign-in succeeds; a failure stays until it is older than the window.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from postdesk.config import Settings
from postdesk.db.models import LoginAttempt
from postdesk.db.types import utcnow
from postdesk.security.crypto import SecretBox

UNKNOWN_CLIENT = "unknown"
_CLIENT_LENGTH = 64


def client_key(host: str | None) -> str:
    """What one client address counts as: an IPv4 address itself, an IPv6 address by its /64.

    One subscriber usually gets a whole IPv6 /64 and can pick any address in it, so counting single
    IPv6 addresses would give one attacker 2**64 fresh counters.
    """
    if not host:
        return UNKNOWN_CLIENT
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:_CLIENT_LENGTH]  # a Unix socket or a test client: still one name per client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def account_key(secret_box: SecretBox, email: str) -> str:
    """A keyed hash of the address typed at sign-in; people sometimes type their password there."""
    return secret_box.sign(f"login-throttle:{email.strip().lower()}")


@dataclass(frozen=True)
class LoginThrottle:
    """At most ``attempts`` failed sign-ins per client within ``window``; ``attempts == 0`` is no limit."""

    attempts: int
    window: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> LoginThrottle:
        return cls(settings.login_attempts_per_address, timedelta(minutes=settings.login_throttle_minutes))

    def record_attempt(
        self, session: Session, *, client: str, account: str, now: datetime | None = None
    ) -> int | None:
        """Record an attempt from ``client``, or refuse it if the client has used up its failures.

        Returns None when the password may be checked, else the seconds until the client may try
        again. Commits: the record must be visible to the other web processes before this one counts.
        """
        if not self.attempts:
            return None
        now = now or utcnow()
        # Refusing first costs one read, so a flood of refused attempts writes nothing.
        if (wait := self._wait(session, client, now, limit=self.attempts)) is not None:
            return wait
        attempt = LoginAttempt(client=client, account=account, attempted_at=now)
        session.add(attempt)
        # Old failures are of no further use (and are personal data): forget them as we go.
        session.execute(delete(LoginAttempt).where(LoginAttempt.attempted_at <= now - self.window))
        session.commit()
        # Counting our own row too: only the first ``attempts`` rows of a burst fit under the limit.
        if (wait := self._wait(session, client, now, limit=self.attempts + 1)) is not None:
            session.execute(delete(LoginAttempt).where(LoginAttempt.id == attempt.id))
            session.commit()
            return wait
        return None

    def succeeded(self, session: Session, *, client: str, account: str) -> None:
        """Forget this account's failures from this client (typing mistakes before the right password).

        Failures against other accounts stay counted: signing in to one's own account must not reset
        the count of someone who guesses other people's passwords in between.
        """
        if self.attempts:
            session.execute(
                delete(LoginAttempt).where(LoginAttempt.client == client, LoginAttempt.account == account)
            )

    def _wait(self, session: Session, client: str, now: datetime, *, limit: int) -> int | None:
        recent = session.scalars(
            select(LoginAttempt.attempted_at)
            .where(LoginAttempt.client == client, LoginAttempt.attempted_at > now - self.window)
            .order_by(LoginAttempt.attempted_at.desc())
            .limit(limit)
        ).all()
        if len(recent) < limit:
            return None
        # The client may try again when the oldest of these leaves the window.
        seconds = (recent[-1] + self.window - now).total_seconds()
        return max(1, math.ceil(seconds))


def purge_old_attempts(session: Session, throttle: LoginThrottle, *, now: datetime | None = None) -> int:
    """Delete attempts older than the window (for a housekeeping job; ``record_attempt`` also does it)."""
    cutoff = (now or utcnow()) - throttle.window
    result = session.execute(delete(LoginAttempt).where(LoginAttempt.attempted_at <= cutoff))
    return int(getattr(result, "rowcount", 0) or 0)
