"""Scheduling mail fetches: IDLE push where the server offers it, polling on an interval always.

Fetches run on a small thread pool, so one slow or broken mailbox never delays the others; a mailbox
whose fetch is still running is not started twice, but new mail announced meanwhile is fetched right
after it.

Only the mailboxes this worker holds a lease on (``worker/leases.py``) are fetched and IDLE-watched, so
several workers share them. A mailbox taken over from another worker is fetched at once (IDLE only
announces mail that arrives after it starts); one given up or lost has its IDLE watcher stopped and no
new fetch started. A fetch already running when a lease is lost finishes its pass: the unique key on
inbound mail makes that harmless.
"""

from __future__ import annotations

import logging
import random
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from functools import partial

from sqlalchemy import select

from postdesk.db.models import Channel, ChannelStatus, Transport
from postdesk.db.types import utcnow
from postdesk.ingest.fetch import FetchResult, MailboxFactory, default_mailbox, fetch_channel
from postdesk.runtime import Runtime
from postdesk.worker.idle import IdleHub, IdleWatch
from postdesk.worker.leases import ChannelLeases, process_worker_id

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
        worker_id: str | None = None,
    ) -> None:
        self.worker_id = worker_id or process_worker_id()
        self._leases: ChannelLeases | None = None
        self._stopping = False
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="postdesk-fetch")
        self._running: dict[int, Future[FetchResult]] = {}
        self._again: set[int] = set()
        self._hub: IdleHub | None = None
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
        held = (self._leases or self._start_leases(runtime)).held()
        now = utcnow()
        with runtime.sessions() as session:
            rows = session.execute(
                select(
                    Channel.id,
                    Channel.status,
                    Channel.last_fetch_at,
                    Channel.fetch_interval_seconds,
                    Channel.transport,
                ).where(Channel.id.in_(held))
            ).all()
        # IDLE is IMAP's; Graph mailboxes are polled (their delta rounds are cheap).
        idle = {
            cid
            for cid, status, _last, _every, transport in rows
            if status is ChannelStatus.OK and transport is Transport.IMAP
        }
        for channel_id, status, last, every, _transport in rows:
            due = last is None or last + timedelta(seconds=every) <= now
            backing_off = self._retry_at.get(channel_id, now) > now
            if status in (ChannelStatus.OK, ChannelStatus.ERROR) and due and not backing_off:
                self.request_fetch(channel_id)
        if self._use_idle:
            self._keep_watchers(runtime, idle)

    def _start_leases(self, runtime: Runtime) -> ChannelLeases:
        leases = ChannelLeases(
            runtime,
            self.worker_id,
            ttl=timedelta(seconds=runtime.settings.worker_lease_seconds),
            busy=self._busy,
            on_change=self._leases_changed,
        )
        leases.renew()  # before the thread, so that this first call already fetches what it holds
        self._leases = leases
        leases.start()
        return leases

    def holds(self, channel_id: int) -> bool:
        return self._leases is not None and self._leases.holds(channel_id)

    def request_fetch(self, channel_id: int) -> None:
        runtime = self._runtime
        if runtime is None or self._stopping or not self.holds(channel_id):
            return
        with self._guard:
            running = self._running.get(channel_id)
            if running is not None and not running.done():
                self._again.add(channel_id)
                return
            future = self._pool.submit(self._fetch_held, runtime, channel_id)
            self._running[channel_id] = future
        future.add_done_callback(partial(self._finished, channel_id))

    def _fetch_held(self, runtime: Runtime, channel_id: int) -> FetchResult:
        leases = self._leases
        assert leases is not None
        # A renewal in progress may be giving this mailbox to another worker: let it decide first.
        # (Renewals never give away a mailbox whose fetch was submitted before they looked.)
        with leases.lock:
            held = leases.holds(channel_id)
        if not held:
            return FetchResult(channel_id=channel_id, skipped="this worker no longer holds the mailbox")
        return fetch_channel(
            runtime, channel_id, mailbox_factory=self._mailbox_factory, worker_id=self.worker_id
        )

    def _busy(self) -> set[int]:
        with self._guard:
            return {channel_id for channel_id, future in self._running.items() if not future.done()}

    def _leases_changed(self, gained: frozenset[int], lost: frozenset[int]) -> None:
        with self._guard:
            for channel_id in lost:
                if self._hub is not None:
                    self._hub.unwatch(channel_id)
                self._again.discard(channel_id)
        if self._leases is None:
            return  # the first round: __call__ starts what is due right after it
        for channel_id in gained:
            # Taken over: mail may have arrived while nobody watched, and IDLE only tells of what's next.
            self.request_fetch(channel_id)

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
            # Jitter, so mailboxes that failed together (a Microsoft outage) do not retry in lockstep.
            delay = min(timedelta(seconds=30 * 2**count), MAX_RETRY_DELAY) * random.uniform(0.8, 1.2)  # noqa: S311
            self._retry_at[channel_id] = utcnow() + delay

    def _keep_watchers(self, runtime: Runtime, healthy: set[int]) -> None:
        with self._guard:
            hub = self._hub
            if hub is None or not hub.running:
                hub = self._hub = IdleHub(
                    runtime, on_new_mail=self.request_fetch, mailbox_factory=self._mailbox_factory
                )
            watching = hub.watching()
            for channel_id, watch in watching.items():
                if channel_id not in healthy:
                    hub.unwatch(channel_id)
                elif not watch.alive and not watch.unsupported:
                    hub.watch(channel_id)  # stopped under us: start over
            # A server without IDLE keeps its watch as a marker: the mailbox is polled instead.
            for channel_id in healthy - set(watching):
                hub.watch(channel_id)

    def watcher(self, channel_id: int) -> IdleWatch | None:
        hub = self._hub
        return hub.get(channel_id) if hub is not None else None

    def shutdown(self) -> None:
        """Stop watching, let running fetches finish (their leases are still renewed meanwhile), then
        give every mailbox back so that the other workers take them over at once."""
        self._stopping = True
        if self._leases is not None:
            self._leases.drain()
        with self._guard:
            hub, self._hub = self._hub, None
        if hub is not None:
            hub.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._leases is not None:
            self._leases.stop_and_release()
