"""IMAP IDLE: the server tells us about new mail, so it becomes a ticket within seconds.

One watcher per mailbox keeps an authenticated IDLE session open and asks for a fetch when the server
reports new mail; the fetch itself is the same as a scheduled one. Exchange Online ends idle sessions
after about 30 minutes, so the watcher renews its session (and its access token) well before that,
and reconnects with jittered backoff after a failure. Polling stays on as the safety net.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from postdesk.db.models import Channel, ChannelStatus
from postdesk.ingest.fetch import MailboxFactory, access_token_for_channel
from postdesk.runtime import Runtime
from postdesk.transports.errors import TransportError
from postdesk.transports.imap import ImapMailbox

log = logging.getLogger(__name__)
SESSION_SECONDS = 20 * 60
IDLE_CHECK_SECONDS = 25.0
MAX_BACKOFF_SECONDS = 300.0


class IdleWatcher:
    def __init__(
        self,
        runtime: Runtime,
        channel_id: int,
        *,
        on_new_mail: Callable[[int], None],
        mailbox_factory: MailboxFactory,
    ) -> None:
        self.runtime = runtime
        self.channel_id = channel_id
        self.on_new_mail = on_new_mail
        self.mailbox_factory = mailbox_factory
        self.stop_event = threading.Event()
        self.unsupported = False
        self.idling = threading.Event()  # set while an IDLE session is open (tests and health checks)
        self._mailbox: ImapMailbox | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"postdesk-idle-{channel_id}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        mailbox = self._mailbox
        if mailbox is not None:
            mailbox.abort()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        backoff = 1.0
        while not self.stop_event.is_set() and not self.unsupported:
            try:
                self._session()
                backoff = 1.0
            except (TransportError, OSError) as exc:
                if self.stop_event.is_set():
                    return
                delay = backoff * random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not secrecy
                log.info(
                    "IDLE for mailbox %s interrupted (%s); reconnecting in %.0f s",
                    self.channel_id,
                    exc,
                    delay,
                )
                self.stop_event.wait(delay)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _session(self) -> None:
        with self.runtime.sessions() as session:
            channel = session.get(Channel, self.channel_id)
            if channel is None or channel.status is not ChannelStatus.OK:
                self.stop_event.wait(IDLE_CHECK_SECONDS)
                return
            email, folder = channel.email, channel.folder
            token = access_token_for_channel(session, self.runtime, channel)
            session.commit()
        with self.mailbox_factory(self.runtime) as mailbox:
            self._mailbox = mailbox
            if self.stop_event.is_set():
                return
            mailbox.login(email, token)
            if not mailbox.supports_idle():
                self.unsupported = True
                return
            mailbox.open(folder)
            ends = time.monotonic() + SESSION_SECONDS
            try:
                while not self.stop_event.is_set() and time.monotonic() < ends:
                    if mailbox.wait_for_change(IDLE_CHECK_SECONDS, idling=self.idling.set):
                        self.on_new_mail(self.channel_id)
            finally:
                self.idling.clear()
                self._mailbox = None
