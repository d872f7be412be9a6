"""Leases: which worker fetches which mailbox, so that any number of ``postdesk worker`` processes, on
any number of hosts, share the mailboxes of one PostgreSQL database.

Every worker has an identity (``host:pid:random``) and a row in ``workers`` with a heartbeat. Each round
(every quarter of the lease time, at most 15 s) it renews its heartbeat and the leases it holds
(``channels.lease_owner`` and ``lease_until``), gives back what exceeds its fair share, and takes free
or expired leases up to that share: ceil(mailboxes to fetch / live workers), live meaning a heartbeat
within the lease time. On PostgreSQL the candidates are locked with ``SELECT … FOR UPDATE SKIP
LOCKED``, so workers claiming at the same moment neither wait for each other nor take the same
mailbox; every UPDATE repeats the condition it relies on and only the rows it returns count. SQLite
has no row locks: there the conditional UPDATE alone decides (one process per SQLite database).

A worker that dies stops renewing; its leases run out after the lease time and the others take its
mailboxes. A worker that stops cleanly (SIGTERM) gives them back at once. Times come from the
database's clock, so the hosts' clocks need not agree.

Leases keep two workers from fetching one mailbox at the same time. They are not what makes ingest
exactly-once: the unique key on ``inbound_messages`` is, so a lease that lapses mid-fetch (a worker
frozen for longer than the lease time) costs a repeated download, never a duplicate ticket.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from functools import cache

from sqlalchemy import ColumnElement, delete, func, or_, select, update
from sqlalchemy.orm import Session

from postdesk.db.models import Channel, ChannelStatus, Worker
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.runtime import Runtime

log = logging.getLogger(__name__)
# The mailboxes the scheduler fetches; a disabled one or one waiting for sign-in needs no worker.
LEASED_STATUSES = (ChannelStatus.OK, ChannelStatus.ERROR)
MAX_RENEW_SECONDS = 15.0

LeaseChange = Callable[[frozenset[int], frozenset[int]], None]  # (gained, lost)


def new_worker_id() -> str:
    """``host:pid:random``: readable in the ``workers`` table, unique even when a pid is reused."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(4)}"


@cache
def _worker_id_of(pid: int) -> str:
    return new_worker_id()


def process_worker_id() -> str:
    """This process's identity as a worker (a forked child gets its own)."""
    return _worker_id_of(os.getpid())


def database_now(session: Session) -> datetime:
    """The database's clock on PostgreSQL (shared by every host), this machine's on SQLite."""
    if session.get_bind().dialect.name != "postgresql":
        return utcnow()
    now: datetime | None = session.scalar(select(func.now()))
    assert now is not None
    return now.astimezone(UTC)


def claim_channels(
    session: Session,
    worker_id: str,
    *,
    now: datetime,
    ttl: timedelta,
    busy: Collection[int] = (),
    draining: bool = False,
) -> set[int]:
    """Renew this worker's leases and take free ones up to its fair share; return the mailboxes it holds.

    ``busy``: mailboxes with a fetch in progress here, never given back to make room for another
    worker. ``draining``: the worker is stopping; it keeps only busy mailboxes and takes none.
    The caller commits.
    """
    _heartbeat(session, worker_id, now=now)
    session.execute(delete(Worker).where(Worker.heartbeat_at < now - ttl))  # dead: forget them
    share = 0 if draining else _fair_share(session, now=now, ttl=ttl)
    held = _renew(session, worker_id, now=now, ttl=ttl, share=share, busy=busy)
    if len(held) < share:
        held |= _take(session, worker_id, now=now, ttl=ttl, count=share - len(held))
    return held


def release_worker(session: Session, worker_id: str) -> None:
    """A clean stop: give every lease back and leave the ``workers`` table. The caller commits."""
    _give_back(session, worker_id, Channel.lease_owner == worker_id)
    session.execute(delete(Worker).where(Worker.id == worker_id))


def lease_conflict(runtime: Runtime, channel_id: int, *, worker_id: str | None) -> str | None:
    """Why this process must not fetch the mailbox now, or None.

    A worker (``worker_id`` given) fetches only the mailboxes it holds. Anything else (``postdesk channel
    fetch``, "Fetch now" in the web UI) defers to a worker holding a live lease, unless that worker is
    this very process (``serve`` with its embedded worker).
    """
    with runtime.sessions() as session:
        lease = session.execute(
            select(Channel.lease_owner, Channel.lease_until).where(Channel.id == channel_id)
        ).one_or_none()
        now = database_now(session)
    if lease is None:
        return None  # no such mailbox: the fetch says so itself
    owner, until = lease
    if worker_id is not None:
        return None if owner == worker_id else "this worker no longer holds the mailbox's lease"
    if owner is None or owner == process_worker_id() or until is None or until < now:
        return None
    return (
        f"worker {owner} fetches this mailbox (its lease runs to {until:%H:%M:%S} UTC); "
        "it picks up new mail by itself"
    )


def _heartbeat(session: Session, worker_id: str, *, now: datetime) -> None:
    renewed = session.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(renewed, "rowcount", 0) == 0:  # first round, or forgotten after a long stall
        hostname, _, rest = worker_id.partition(":")
        pid = rest.partition(":")[0]
        session.add(
            Worker(
                id=worker_id,
                hostname=hostname,
                pid=int(pid) if pid.isdigit() else 0,
                started_at=now,
                heartbeat_at=now,
            )
        )
        session.flush()


def _fair_share(session: Session, *, now: datetime, ttl: timedelta) -> int:
    mailboxes = session.scalar(
        select(func.count()).select_from(Channel).where(Channel.status.in_(LEASED_STATUSES))
    )
    live = session.scalar(select(func.count()).select_from(Worker).where(Worker.heartbeat_at >= now - ttl))
    return math.ceil((mailboxes or 0) / max(live or 0, 1))


