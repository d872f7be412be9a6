"""Several workers share the mailboxes through leases: fairly, never two on one mailbox, and a dead
worker's mailboxes move to the others after the lease time. Times are injected; nothing sleeps for a
lease to run out except the end-to-end test with real `postdesk worker` processes."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, select, update

from postdesk.config import Settings
from postdesk.db.models import (
    Article,
    Channel,
    ChannelStatus,
    Customer,
    DeliveryStatus,
    Direction,
    InboundMessage,
    InboundStatus,
    OutboundMessage,
    Worker,
)
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.ingest.fetch import fetch_channel
from postdesk.outbox.sender import _claim
from postdesk.runtime import Runtime, bootstrap
from postdesk.sandbox import CONTOSO_TENANT_ID, SandboxDirectory, SandboxServer
from postdesk.sandbox.submission import SubmissionServer
from postdesk.tickets.service import NewArticle, add_article, create_ticket
from postdesk.worker.leases import ChannelLeases, claim_channels, release_worker
from postdesk.worker.mail import MailScheduler
from tests.conftest import _fresh_postgres_database
from tests.microsoft365 import conftest as m365
from tests.support.cli import environment_for
from tests.support.dovecot import DovecotServer
from tests.support.mailfactory import customer_mail

TTL = timedelta(seconds=60)
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
_emails = itertools.count(1)


def add_channels(runtime: Runtime, count: int, *, status: ChannelStatus = ChannelStatus.OK) -> list[int]:
    with transaction(runtime.sessions) as session:
        rows = [Channel(email=f"desk{next(_emails)}@contoso.example", status=status) for _ in range(count)]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def claim(
    runtime: Runtime,
    worker_id: str,
    at: datetime,
    *,
    busy: frozenset[int] = frozenset(),
    draining: bool = False,
) -> set[int]:
    with transaction(runtime.sessions) as session:
        return claim_channels(session, worker_id, now=at, ttl=TTL, busy=busy, draining=draining)


def release(runtime: Runtime, worker_id: str) -> None:
    with transaction(runtime.sessions) as session:
        release_worker(session, worker_id)


def owners(runtime: Runtime) -> dict[int, str | None]:
    with runtime.sessions() as session:
        return {
            channel_id: owner
            for channel_id, owner in session.execute(select(Channel.id, Channel.lease_owner))
        }


def live_workers(runtime: Runtime) -> set[str]:
    with runtime.sessions() as session:
        return set(session.scalars(select(Worker.id)))


def settle(runtime: Runtime, workers: list[str], at: datetime, rounds: int = 3) -> dict[str, set[int]]:
    held: dict[str, set[int]] = {}
    for _ in range(rounds):
        for worker in workers:
            held[worker] = claim(runtime, worker, at)
    return held


def assert_disjoint(held: dict[str, set[int]]) -> None:
    for (a, mine), (b, theirs) in itertools.combinations(held.items(), 2):
        assert not mine & theirs, f"{a} and {b} both hold {sorted(mine & theirs)}"


# -- sharing (SQLite and PostgreSQL)


def test_a_worker_alone_holds_every_mailbox_there_is_to_fetch(db_runtime: Runtime) -> None:
    fetched = add_channels(db_runtime, 3) + add_channels(db_runtime, 1, status=ChannelStatus.ERROR)
    add_channels(db_runtime, 1, status=ChannelStatus.DISABLED)
    add_channels(db_runtime, 1, status=ChannelStatus.NEEDS_REAUTH)
    assert claim(db_runtime, "alone", T0) == set(fetched)
    assert live_workers(db_runtime) == {"alone"}


def test_three_workers_share_the_mailboxes_fairly_and_never_overlap(db_runtime: Runtime) -> None:
    channel_ids = add_channels(db_runtime, 7)
    assert claim(db_runtime, "a", T0) == set(channel_ids)  # first to start: everything, for now
    held = settle(db_runtime, ["a", "b", "c"], T0 + timedelta(seconds=15))
    assert_disjoint(held)
    assert set().union(*held.values()) == set(channel_ids)
    assert max(len(mine) for mine in held.values()) == 3  # ceil(7 / 3)
    assert {owner for owner in owners(db_runtime).values()} == {"a", "b", "c"}


def test_a_dead_workers_mailboxes_move_to_the_others_after_the_lease_time(db_runtime: Runtime) -> None:
    channel_ids = add_channels(db_runtime, 6)
    held = settle(db_runtime, ["a", "b", "c"], T0)
    assert sorted(len(mine) for mine in held.values()) == [2, 2, 2]
    # "c" dies: it never renews again. Within the lease time its mailboxes stay where they are.
    almost = T0 + TTL - timedelta(seconds=1)
    assert (claim(db_runtime, "a", almost), claim(db_runtime, "b", almost)) == (held["a"], held["b"])
    later = T0 + TTL + timedelta(seconds=1)
    after = {worker: claim(db_runtime, worker, later) for worker in ("a", "b")}
    assert after["a"] | after["b"] == set(channel_ids)
    assert_disjoint(after)
    assert live_workers(db_runtime) == {"a", "b"}  # the dead one is forgotten


def test_a_worker_that_stops_cleanly_hands_its_mailboxes_over_at_once(db_runtime: Runtime) -> None:
    channel_ids = add_channels(db_runtime, 4)
    held = settle(db_runtime, ["a", "b"], T0)
    release(db_runtime, "b")
    assert live_workers(db_runtime) == {"a"}
    assert claim(db_runtime, "a", T0 + timedelta(seconds=1)) == set(channel_ids)
    assert held["b"] <= set(channel_ids)


def test_a_mailbox_being_fetched_is_not_given_away_to_make_room(db_runtime: Runtime) -> None:
    channel_ids = add_channels(db_runtime, 4)
    assert claim(db_runtime, "a", T0) == set(channel_ids)
    assert claim(db_runtime, "b", T0) == set()  # registered; everything is taken
    later = T0 + timedelta(seconds=15)
    assert claim(db_runtime, "a", later, busy=frozenset(channel_ids)) == set(channel_ids)
    assert len(claim(db_runtime, "a", later, busy=frozenset(channel_ids[:1]))) == 2
    assert len(claim(db_runtime, "b", later)) == 2


def test_a_stopping_worker_keeps_only_what_it_is_fetching(db_runtime: Runtime) -> None:
    channel_ids = add_channels(db_runtime, 3)
    claim(db_runtime, "a", T0)
    busy = frozenset(channel_ids[:1])
    assert claim(db_runtime, "a", T0 + timedelta(seconds=15), busy=busy, draining=True) == set(busy)


def test_mailboxes_that_need_sign_in_or_are_disabled_are_given_back(db_runtime: Runtime) -> None:
    first, second = add_channels(db_runtime, 2)
    claim(db_runtime, "a", T0)
    with transaction(db_runtime.sessions) as session:
        session.execute(update(Channel).where(Channel.id == first).values(status=ChannelStatus.NEEDS_REAUTH))
    assert claim(db_runtime, "a", T0 + timedelta(seconds=15)) == {second}
    assert owners(db_runtime)[first] is None


# Steps of a random history: (worker, what it does, seconds that pass before it).
Step = tuple[int, str, int]
steps = st.lists(
    st.tuples(st.integers(0, 2), st.sampled_from(["claim", "claim", "claim", "release"]), st.integers(0, 90)),
    max_size=30,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=steps)
def test_in_any_interleaving_no_mailbox_is_held_by_two_live_workers(
    db_runtime: Runtime, history: list[Step]
) -> None:
    channel_ids = _fresh_leases(db_runtime, mailboxes=5)
    workers = ["a", "b", "c"]
    believed: dict[str, tuple[set[int], datetime]] = {}  # what each worker thinks it holds, until when
    now = T0
    for who, action, seconds in history:
        now += timedelta(seconds=seconds)
        worker = workers[who]
        if action == "claim":
            believed[worker] = (claim(db_runtime, worker, now), now + TTL)
        else:
            release(db_runtime, worker)
            believed[worker] = (set(), now)
        valid = {name: mine for name, (mine, until) in believed.items() if now < until}
        assert_disjoint(valid)
        lease_owners = owners(db_runtime)
        for name, mine in valid.items():
            assert all(lease_owners[channel_id] == name for channel_id in mine)
    # Whoever is left keeps running: every mailbox ends up held, within the fair share.
    now += TTL + timedelta(seconds=1)
    held = settle(db_runtime, workers, now)
    assert_disjoint(held)
    assert set().union(*held.values()) == set(channel_ids)
    assert max(len(mine) for mine in held.values()) == 2  # ceil(5 / 3)


def _fresh_leases(runtime: Runtime, *, mailboxes: int) -> list[int]:
    """The same mailboxes for every example of a property test, with no leases and no workers."""
    with transaction(runtime.sessions) as session:
        session.execute(update(Channel).values(lease_owner=None, lease_until=None))
        session.execute(delete(Worker))
        existing = list(session.scalars(select(Channel.id).order_by(Channel.id)))
    return existing or add_channels(runtime, mailboxes)


# -- real concurrency (PostgreSQL)


@pytest.fixture
def pg_runtime(make_settings: Callable[..., Settings], postgres_url: str) -> Iterator[Runtime]:
    runtime = bootstrap(
        make_settings(database_url=_fresh_postgres_database(postgres_url)), apply_migrations=True
    )
    yield runtime
    runtime.engine.dispose()


def in_parallel(count: int, work: Callable[[int], None]) -> None:
    """Run ``work(0) … work(count - 1)`` in threads that start together; re-raise the first failure."""
    start, failures = threading.Barrier(count), []

    def run(number: int) -> None:
        try:
            start.wait()
            work(number)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if failures:
        raise failures[0]


@pytest.mark.postgres
def test_workers_claiming_at_the_same_moment_never_take_the_same_mailbox(pg_runtime: Runtime) -> None:
    channel_ids = add_channels(pg_runtime, 12)
    workers = [f"host{n}:{1000 + n}:cafe" for n in range(4)]
    for round_number in range(8):
        now = T0 + timedelta(seconds=15 * round_number)
        held: dict[str, set[int]] = {}

        def take_turn(number: int, now: datetime = now, held: dict[str, set[int]] = held) -> None:
            held[workers[number]] = claim(pg_runtime, workers[number], now)

        in_parallel(len(workers), take_turn)
        assert_disjoint(held)
    final = settle(pg_runtime, workers, T0 + timedelta(seconds=15 * 8), rounds=2)
    assert set().union(*final.values()) == set(channel_ids)
    assert sorted(len(mine) for mine in final.values()) == [3, 3, 3, 3]


@pytest.mark.postgres
def test_concurrent_senders_claim_each_outbound_message_once(pg_runtime: Runtime) -> None:
    """The outbox's conditional UPDATE holds with several senders at once on PostgreSQL."""
    due, not_due = _outbox_rows(pg_runtime)
    claimed: list[int] = []
    lock = threading.Lock()

    def sender(_number: int) -> None:
        while taken := _claim(pg_runtime, include_waiting=False, limit=7):
            with lock:
                claimed.extend(row_id for row_id, _channel, _doubt in taken)

    in_parallel(5, sender)
    counts = Counter(claimed)
    assert set(counts) == set(due), f"never claimed: {sorted(set(due) - set(counts))}"
    assert max(counts.values()) == 1, f"claimed twice: {[r for r, n in counts.items() if n > 1]}"
    assert not set(counts) & set(not_due)


