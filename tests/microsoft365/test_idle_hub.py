"""One worker thread holds the IDLE sessions of many mailboxes, and a broken session loses no mail."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from sqlalchemy import update

from postdesk.db.models import Channel
from postdesk.db.session import transaction
from postdesk.runtime import Runtime
from postdesk.sandbox import CONTOSO_TENANT_ID, SandboxDirectory
from postdesk.transports.imap import ImapMailbox
from postdesk.worker.idle import OPENING_THREADS
from postdesk.worker.mail import MailScheduler
from tests.microsoft365.conftest import SignIn, channels, fetch, tickets
from tests.support.dovecot import DovecotServer
from tests.support.mailfactory import customer_mail

MAILBOXES = 12


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting {timeout:.0f} s for {what}"
        time.sleep(0.05)


def idle_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith("postdesk-idle"))


def no_polling(runtime: Runtime) -> None:
    """An hour between polls: any ticket made in the test was announced by IDLE."""
    with transaction(runtime.sessions) as session:
        session.execute(update(Channel).values(fetch_interval_seconds=3600))


def test_one_thread_watches_many_mailboxes_and_each_one_pushes_its_mail(
    signin: SignIn, m365_runtime: Runtime, directory: SandboxDirectory, dovecot: DovecotServer
) -> None:
    upns = [
        directory.add_user(
            upn=f"hub{n}-{time.monotonic_ns()}@contoso.onmicrosoft.com",
            display_name=f"Hub {n}",
            tenant_id=CONTOSO_TENANT_ID,
        ).upn
        for n in range(MAILBOXES)
    ]
    for upn in upns:
        assert signin.connect(upn).status_code == 303
    no_polling(m365_runtime)
    for channel in channels(m365_runtime):
        fetch(m365_runtime, channel.id)
    scheduler = MailScheduler()
    try:
        scheduler(m365_runtime)
        watches = [scheduler.watcher(channel.id) for channel in channels(m365_runtime)]
        assert all(watch is not None and watch.idling.wait(30) for watch in watches)
        # The hub and its opening pool, however many mailboxes: not a thread per mailbox.
        assert idle_threads() <= 1 + OPENING_THREADS
        for upn in upns:
            dovecot.deliver(upn, customer_mail(to=upn, subject=f"Pushed to {upn}"))
        wait_until(lambda: len(tickets(m365_runtime)) == MAILBOXES, timeout=60, what="every mailbox's ticket")
    finally:
        scheduler.shutdown()
    assert sorted(t.title for t in tickets(m365_runtime)) == sorted(f"Pushed to {upn}" for upn in upns)
    assert all(watch is not None and watch.closed.is_set() for watch in watches)


class GatedMailbox(ImapMailbox):
    """Signs in only while the gate is open: holds a reconnect back for as long as a test needs."""

    gate = threading.Event()

    def login(self, username: str, access_token: str) -> None:
        assert self.gate.wait(60), "the test never opened the gate"
        super().login(username, access_token)


def test_mail_that_arrives_while_a_session_is_broken_is_fetched_when_it_reconnects(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    from postdesk.ingest.fetch import default_mailbox

    def gated(runtime: Runtime) -> ImapMailbox:
        plain = default_mailbox(runtime)
        return GatedMailbox(plain.endpoint, ssl_context=plain._ssl_context)

    GatedMailbox.gate.set()
    no_polling(m365_runtime)
    fetch(m365_runtime, channel_id)
    scheduler = MailScheduler(mailbox_factory=gated)
    try:
        scheduler(m365_runtime)
        watch = scheduler.watcher(channel_id)
        assert watch is not None and watch.idling.wait(30)
        GatedMailbox.gate.clear()
        assert watch.mailbox is not None
        # The connection drops, as when a NAT box forgets it or Exchange ends it.
        watch.mailbox.idle_socket().shutdown(socket.SHUT_RDWR)
        wait_until(lambda: not watch.idling.is_set(), timeout=30, what="the hub to notice the drop")
        dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Sent while nobody listened"))
        time.sleep(0.5)
        assert tickets(m365_runtime) == []
        GatedMailbox.gate.set()  # the reconnect may go ahead; IDLE itself will not mention this mail
        wait_until(lambda: len(tickets(m365_runtime)) == 1, timeout=30, what="the mail sent meanwhile")
        assert watch.idling.wait(30)
    finally:
        GatedMailbox.gate.set()
        scheduler.shutdown()
    assert [t.title for t in tickets(m365_runtime)] == ["Sent while nobody listened"]
