"""The jobs the worker runs, and the default schedule."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete

from postdesk.alerts.service import run_alerts
from postdesk.db.models import OAuthFlow
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.outbox.sender import start_sending
from postdesk.runtime import Runtime
from postdesk.security.throttle import LoginThrottle, purge_old_attempts
from postdesk.tickets.service import remind_due_tickets
from postdesk.web.sessions import purge_expired_sessions
from postdesk.worker.heartbeat import refresh_stale_tokens
from postdesk.worker.mail import MailScheduler
from postdesk.worker.scheduler import Job

log = logging.getLogger(__name__)

# A sign-in that has not come back from Microsoft within this time is abandoned.
OAUTH_FLOW_LIFETIME = timedelta(minutes=30)


def purge_stale_sign_ins(runtime: Runtime) -> None:
    """Forget expired browser sessions, abandoned Microsoft sign-ins (they hold PKCE verifiers) and failed
    sign-ins older than the throttle's window (they hold client addresses)."""
    with transaction(runtime.sessions) as session:
        sessions = purge_expired_sessions(session)
        flows = session.execute(
            delete(OAuthFlow).where(OAuthFlow.created_at < utcnow() - OAUTH_FLOW_LIFETIME)
        )
        attempts = purge_old_attempts(session, LoginThrottle.from_settings(runtime.settings))
    flow_count = int(getattr(flows, "rowcount", 0) or 0)
    if sessions or flow_count or attempts:
        log.info(
            "purged %d expired sessions, %d abandoned sign-ins and %d old failed sign-in records",
            sessions,
            flow_count,
            attempts,
        )


def optimise_sqlite(runtime: Runtime) -> None:
    """Keep SQLite's query planner statistics current (PostgreSQL's autovacuum does this by itself);
    without them a 100,000-ticket list can pick a full scan over an index."""
    if runtime.engine.dialect.name != "sqlite":
        return
    with runtime.engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA optimize")


def remind_pending_tickets(runtime: Runtime) -> None:
    """Open the tickets whose "pending reminder" time has come."""
    with transaction(runtime.sessions) as session:
        reminded = remind_due_tickets(session)
    if reminded:
        log.info("%d pending tickets reached their reminder", len(reminded))


def default_jobs() -> list[Job]:
    mail = MailScheduler()
    return [
        Job("fetch-mail", interval_seconds=5, run=mail, on_stop=mail.shutdown),
        # In its own thread: a slow SMTP server must not hold up fetching.
        Job("send-mail", interval_seconds=5, run=start_sending),
        Job("token-heartbeat", interval_seconds=3600, run=refresh_stale_tokens),
        Job("alerts", interval_seconds=60, run=run_alerts),
        Job("purge-stale-sign-ins", interval_seconds=600, run=purge_stale_sign_ins),
        Job("pending-reminders", interval_seconds=60, run=remind_pending_tickets),
        Job("optimise-database", interval_seconds=6 * 3600, run=optimise_sqlite),
    ]