def _outbox_rows(runtime: Runtime) -> tuple[list[int], list[int]]:
    """40 queued replies due now, 5 abandoned by a dead sender (due), 5 still being sent (not due)."""
    past, future = utcnow() - timedelta(minutes=1), utcnow() + timedelta(minutes=10)
    with transaction(runtime.sessions) as session:
        ticket = create_ticket(
            session,
            title="Outbox",
            customer=Customer(email="jana.novak@example.org"),
            first_article=NewArticle(direction=Direction.OUTBOUND, body_text="0"),
        )
        articles = [ticket.articles[0]] + [
            add_article(session, ticket, NewArticle(direction=Direction.OUTBOUND, body_text=str(n)))
            for n in range(1, 50)
        ]
        rows = [
            OutboundMessage(
                article_id=article.id,
                message_id=f"<reply-{n}@contoso.example>",
                mail_from="desk@contoso.example",
                recipients="jana.novak@example.org",
                sha256="0" * 64,
                size=1,
                status=DeliveryStatus.QUEUED if n < 40 else DeliveryStatus.SENDING,
                next_attempt_at=past,
                lease_until=None if n < 40 else past if n < 45 else future,
            )
            for n, article in enumerate(articles)
        ]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows[:45]], [row.id for row in rows[45:]]


