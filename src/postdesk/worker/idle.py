"""IMAP IDLE: the server tells us about new mail, so it becomes a ticket within seconds.

One thread (the hub) holds every IDLE session of a worker: it waits on all their sockets at once with a
selector and asks for a fetch when a server announces new mail. The blocking round trips (access token,
TLS, sign-in, SELECT, and renewing a session) run on a small pool, so a worker watching hundreds of
mailboxes holds a socket and a few kilobytes per mailbox, not a thread. Each mailbox has one IDLE
connection besides its fetch, well under Exchange Online's limit of 20 IMAP connections per mailbox.

A session is renewed (DONE, then IDLE again) every few minutes, well before the 29 minutes after which
RFC 2177 allows a server to drop it and before middleboxes forget a quiet connection; it is replaced by a
new sign-in every 20 minutes, with a fresh access token, because Exchange ends sessions whose token has
expired. A session that breaks reconnects after a jittered, doubling delay. When a session opens and
the folder's next UID shows mail that arrived while nobody watched, a fetch is asked for at once.
Polling stays on as the safety net.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from postdesk.db.models import Channel, ChannelStatus
from postdesk.ingest.fetch import MailboxFactory, access_token_for_channel
from postdesk.runtime import Runtime
from postdesk.transports.errors import TransportError
from postdesk.transports.imap import ImapMailbox

log = logging.getLogger(__name__)
SESSION_SECONDS = 20 * 60
RENEW_SECONDS = 4 * 60
NOT_READY_SECONDS = 30.0  # a mailbox that needs attention is looked at again after this
MAX_BACKOFF_SECONDS = 300.0
OPENING_THREADS = 4


def _jittered(seconds: float) -> float:
    return seconds * random.uniform(0.8, 1.2)  # noqa: S311 - spreading load, not secrecy


class _NotReady(Exception):
    """The mailbox cannot be watched now (removed, or waiting for sign-in): look again later."""


class IdleWatch:
    """One mailbox's IDLE session, as the hub keeps it.

    ``idling`` is set while the server has accepted IDLE, i.e. while it will push news of new mail."""

    def __init__(self, channel_id: int) -> None:
        self.channel_id = channel_id
        self.idling = threading.Event()
        self.unsupported = False  # the server offers no IDLE: the mailbox is polled only
        self.closed = threading.Event()  # stopped, and its connection closed
        self.stopped = False
        self.mailbox: ImapMailbox | None = None  # open and idling, owned by the hub thread
        self.opening: ImapMailbox | None = None  # being opened or renewed on the pool
        self.session_ends = 0.0
        self.due = 0.0  # monotonic: when to open (no mailbox) or renew (idling)
        self.backoff = 1.0

    @property
    def alive(self) -> bool:
        return not self.stopped and not self.unsupported

    @property
    def busy(self) -> bool:
        return self.opening is not None

    def join(self, timeout: float) -> None:
        self.closed.wait(timeout)


class IdleHub:
    def __init__(
        self,
        runtime: Runtime,
        *,
        on_new_mail: Callable[[int], None],
        mailbox_factory: MailboxFactory,
        opening_threads: int = OPENING_THREADS,
    ) -> None:
        self.runtime = runtime
        self.on_new_mail = on_new_mail
        self.mailbox_factory = mailbox_factory
        self._watches: dict[int, IdleWatch] = {}
        self._retired: list[IdleWatch] = []
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._selector.register(self._wake_in, selectors.EVENT_READ, None)
        self._finished: queue.SimpleQueue[tuple[IdleWatch, ImapMailbox | BaseException | None]]
        self._finished = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(max_workers=opening_threads, thread_name_prefix="postdesk-idle-open")
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="postdesk-idle")
        self._thread.start()

    # -- called from other threads ------------------------------------------------------------------

    def watch(self, channel_id: int) -> IdleWatch:
        with self._lock:
            watch = self._watches.get(channel_id)
            if watch is None or watch.stopped:
                watch = self._watches[channel_id] = IdleWatch(channel_id)
        self._wake()
        return watch

    def unwatch(self, channel_id: int) -> None:
        with self._lock:
            watch = self._watches.pop(channel_id, None)
            if watch is None:
                return
            watch.stopped = True
            self._retired.append(watch)
        self._wake()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def get(self, channel_id: int) -> IdleWatch | None:
        with self._lock:
            return self._watches.get(channel_id)

    def watching(self) -> dict[int, IdleWatch]:
        with self._lock:
            return dict(self._watches)

    def stop(self, timeout: float = 5.0) -> None:
        """Close every session. Openings still under way are closed as soon as they finish."""
        self._stopping.set()
        with self._lock:
            watches = [*self._watches.values(), *self._retired]
        for watch in watches:
            opening = watch.opening
            if opening is not None:
                opening.abort()  # ends a sign-in or renewal that waits on the network
        self._wake()
        self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_out.send(b"\0")

    # -- the hub thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._round()
                except Exception:  # one bad round must not end IDLE for every mailbox
                    log.exception("the IDLE hub hit an unexpected error; carrying on")
                    self._stopping.wait(1.0)
        finally:
            self._close_all()

    def _round(self) -> None:
        for key, _events in self._selector.select(self._wait_seconds()):
            if key.data is None:
                with contextlib.suppress(OSError):
                    self._wake_in.recv(4096)
            else:
                self._readable(key.data)
        self._take_finished()
        self._tidy()
        self._start_due()

    def _wait_seconds(self) -> float:
        with self._lock:
            watches = list(self._watches.values())
        if any(not watch.busy for watch in self._retired):
            return 0.0  # one to close now
        pending = [watch.due for watch in watches if watch.alive and not watch.busy]
        if not pending:
            return 60.0
        return max(0.0, min(60.0, min(pending) - time.monotonic()))

    def _readable(self, watch: IdleWatch) -> None:
        mailbox = watch.mailbox
        if mailbox is None:
            return
        try:
            news = mailbox.idle_news()
        except Exception as exc:  # whatever broke, this session is over: reconnect
            self._broken(watch, exc)
            return
        if news.new_mail:
            self.on_new_mail(watch.channel_id)
        if news.goodbye:
            self._broken(watch, TransportError("the server ended the IDLE session"))

    def _broken(self, watch: IdleWatch, exc: BaseException) -> None:
        self._detach(watch)
        self._retry_later(watch, exc)

    def _detach(self, watch: IdleWatch) -> ImapMailbox | None:
        mailbox, watch.mailbox = watch.mailbox, None
        watch.idling.clear()
        if mailbox is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(mailbox.idle_socket())
        return mailbox

    def _retry_later(self, watch: IdleWatch, exc: BaseException) -> None:
        delay = _jittered(watch.backoff)
        watch.backoff = min(watch.backoff * 2, MAX_BACKOFF_SECONDS)
        watch.due = time.monotonic() + delay
        log.info("IDLE for mailbox %s interrupted (%s); reconnecting in %.0f s", watch.channel_id, exc, delay)

    def _start_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            watches = list(self._watches.values())
        for watch in watches:
            if watch.busy or not watch.alive or watch.due > now:
                continue
            mailbox = self._detach(watch)
            renewing = mailbox is not None and now < watch.session_ends
            if mailbox is not None and not renewing:
                mailbox.abort()
                mailbox.close()
                mailbox = None
            watch.opening = mailbox or self.mailbox_factory(self.runtime)
            task = self._renew if renewing else self._open
            self._pool.submit(self._on_pool, watch, task)

    def _on_pool(self, watch: IdleWatch, task: Callable[[IdleWatch], ImapMailbox | None]) -> None:
        outcome: ImapMailbox | BaseException | None
        try:
            outcome = task(watch)
        except BaseException as exc:  # handed to the hub thread, which decides
            outcome = exc
        if self._stopping.is_set():
            if watch.opening is not None:
                watch.opening.close()
            return
        self._finished.put((watch, outcome))
        self._wake()

    def _take_finished(self) -> None:
        while True:
            try:
                watch, outcome = self._finished.get_nowait()
            except queue.Empty:
                return
            opened = watch.opening
            watch.opening = None
            if isinstance(outcome, ImapMailbox) and not watch.stopped:
                watch.mailbox = outcome
                self._selector.register(outcome.idle_socket(), selectors.EVENT_READ, watch)
                watch.idling.set()
                watch.backoff = 1.0
                watch.due = time.monotonic() + _jittered(RENEW_SECONDS)
                continue
            if opened is not None:
                opened.close()
            if outcome is None:
                watch.unsupported = True
            elif isinstance(outcome, _NotReady):
                watch.due = time.monotonic() + NOT_READY_SECONDS
            elif isinstance(outcome, (TransportError, OSError)):
                self._retry_later(watch, outcome)
            elif isinstance(outcome, BaseException):
                log.error("IDLE for mailbox %s failed: %r", watch.channel_id, outcome)
                self._retry_later(watch, outcome)

    def _tidy(self) -> None:
        with self._lock:
            retired = [watch for watch in self._retired if not watch.busy]
            self._retired = [watch for watch in self._retired if watch.busy]
        for watch in retired:
            mailbox = self._detach(watch)
            if mailbox is not None:
                mailbox.abort()
                mailbox.close()
            watch.closed.set()

    def _close_all(self) -> None:
        with self._lock:
            watches = [*self._watches.values(), *self._retired]
        for watch in watches:
            watch.stopped = True
            mailbox = self._detach(watch)
            if mailbox is not None:
                mailbox.abort()
                mailbox.close()
            watch.closed.set()
        with contextlib.suppress(OSError):
            self._selector.close()
            self._wake_in.close()
            self._wake_out.close()

    # -- on the pool: the blocking round trips -----------------------------------------------------

    def _open(self, watch: IdleWatch) -> ImapMailbox | None:
        """Sign in, open the folder and start IDLE; None when the server offers no IDLE."""
        mailbox = watch.opening
        assert mailbox is not None
        with self.runtime.sessions() as session:
            channel = session.get(Channel, watch.channel_id)
            if channel is None or channel.status is not ChannelStatus.OK:
                raise _NotReady
            email, folder = channel.email, channel.folder
            known = (channel.imap_uidvalidity, channel.imap_last_uid)
            token = access_token_for_channel(session, self.runtime, channel)
            session.commit()
        mailbox.login(email, token)
        if not mailbox.supports_idle():
            return None
        state = mailbox.open(folder)
        if mailbox.start_idle().new_mail:
            self.on_new_mail(watch.channel_id)
        watch.session_ends = time.monotonic() + _jittered(SESSION_SECONDS)
        # Mail that arrived while nobody watched is not announced by IDLE: UIDNEXT tells of it. (Before
        # the first fetch there is nothing to compare with, and the scheduler fetches anyway.)
        moved = known != (state.uidvalidity, state.uidnext - 1)
        if known[0] is not None and moved and state.exists:
            self.on_new_mail(watch.channel_id)
        return mailbox

    def _renew(self, watch: IdleWatch) -> ImapMailbox:
        mailbox = watch.opening
        assert mailbox is not None
        if mailbox.end_idle().new_mail | mailbox.start_idle().new_mail:
            self.on_new_mail(watch.channel_id)
        return mailbox
