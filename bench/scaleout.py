"""Scale-out: 3 worker processes on PostgreSQL share 200 mailboxes and 20,000 messages; one is killed.

200 mailboxes are connected through the sign-in flow, then three real ``postdesk worker`` processes
start on a private PostgreSQL cluster (leases of 15 s). Half of the mail (50 messages per mailbox) is
delivered, and when a quarter of all the mail has become tickets, the worker holding the most mailboxes
is killed with SIGKILL; the other half of the mail is delivered meanwhile. The run ends when every
message is an article. Then every message is accounted for: by Message-ID, each delivered message must
be exactly one article and one inbound record, nothing missing and nothing twice, and the survivors
must hold every mailbox. The baseline column is what must hold; throughput is reported for the record.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

from sqlalchemy import func, select, update
from tests.support.cli import environment_for
from tests.support.mailfactory import customer_mail
from tests.support.postgres import postgres_cluster

from bench.desk import BenchDesk, bench_desk
from postdesk.db.models import Article, Channel, InboundMessage
from postdesk.db.session import transaction

WORKERS, MAILBOXES, MESSAGES = 3, 200, 20_000
LEASE_SECONDS = 15
FINISH_SECONDS = 900.0


@dataclass(frozen=True)
class Row:
    name: str
    value: str
    baseline: str
    passed: bool | None


def _start_worker(desk: BenchDesk, number: int) -> subprocess.Popen[bytes]:
    env = environment_for(desk.settings)
    env["POSTDESK_WORKER_LEASE_SECONDS"] = str(LEASE_SECONDS)
    return subprocess.Popen(
        [sys.executable, "-m", "postdesk", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(desk.work / f"worker{number}.log").open("wb"),
    )


def _count(desk: BenchDesk, model: type[Article] | type[InboundMessage]) -> int:
    with desk.runtime.sessions() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def _owners(desk: BenchDesk) -> Counter[str | None]:
    with desk.runtime.sessions() as session:
        return Counter(session.scalars(select(Channel.lease_owner)))


def _deliver(desk: BenchDesk, upns: list[str], wave: str, per_mailbox: int) -> list[str]:
    ids = []
    for upn in upns:
        wave_ids = [f"<{wave}-{n}.{upn}>" for n in range(per_mailbox)]
        desk.dovecot.deliver_many(
            upn,
            [
                customer_mail(to=upn, subject=f"Order {wave} {n}", message_id=mid)
                for n, mid in enumerate(wave_ids)
            ],
        )
        ids.extend(wave_ids)
    return ids


def _wait(condition: object, timeout: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench run invalid: gave up waiting for {what}")
        time.sleep(0.5)


def run() -> list[Row]:
    per_mailbox = MESSAGES // MAILBOXES // 2
    with postgres_cluster() as url, bench_desk(database_url=url) as desk:
        upns = desk.add_mailboxes(MAILBOXES, prefix="scale")
        desk.connect(upns)
        with transaction(desk.runtime.sessions) as session:
            session.execute(update(Channel).values(fetch_interval_seconds=10))
        workers = [_start_worker(desk, n) for n in range(WORKERS)]
        try:
            _wait(lambda: _owners(desk)[None] == 0, 120, "every mailbox to be leased")
            started = time.monotonic()
            expected = _deliver(desk, upns, "first", per_mailbox)
            _wait(lambda: _count(desk, Article) >= MESSAGES // 4, FINISH_SECONDS, "a quarter of the mail")
            owners = _owners(desk)
            victim = max(workers, key=lambda w: sum(n for o, n in owners.items() if o and f":{w.pid}:" in o))
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed_at = _count(desk, Article)
            expected += _deliver(desk, upns, "second", per_mailbox)
            _wait(lambda: _count(desk, Article) >= MESSAGES, FINISH_SECONDS, "every message")
            seconds = time.monotonic() - started
            time.sleep(LEASE_SECONDS)  # anything fetched twice would show up now
            survivors = {w.pid for w in workers if w is not victim}
            owners = _owners(desk)
            held_by_survivors = sum(n for o, n in owners.items() if o and int(o.split(":")[1]) in survivors)
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)
            for worker in workers:
                worker.wait(120)
        with desk.runtime.sessions() as session:
            articles: Counter[str] = Counter(
                mid
                for mid in session.scalars(select(Article.message_id).where(Article.channel_id.is_not(None)))
                if mid
            )
            inbound = session.scalar(select(func.count()).select_from(InboundMessage)) or 0
    wanted = Counter(expected)
    missing = len(wanted - articles)
    twice = sum(n - 1 for n in articles.values() if n > 1) + len(articles - wanted)
    return [
        Row("messages delivered", f"{len(expected):,}", f"{MESSAGES:,}", len(expected) == MESSAGES),
        Row("messages missing", str(missing), "0", missing == 0),
        Row("messages made into tickets twice", str(twice), "0", twice == 0),
        Row("inbound records", f"{inbound:,}", f"{MESSAGES:,}", inbound == MESSAGES),
        Row("articles when a worker was killed", f"{killed_at:,}", "", None),
        Row(
            "mailboxes held by the survivors",
            str(held_by_survivors),
            str(MAILBOXES),
            held_by_survivors == MAILBOXES,
        ),
        Row("throughput, 3 workers (msg/s)", f"{MESSAGES / seconds:.0f}", "", None),
    ]


def print_table(rows: list[Row]) -> bool:
    print(
        f"\nScale-out: {WORKERS} workers on PostgreSQL, {MAILBOXES} mailboxes, {MESSAGES:,} messages, "
        "one worker killed"
    )
    print(f"{'measurement':<40} {'Postdesk':>10} {'must be':>10}  result")
    for row in rows:
        result = "" if row.passed is None else ("ok" if row.passed else "FAIL")
        print(f"{row.name:<40} {row.value:>10} {row.baseline:>10}  {result}")
    return all(row.passed is not False for row in rows)


if __name__ == "__main__":
    sys.exit(0 if print_table(run()) else 1)