# -- one worker's leases over time


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_leases_not_renewed_in_time_are_dropped_even_without_the_database(runtime: Runtime) -> None:
    channel_ids = add_channels(runtime, 2)
    clock, changes = FakeClock(), []
    leases = ChannelLeases(
        runtime, "a", ttl=TTL, on_change=lambda gained, lost: changes.append((gained, lost)), clock=clock
    )
    assert leases.renew() == frozenset(channel_ids)
    clock.now += TTL.total_seconds() - 1
    assert leases.held() == frozenset(channel_ids)
    clock.now += 1  # the lease time has passed since the renewal started: another worker may take over
    assert leases.held() == frozenset()
    leases.report()
    assert changes == [(frozenset(channel_ids), frozenset()), (frozenset(), frozenset(channel_ids))]


def test_a_mailbox_another_worker_took_over_is_reported_lost(runtime: Runtime) -> None:
    kept, taken = add_channels(runtime, 2)
    changes: list[tuple[frozenset[int], frozenset[int]]] = []
    leases = ChannelLeases(runtime, "a", ttl=TTL, on_change=lambda g, lost: changes.append((g, lost)))
    leases.renew()
    _take_over(runtime, taken, "b")
    assert leases.renew() == {kept}
    assert changes[-1] == (frozenset(), frozenset({taken}))