def _renew(
    session: Session, worker_id: str, *, now: datetime, ttl: timedelta, share: int, busy: Collection[int]
) -> set[int]:
    # No lock on our own rows: a fetch or a token refresh may hold one for a moment, and skipping the
    # row would drop a lease we still hold. The conditional UPDATE below waits for such a lock instead.
    mine = session.scalars(
        select(Channel.id)
        .where(Channel.lease_owner == worker_id, Channel.status.in_(LEASED_STATUSES))
        .order_by(Channel.id)
    ).all()
    idle = [channel_id for channel_id in reversed(mine) if channel_id not in busy]
    surplus = set(idle[: max(len(mine) - share, 0)])
    _give_back(
        session,
        worker_id,
        or_(Channel.id.in_(surplus), Channel.status.not_in(LEASED_STATUSES)),
    )
    keep = [channel_id for channel_id in mine if channel_id not in surplus]
    if not keep:
        return set()
    renewed = session.scalars(
        update(Channel)
        .where(Channel.id.in_(keep), Channel.lease_owner == worker_id)
        .values(lease_until=now + ttl)
        .returning(Channel.id)
        .execution_options(synchronize_session=False)
    )
    return set(renewed)


def _take(session: Session, worker_id: str, *, now: datetime, ttl: timedelta, count: int) -> set[int]:
    candidates = (
        select(Channel.id)
        .where(Channel.status.in_(LEASED_STATUSES), _free(now))
        .order_by(Channel.lease_until.nulls_first(), Channel.id)
        .limit(count)
    )
    if session.get_bind().dialect.name == "postgresql":
        # Rows another worker is taking right now are skipped, not waited for.
        candidates = candidates.with_for_update(skip_locked=True)
    chosen = session.scalars(candidates).all()
    if not chosen:
        return set()
    taken = session.scalars(
        update(Channel)
        .where(Channel.id.in_(chosen), _free(now))  # still free: the row count is what counts
        .values(lease_owner=worker_id, lease_until=now + ttl)
        .returning(Channel.id)
        .execution_options(synchronize_session=False)
    )
    return set(taken)


def _free(now: datetime) -> ColumnElement[bool]:
    return or_(Channel.lease_owner.is_(None), Channel.lease_until.is_(None), Channel.lease_until < now)


def _give_back(session: Session, worker_id: str, which: ColumnElement[bool]) -> None:
    session.execute(
        update(Channel)
        .where(Channel.lease_owner == worker_id, which)
        .values(lease_owner=None, lease_until=None)
        .execution_options(synchronize_session=False)
    )


class ChannelLeases:
    """One worker's leases, renewed from a thread of their own, so a slow job cannot let them lapse.

    ``held()`` trusts a renewal only for the lease time, counted from before it started: a worker cut
    off from the database stops fetching before another worker can take its mailboxes over.
    ``on_change(gained, lost)`` is called after every round that changed what the worker holds.
    """

    def __init__(
        self,
        runtime: Runtime,
        worker_id: str,
        *,
        ttl: timedelta,
        busy: Callable[[], Collection[int]] = frozenset,
        on_change: LeaseChange | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.worker_id = worker_id
        self.ttl = ttl
        # Held while a round decides what to keep; a fetch about to start takes it to check its lease.
        self.lock = threading.Lock()
        self._busy = busy
        self._on_change = on_change
        self._clock = clock
        self._held: frozenset[int] = frozenset()
        self._valid_until = 0.0
        self._reported: frozenset[int] = frozenset()
        self._draining = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="postdesk-leases")

    @property
    def renew_every(self) -> float:
        return min(self.ttl.total_seconds() / 4, MAX_RENEW_SECONDS)

    def held(self) -> frozenset[int]:
        return self._held if self._clock() < self._valid_until else frozenset()

    def holds(self, channel_id: int) -> bool:
        return channel_id in self.held()

    def renew(self) -> frozenset[int]:
        """One round: heartbeat, renew, rebalance, take. Returns what the worker holds now."""
        with self.lock:
            started = self._clock()
            busy = frozenset(self._busy())
            with transaction(self.runtime.sessions) as session:
                held = claim_channels(
                    session,
                    self.worker_id,
                    now=database_now(session),
                    ttl=self.ttl,
                    busy=busy,
                    draining=self._draining,
                )
            self._held, self._valid_until = frozenset(held), started + self.ttl.total_seconds()
        self.report()
        return self._held

    def report(self) -> None:
        """Tell ``on_change`` what was gained or lost since the last report (a lapse counts as lost)."""
        current = self.held()
        gained, lost = current - self._reported, self._reported - current
        self._reported = current
        if gained or lost:
            log.info(
                "worker %s holds %d mailboxes (took %s, gave up %s)",
                self.worker_id,
                len(current),
                sorted(gained) or "none",
                sorted(lost) or "none",
            )
            if self._on_change is not None:
                self._on_change(gained, lost)

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> None:
        """Stopping: from the next round on, keep only mailboxes with a fetch in progress."""
        self._draining = True

    def stop_and_release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.ttl.total_seconds())
        with self.lock:
            self._held = frozenset()
            try:
                with transaction(self.runtime.sessions) as session:
                    release_worker(session, self.worker_id)
            except Exception:
                log.exception(
                    "worker %s could not give its mailboxes back; they move on when its leases run out",
                    self.worker_id,
                )
                return
        log.info("worker %s gave its mailboxes back", self.worker_id)

    def _run(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self.renew()
            except Exception:
                log.exception("renewing the mailbox leases of worker %s failed; retrying", self.worker_id)
                self.report()  # leases that ran out meanwhile are dropped all the same
