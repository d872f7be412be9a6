"""Turning conditions into Alert rows and telling admins, once per alert and once when it is resolved.

An alert's ``notified_at`` says whether admins know its current state: None on an open alert means its
announcement is still to be sent; None on a resolved one means the "resolved" notice is. A failed
attempt leaves it None, stores the reason in ``notify_error`` and is tried again at the next evaluation.
Staged conditions (a secret at 30, then 14 days) replace one another quietly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session

from postdesk.alerts.conditions import Condition, current_conditions, family_of, fix_for
from postdesk.alerts.notify import Notice, Outcome, deliver
from postdesk.db.models import Alert, Channel
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.runtime import Runtime

log = logging.getLogger(__name__)

# A "resolved" notice that could not be sent for this long is dropped: it is old news by then.
RESOLVED_NOTICE_WINDOW = timedelta(days=7)
# PostgreSQL advisory lock: one evaluator at a time across workers, so nobody is told twice.
_LOCK_KEY = 0x706F7374_616C7274 & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class AlertReport:
    opened: list[str] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)
    notified: int = 0
    failed: int = 0

    def summary(self) -> str:
        return (
            f"{len(self.opened)} opened, {len(self.resolved)} resolved, "
            f"{self.notified} notices sent, {self.failed} not sent"
        )


def evaluate_alerts(runtime: Runtime, *, now: datetime | None = None) -> AlertReport:
    """Open alerts for new conditions, resolve cleared ones, then tell admins what they do not know yet."""
    now = now or utcnow()
    report = AlertReport()
    with _one_evaluator(runtime) as ours:
        if not ours:
            return report
        with transaction(runtime.sessions) as session:
            synchronise(session, current_conditions(session, now), now=now, report=report)
        _notify(runtime, now, report)
    if report.opened or report.resolved or report.failed:
        log.info("alerts: %s", report.summary())
    return report


def run_alerts(runtime: Runtime) -> None:
    """The worker job: never raises, so a broken alert path cannot disturb the other jobs."""
    try:
        evaluate_alerts(runtime)
    except Exception:
        log.exception("evaluating alerts failed; it runs again in a minute")


def synchronise(session: Session, conditions: list[Condition], *, now: datetime, report: AlertReport) -> None:
    current = {condition.key: condition for condition in conditions}
    families = {condition.family for condition in conditions}
    still_open: set[str] = set()
    for alert in session.scalars(select(Alert).where(Alert.resolved_at.is_(None)).order_by(Alert.id)):
        condition = current.get(alert.key)
        if condition is None or alert.key in still_open:
            _resolve(
                alert, now, quietly=condition is not None or family_of(alert.key, alert.kind) in families
            )
            report.resolved.append(alert.key)
            continue
        still_open.add(alert.key)
        # Same condition, possibly new words (another error, another threshold of hours): no new notice.
        alert.kind, alert.severity, alert.title, alert.message = (
            condition.kind.value,
            condition.severity,
            condition.title[:300],
            condition.message,
        )
    for key, condition in current.items():
        if key not in still_open:
            session.add(_new_alert(condition, now))
            report.opened.append(key)


def _new_alert(condition: Condition, now: datetime) -> Alert:
    return Alert(
        key=condition.key,
        kind=condition.kind.value,
        severity=condition.severity,
        channel_id=condition.channel_id,
        title=condition.title[:300],
        message=condition.message,
        created_at=now,
    )


def _resolve(alert: Alert, now: datetime, *, quietly: bool) -> None:
    alert.resolved_at = now
    alert.notify_error = None
    # Quietly: its successor tells the story. Otherwise a "resolved" notice is due.
    alert.notified_at = now if quietly else None


def _notify(runtime: Runtime, now: datetime, report: AlertReport) -> None:
    with runtime.sessions() as session:
        notices = [_notice(alert, email) for alert, email in _pending(session, now)]
    outcomes = deliver(runtime, notices)
    with transaction(runtime.sessions) as session:
        for alert_id, outcome in outcomes.items():
            alert = session.get(Alert, alert_id)
            if alert is None:
                continue
            if not outcome.delivered and outcome.error != alert.notify_error:  # once, not every minute
                log.warning("alert %d: admins could not be told yet: %s", alert_id, outcome.error)
            _record(alert, outcome, now)
            report.notified += outcome.delivered
            report.failed += not outcome.delivered


def _pending(session: Session, now: datetime) -> list[tuple[Alert, str | None]]:
    query = (
        select(Alert, Channel.email)
        .outerjoin(Channel, Alert.channel_id == Channel.id)
        .where(
            Alert.notified_at.is_(None),
            or_(Alert.resolved_at.is_(None), Alert.resolved_at >= now - RESOLVED_NOTICE_WINDOW),
        )
        .order_by(Alert.id)
    )
    return [(alert, email) for alert, email in session.execute(query)]


def _notice(alert: Alert, channel_email: str | None) -> Notice:
    return Notice(
        alert_id=alert.id,
        event="resolved" if alert.resolved_at is not None else "opened",
        key=alert.key,
        kind=alert.kind,
        severity=alert.severity,
        title=alert.title,
        message=alert.message,
        channel_id=alert.channel_id,
        channel_email=channel_email,
        fix=fix_for(alert.kind, alert.channel_id),
        created_at=alert.created_at,
        resolved_at=alert.resolved_at,
    )


def _record(alert: Alert, outcome: Outcome, now: datetime) -> None:
    if outcome.delivered:
        alert.notified_at = now
    alert.notify_error = outcome.error


@contextmanager
def _one_evaluator(runtime: Runtime) -> Iterator[bool]:
    """True when this process may evaluate now. SQLite deployments are one process; PostgreSQL ones use
    a session advisory lock, so two workers never announce the same alert twice."""
    if runtime.engine.dialect.name != "postgresql":
        yield True
        return
    with runtime.engine.connect() as connection:
        ours = bool(connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": _LOCK_KEY}))
        connection.commit()
        try:
            yield ours
        finally:
            if ours:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _LOCK_KEY})
                connection.commit()