def _take_over(runtime: Runtime, channel_id: int, worker_id: str) -> None:
    """What another worker does once this one's lease ran out (as if this one had been frozen)."""
    with transaction(runtime.sessions) as session:
        session.execute(
            update(Channel)
            .where(Channel.id == channel_id)
            .values(lease_owner=worker_id, lease_until=utcnow() + TTL)
        )


def test_fetch_now_defers_to_the_worker_holding_the_mailbox(runtime: Runtime) -> None:
    [channel_id] = add_channels(runtime, 1)
    _take_over(runtime, channel_id, "other-host:4242:beef")
    result = fetch_channel(runtime, channel_id)
    assert result.error is None
    assert result.skipped is not None and "worker other-host:4242:beef fetches this mailbox" in result.skipped
    # A lease that ran out binds nobody: the fetch goes ahead (and here finds no app to sign in with).
    with transaction(runtime.sessions) as session:
        session.execute(update(Channel).values(lease_until=utcnow() - timedelta(seconds=1)))
    result = fetch_channel(runtime, channel_id)
    assert result.skipped is None and result.error is not None and "no Microsoft 365 app" in result.error


def test_a_worker_fetches_only_under_its_own_lease(runtime: Runtime) -> None:
    [channel_id] = add_channels(runtime, 1)
    _take_over(runtime, channel_id, "b")
    assert fetch_channel(runtime, channel_id, worker_id="a").skipped == (
        "this worker no longer holds the mailbox's lease"
    )


# -- with real mailboxes: the Microsoft 365 desk of tests/microsoft365, on PostgreSQL

