"""Scheduling mail fetches: IDLE push where the server offers it, polling on an interval always.

Fetches run on a small thread pool, so one slow or broken mailbox never delays the others; a mailbox
whose fetch is still running is not started twice, but new mail announced meanwhile is fetched right
after it.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from functools import partial

from sqlalchemy import select

from postdesk.db.models import Channel, ChannelStatus
from postdesk.db.types import utcnow
from postdesk.ingest.fetch import FetchResult, MailboxFactory, default_mailbox, fetch_channel
from postdesk.runtime import Runtime
from postdesk.worker.idle import IdleWatcher

log = logging.getLogger(__name__)
PARALLEL_FETCHES = 4
MAX_RETRY_DELAY = timedelta(minutes=15)


class MailScheduler:
    def __init__(
        self,
        *,
        parallel: int = PARALLEL_FETCHES,
        use_idle: bool = True,
        mailbox_factory: MailboxFactory = default_mailbox,
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="postdesk-fetch")
        self._running: dict[int, Future[FetchResult]] = {}
        self._again: set[int] = set()
        self._watchers: dict[int, IdleWatcher] = {}
        self._guard = threading.Lock()
        self._use_idle = use_idle
        self._mailbox_factory = mailbox_factory
        self._runtime: Runtime | None = None
        # Failed fetches wait longer each time (interval × 2^failures, at most 15 minutes).
        self._failures: dict[int, int] = {}
        self._retry_at: dict[int, datetime] = {}

    def __call__(self, runtime: Runtime) -> None:
        """The scheduler job: start due fetches and keep one IDLE watcher per healthy mailbox."""
        self._runtime = runtime
        now = utcnow()
        with runtime.sessions() as session:
            rows = session.execute(
                select(Channel.id, Channel.status, Channel.last_fetch_at, Channel.fetch_interval_seconds)
            ).all()
        healthy = {cid for cid, status, _last, _every in rows if status is ChannelStatus.OK}
        for channel_id, status, last, every in rows:
            due = last is None or last + timedelta(seconds=every) <= now
            backing_off = self._retry_at.get(channel_id, now) > now
            if status in (ChannelStatus.OK, ChannelStatus.ERROR) and due and not backing_off:
                self.request_fetch(channel_id)
        if self._use_idle:
            self._keep_watchers(runtime, healthy)

    def request_fetch(self, channel_id: int) -> None:
        runtime = self._runtime
        if runtime is None:
            return
        with self._guard:
            running = self._running.get(channel_id)
            if running is not None and not running.done():
                self._again.add(channel_id)
                return
            future = self._pool.submit(
                fetch_channel, runtime, channel_id, mailbox_factory=self._mailbox_factory
            )
            self._running[channel_id] = future
        future.add_done_callback(partial(self._finished, channel_id))

    def _finished(self, channel_id: int, future: Future[FetchResult]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        failed = error is not None or bool(future.result().error)
        if error is not None:
            log.error("fetching mailbox %s crashed: %s", channel_id, error)
        else:
            log.info("mailbox %s: %s", channel_id, future.result().summary)
        self._note_outcome(channel_id, failed=failed)
        with self._guard:
            again = channel_id in self._again
            self._again.discard(channel_id)
        if again:
            self.request_fetch(channel_id)

    def _note_outcome(self, channel_id: int, *, failed: bool) -> None:
        with self._guard:
            if not failed:
                self._failures.pop(channel_id, None)
                self._retry_at.pop(channel_id, None)
                return
            count = self._failures.get(channel_id, 0) + 1
            self._failures[channel_id] = count
            delay = min(timedelta(seconds=30 * 2**count), MAX_RETRY_DELAY)
            self._retry_at[channel_id] = utcnow() + delay

    def _keep_watchers(self, runtime: Runtime, healthy: set[int]) -> None:
        for channel_id in list(self._watchers):
            watcher = self._watchers[channel_id]
            if channel_id not in healthy or not watcher.alive:
                watcher.stop()
                if watcher.unsupported and channel_id in healthy:
                    continue  # no IDLE on this server: keep the dead watcher as a marker, poll instead
                del self._watchers[channel_id]
        for channel_id in healthy - set(self._watchers):
            watcher = IdleWatcher(
                runtime, channel_id, on_new_mail=self.request_fetch, mailbox_factory=self._mailbox_factory
            )
            self._watchers[channel_id] = watcher
            watcher.start()

    def watcher(self, channel_id: int) -> IdleWatcher | None:
        return self._watchers.get(channel_id)

    def shutdown(self) -> None:
        for watcher in self._watchers.values():
            watcher.stop()
        for watcher in self._watchers.values():
            watcher.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
