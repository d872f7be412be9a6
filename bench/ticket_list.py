"""Ticket list speed: the agent's list queries on a 100,000-ticket desk next to a 1,000-ticket desk.

Both desks are filled the same way (customers, groups, agents, channels, one to three articles per
ticket) and queried the same way, in the same run, on SQLite and on PostgreSQL when it is installed.
The small desk is the baseline: with the right indexes a page of the big desk costs a small multiple
of a page of the small one, although it holds a hundred times more tickets. Target: at most 10x, and
never above 250 ms for a page (the agent is waiting for it). A substring search ("refund" anywhere in
a subject) has no index to use and reads every row, so it is held to an absolute 500 ms instead.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert
from sqlalchemy.orm import Session

from postdesk.config import Settings
from postdesk.db.models import (
    Article,
    Channel,
    Customer,
    Direction,
    Group,
    Ticket,
    TicketCounter,
    TicketState,
    User,
)
from postdesk.runtime import Runtime, bootstrap
from postdesk.tickets.service import TicketFilter, list_tickets

BIG = 100_000
SMALL = 1_000
MAX_RATIO = 10.0
MAX_MILLISECONDS = 250.0
MAX_SCAN_MILLISECONDS = 500.0
SCANS = frozenset({"search a customer address", "search a subject word"})
REPEAT = 7
STATES = list(TicketState)
TOPICS = ["invoice", "printer", "login", "VPN", "refund"]


@dataclass(frozen=True)
class Row:
    database: str
    query: str
    big_ms: float
    small_ms: float

    @property
    def ratio(self) -> float:
        return self.big_ms / self.small_ms if self.small_ms else 0.0

    @property
    def target(self) -> str:
        return (
            f"≤{MAX_SCAN_MILLISECONDS:.0f} ms"
            if self.query in SCANS
            else f"≤{MAX_RATIO:.0f}x, ≤{MAX_MILLISECONDS:.0f} ms"
        )

    @property
    def passed(self) -> bool:
        if self.query in SCANS:
            return self.big_ms <= MAX_SCAN_MILLISECONDS
        return self.ratio <= MAX_RATIO and self.big_ms <= MAX_MILLISECONDS


def _fill(runtime: Runtime, tickets: int, *, seed: int = 7) -> None:
    """Bulk-insert a desk of ``tickets`` tickets (Core INSERTs: the ORM would take minutes for 100,000)."""
    chance = random.Random(seed)  # noqa: S311 - sample data, not secrets
    customers = max(tickets // 5, 10)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    with runtime.sessions() as session, session.begin():
        session.execute(
            insert(Group), [{"id": n, "name": f"Group {n}", "created_at": start} for n in range(1, 9)]
        )
        session.execute(
            insert(User),
            [
                {"id": n, "email": f"agent{n}@contoso.com", "display_name": f"Agent {n}", "created_at": start}
                for n in range(1, 31)
            ],
        )
        session.execute(
            insert(Channel),
            [{"id": n, "email": f"desk{n}@contoso.com", "created_at": start} for n in range(1, 6)],
        )
        session.execute(
            insert(Customer),
            [
                {"id": n, "email": f"customer{n}@example{n % 97}.org", "created_at": start}
                for n in range(1, customers + 1)
            ],
        )
        _insert_tickets(session, chance, tickets, customers, start)
        session.execute(insert(TicketCounter), [{"id": 1, "last_number": 10_000 + tickets}])
    # Statistics as a running desk has them (PostgreSQL's autovacuum, Postdesk's nightly PRAGMA optimize).
    with runtime.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("ANALYZE")


def _insert_tickets(
    session: Session, chance: random.Random, tickets: int, customers: int, start: datetime
) -> None:
    batch: list[dict[str, object]] = []
    articles: list[dict[str, object]] = []
    for n in range(1, tickets + 1):
        created = start + timedelta(minutes=n * 5)
        updated = created + timedelta(minutes=chance.randint(0, 60 * 24 * 30))
        batch.append(
            {
                "id": n,
                "number": 10_000 + n,
                "title": f"Question {n}: {chance.choice(TOPICS)} problem",
                "state": chance.choice(STATES).value,
                "group_id": chance.randint(1, 8),
                "customer_id": chance.randint(1, customers),
                "owner_id": chance.choice([None, *range(1, 31)]),
                "channel_id": chance.randint(1, 5),
                "created_at": created,
                "updated_at": updated,
            }
        )
        for _ in range(chance.randint(1, 3)):
            articles.append(
                {
                    "ticket_id": n,
                    "direction": Direction.INBOUND.value,
                    "body_text": "Hello, something is wrong.",
                    "created_at": created,
                }
            )
        if len(batch) == 5_000:
            _flush(session, batch, articles)
    _flush(session, batch, articles)


def _flush(session: Session, tickets: list[dict[str, object]], articles: list[dict[str, object]]) -> None:
    if tickets:
        session.execute(insert(Ticket), tickets)
    if articles:
        session.execute(insert(Article), articles)
    tickets.clear()
    articles.clear()


QUERIES: dict[str, TicketFilter] = {
    "default list (newest activity first)": TicketFilter(),
    "open and new tickets": TicketFilter(states=(TicketState.NEW, TicketState.OPEN)),
    "one group, open": TicketFilter(states=(TicketState.OPEN,), group_id=3),
    "one owner": TicketFilter(owner_id=7),
    "one mailbox": TicketFilter(channel_id=2),
    "by number, ascending": TicketFilter(sort="number", descending=False),
    "page 20": TicketFilter(page=20),
    "search a ticket number": TicketFilter(search="#10500"),
    "search a customer address": TicketFilter(search="customer123@"),
    "search a subject word": TicketFilter(search="refund"),
}


def _time(action: Callable[[], object]) -> float:
    samples = []
    for _ in range(REPEAT):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def _measure(runtime: Runtime) -> dict[str, float]:
    results = {}
    for name, spec in QUERIES.items():

        def query(spec: TicketFilter = spec, name: str = name) -> None:
            with runtime.sessions() as session:
                page = list_tickets(session, spec)
                assert page.total > 0 or spec.search, name

        results[name] = _time(query)
    return results


@contextmanager
def _desk(database_url: str | None, directory: Path, tickets: int) -> Iterator[Runtime]:
    settings = Settings(
        data_dir=directory, secret_key="bench-secret-key-0123456789-abcdefgh", database_url=database_url
    )
    runtime = bootstrap(settings, apply_migrations=True)
    _fill(runtime, tickets)
    try:
        yield runtime
    finally:
        runtime.engine.dispose()


def _databases(workdir: Path) -> Iterator[tuple[str, Callable[[str], str | None]]]:
    yield "sqlite", lambda name: None
    try:
        from tests.support.postgres import postgres_cluster
    except ImportError:  # pragma: no cover - the bench runs from the repository
        return
    try:
        with postgres_cluster() as url:
            from sqlalchemy import create_engine, text

            admin = create_engine(url, isolation_level="AUTOCOMMIT")

            def fresh(name: str) -> str:
                with admin.connect() as connection:
                    connection.execute(text(f'CREATE DATABASE "{name}"'))
                return url.rsplit("/", 1)[0] + f"/{name}"

            yield "postgresql", fresh
            admin.dispose()
    except (OSError, RuntimeError) as exc:
        print(f"PostgreSQL not measured: {exc}", file=sys.stderr)


def run() -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="postdesk-bench-") as workdir:
        for database, url_for in _databases(Path(workdir)):
            measured = {}
            for size in (SMALL, BIG):
                directory = Path(workdir) / f"{database}-{size}"
                started = time.perf_counter()
                with _desk(url_for(f"bench_{size}"), directory, size) as runtime:
                    print(
                        f"{database}: {size:,} tickets filled in {time.perf_counter() - started:.1f} s",
                        file=sys.stderr,
                    )
                    measured[size] = _measure(runtime)
            rows += [Row(database, name, measured[BIG][name], measured[SMALL][name]) for name in QUERIES]
    return rows


def print_table(rows: list[Row]) -> bool:
    print(
        f"\nTicket list: {BIG:,} tickets against {SMALL:,} (median of {REPEAT}, milliseconds per page of 50)"
    )
    print(f"{'database':<11} {'query':<40} {BIG:>9,} {SMALL:>9,} {'ratio':>7} {'target':>16}  result")
    for row in rows:
        print(
            f"{row.database:<11} {row.query:<40} {row.big_ms:>9.1f} {row.small_ms:>9.1f} {row.ratio:>7.1f} "
            f"{row.target:>16}  {'ok' if row.passed else 'FAIL'}"
        )
    return all(row.passed for row in rows)


if __name__ == "__main__":
    sys.exit(0 if print_table(run()) else 1)