entra_app = m365.entra_app
m365_admin = m365.m365_admin
m365_runtime = m365.m365_runtime
desk = m365.desk
browser = m365.browser
signin = m365.signin
trusted_cas = m365.trusted_cas
LEASE_SECONDS = 3
_mailbox_numbers = itertools.count(1)


@pytest.fixture
def m365_settings(
    tmp_path: Path,
    sandbox: SandboxServer,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
    trusted_cas: Path,
    postgres_url: str,
) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        secret_key=m365.SECRET_KEY,
        base_url=m365.BASE_URL,
        microsoft_login_url=sandbox.base_url,
        ca_bundle=trusted_cas,
        microsoft_imap=f"127.0.0.1:{dovecot.port}",
        microsoft_smtp=f"127.0.0.1:{smtp_submission.port}",
        database_url=_fresh_postgres_database(postgres_url),
        worker_lease_seconds=LEASE_SECONDS,
    )


def connect_mailboxes(signin: m365.SignIn, directory: SandboxDirectory, count: int) -> list[str]:
    upns = []
    for _ in range(count):
        number = next(_mailbox_numbers)
        upn = directory.add_user(
            upn=f"shared{number}-{os.getpid()}@contoso.onmicrosoft.com",
            display_name=f"Shared Desk {number}",
            tenant_id=CONTOSO_TENANT_ID,
        ).upn
        assert signin.connect(upn).status_code == 303
        upns.append(upn)
    return upns


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting {timeout:.0f} s for {what}"
        time.sleep(0.01)


@pytest.mark.postgres
def test_a_worker_that_lost_a_mailbox_stops_watching_and_fetching_it(
    signin: m365.SignIn, m365_runtime: Runtime, directory: SandboxDirectory
) -> None:
    connect_mailboxes(signin, directory, 2)
    kept, lost = (channel.id for channel in m365.channels(m365_runtime))
    scheduler = MailScheduler(worker_id="host-a:1:aaaa")
    try:
        scheduler(m365_runtime)
        watchers = {cid: scheduler.watcher(cid) for cid in (kept, lost)}
        assert all(w is not None and w.idling.wait(10) for w in watchers.values())
        _take_over(m365_runtime, lost, "host-b:2:bbbb")
        # The next renewal (every LEASE_SECONDS / 4) notices and stops the IDLE session at once.
        wait_until(lambda: not scheduler.holds(lost), timeout=5, what="the lost lease to be noticed")
        old = watchers[lost]
        assert old is not None
        old.join(timeout=5)
        assert not old.alive and scheduler.watcher(lost) is None
        scheduler.request_fetch(lost)
        scheduler(m365_runtime)  # a scheduler round neither fetches nor watches it again
        assert lost not in scheduler._busy() and scheduler.watcher(lost) is None
        assert fetch_channel(m365_runtime, lost, worker_id=scheduler.worker_id).skipped is not None
        kept_watcher = scheduler.watcher(kept)
        assert scheduler.holds(kept) and kept_watcher is not None and kept_watcher.alive
    finally:
        scheduler.shutdown()
    assert owners(m365_runtime) == {kept: None, lost: "host-b:2:bbbb"}  # given back on the way out
    assert live_workers(m365_runtime) == set()


WORKERS, MAILBOXES = 3, 6


