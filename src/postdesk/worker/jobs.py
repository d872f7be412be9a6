"""The jobs the worker runs, and the default schedule."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete

from postdesk.db.models import OAuthFlow
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.runtime import Runtime
from postdesk.web.sessions import purge_expired_sessions
from postdesk.worker.heartbeat import refresh_stale_tokens
from postdesk.worker.mail import MailScheduler
from postdesk.worker.scheduler import Job

log = logging.getLogger(__name__)

# A sign-in that has not come back from Microsoft within this time is abandoned.
OAUTH_FLOW_LIFETIME = timedelta(minutes=30)


def purge_stale_sign_ins(runtime: Runtime) -> None:
    """Forget expired browser sessions and abandoned Microsoft sign-ins (they hold PKCE verifiers)."""
    with transaction(runtime.sessions) as session:
        sessions = purge_expired_sessions(session)
        flows = session.execute(
            delete(OAuthFlow).where(OAuthFlow.created_at < utcnow() - OAUTH_FLOW_LIFETIME)
        )
    flow_count = int(getattr(flows, "rowcount", 0) or 0)
    if sessions or flow_count:
        log.info("purged %d expired sessions and %d abandoned sign-ins", sessions, flow_count)


def default_jobs() -> list[Job]:
    mail = MailScheduler()
    return [
        Job("fetch-mail", interval_seconds=5, run=mail, on_stop=mail.shutdown),
        Job("token-heartbeat", interval_seconds=3600, run=refresh_stale_tokens),
        Job("purge-stale-sign-ins", interval_seconds=600, run=purge_stale_sign_ins),
    ]
