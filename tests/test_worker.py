"""The worker's scheduler and its housekeeping job."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import func, select

from postdesk.db.models import User, WebSession
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.runtime import Runtime
from postdesk.web.sessions import start_session
from postdesk.worker.jobs import purge_stale_sign_ins
from postdesk.worker.scheduler import Job, Scheduler


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_it_runs_each_job_when_due_and_not_before(runtime: Runtime) -> None:
    clock, runs = FakeClock(), []
    scheduler = Scheduler(
        runtime,
        [Job("a", 10, lambda _: runs.append("a")), Job("b", 60, lambda _: runs.append("b"))],
        clock=clock,
    )
    assert scheduler.run_due_jobs() == ["a", "b"]
    clock.now += 11
    assert scheduler.run_due_jobs() == ["a"]
    clock.now += 50
    assert scheduler.run_due_jobs() == ["a", "b"]


def test_a_failing_job_does_not_stop_the_others(runtime: Runtime) -> None:
    def broken(_: Runtime) -> None:
        raise RuntimeError("mailbox exploded")

    ran: list[str] = []
    scheduler = Scheduler(
        runtime, [Job("broken", 1, broken), Job("fine", 1, lambda _: ran.append("fine"))], clock=FakeClock()
    )
    scheduler.run_due_jobs()
    assert ran == ["fine"]
    assert scheduler.jobs[0].failures == 1


def test_the_loop_stops_when_asked(runtime: Runtime) -> None:
    stop = threading.Event()
    scheduler = Scheduler(runtime, [Job("stopper", 1, lambda _: stop.set())])
    worker = threading.Thread(target=scheduler.run_until, args=(stop,))
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive()


def test_housekeeping_removes_expired_sessions_only(runtime: Runtime, admin: User) -> None:
    with transaction(runtime.sessions) as session:
        start_session(session, admin)
        start_session(session, admin)
    with transaction(runtime.sessions) as session:
        old = session.scalars(select(WebSession)).first()
        assert old is not None
        old.expires_at = utcnow() - timedelta(seconds=1)
    purge_stale_sign_ins(runtime)
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(WebSession)) == 1


def test_a_failing_mailbox_is_retried_later_each_time() -> None:
    from postdesk.worker.mail import MailScheduler

    scheduler = MailScheduler(use_idle=False)
    try:
        scheduler._note_outcome(7, failed=True)
        first = scheduler._retry_at[7]
        scheduler._note_outcome(7, failed=True)
        assert scheduler._retry_at[7] > first
        scheduler._note_outcome(7, failed=False)
        assert 7 not in scheduler._retry_at
    finally:
        scheduler.shutdown()