@pytest.mark.postgres
def test_three_worker_processes_turn_mail_into_tickets_once_even_when_one_is_killed(
    signin: m365.SignIn,
    m365_runtime: Runtime,
    directory: SandboxDirectory,
    dovecot: DovecotServer,
    tmp_path: Path,
) -> None:
    upns = connect_mailboxes(signin, directory, MAILBOXES)
    email_to_id = {channel.email: channel.id for channel in m365.channels(m365_runtime)}
    with transaction(m365_runtime.sessions) as session:
        # Poll often: what is tested here is who fetches, not how soon IDLE tells of new mail.
        session.execute(update(Channel).values(fetch_interval_seconds=2))
    expected: list[str] = []

    def deliver(wave: str, to: list[str], count: int) -> None:
        for upn in to:
            ids = [f"<{wave}-{n}.{upn}>" for n in range(count)]
            dovecot.deliver_many(
                upn,
                [customer_mail(to=upn, subject=f"{wave} {n}", message_id=mid) for n, mid in enumerate(ids)],
            )
            expected.extend(ids)

    deliver("before", upns, 5)
    processes = [_start_worker(m365_runtime, tmp_path / f"worker{n}.log") for n in range(WORKERS)]
    try:
        wait_until(lambda: _spread(m365_runtime) == [2, 2, 2], timeout=60, what="2 mailboxes per worker")
        wait_until(lambda: _articles(m365_runtime) == Counter(expected), timeout=60, what="the first mail")
        victim = processes[0]
        victim_channels = {cid for cid, owner in owners(m365_runtime).items() if _pid(owner) == victim.pid}
        rows_before, made_before = _rows(m365_runtime, victim_channels), _made(m365_runtime, victim_channels)
        deliver("during", upns, 100)
        wait_until(lambda: _rows(m365_runtime, victim_channels) > rows_before, timeout=30, what="work")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        stored = _rows(m365_runtime, victim_channels) - rows_before
        print(
            f"killed after storing {stored} of 200 messages and making "
            f"{_made(m365_runtime, victim_channels) - made_before} of them tickets"
        )
        victim_upns = [upn for upn in upns if email_to_id[upn] in victim_channels]
        deliver("after", victim_upns, 5)
        wait_until(lambda: _articles(m365_runtime) == Counter(expected), timeout=90, what="every message")
        survivors = {p.pid for p in processes[1:]}
        assert {_pid(owner) for owner in owners(m365_runtime).values()} <= survivors
        wait_until(lambda: len(live_workers(m365_runtime)) == 2, timeout=30, what="the dead worker forgotten")
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)
        for number in range(WORKERS):
            print(f"--- worker {number}\n" + (tmp_path / f"worker{number}.log").read_text()[-3000:])
    assert [p.returncode for p in processes[1:]] == [0, 0]
    with m365_runtime.sessions() as session:
        leftovers = session.scalar(
            select(func.count())
            .select_from(InboundMessage)
            .where(InboundMessage.status == InboundStatus.STORED)
        )
    assert leftovers == 0
    # Stopped cleanly, the survivors gave everything back and left the workers table.
    assert set(owners(m365_runtime).values()) == {None}
    assert live_workers(m365_runtime) == set()


def _start_worker(runtime: Runtime, log: Path) -> subprocess.Popen[bytes]:
    env = environment_for(runtime.settings)
    env["POSTDESK_DATABASE_URL"] = runtime.settings.resolved_database_url
    env["POSTDESK_WORKER_LEASE_SECONDS"] = str(LEASE_SECONDS)
    env["POSTDESK_LOG_LEVEL"] = "INFO"
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "postdesk", "worker"], env=env, stdout=output, stderr=subprocess.STDOUT
        )


def _pid(worker_id: str | None) -> int | None:
    return int(worker_id.split(":")[1]) if worker_id else None


def _spread(runtime: Runtime) -> list[int]:
    counts = Counter(owners(runtime).values())
    return sorted(n for owner, n in counts.items() if owner is not None)


def _rows(runtime: Runtime, channel_ids: set[int]) -> int:
    with runtime.sessions() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(InboundMessage)
                .where(InboundMessage.channel_id.in_(channel_ids))
            )
            or 0
        )


def _made(runtime: Runtime, channel_ids: set[int]) -> int:
    with runtime.sessions() as session:
        return (
            session.scalar(
                select(func.count()).select_from(Article).where(Article.channel_id.in_(channel_ids))
            )
            or 0
        )


def _articles(runtime: Runtime) -> Counter[str]:
    with runtime.sessions() as session:
        return Counter(
            mid
            for mid in session.scalars(select(Article.message_id).where(Article.channel_id.is_not(None)))
            if mid
        )
