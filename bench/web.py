"""Web pages under load: the ticket list and the ticket view on a 100,000-ticket desk, over HTTP.

The real app runs with uvicorn on a port; an admin signs in over HTTP like a browser; a load generator
in a process of its own (so that it does not compete with the server for the interpreter lock) runs
``CLIENTS`` concurrent clients of ``REQUESTS`` requests each, a fixed random mix of: the list's first
page, a filtered list (open tickets of one group), a search by ticket number, and a random ticket's page.
Each request's latency is taken at the client, from sending it to having the whole response. The
baseline is the same load, in the same run, against a 1,000-ticket desk filled the same way
(``bench.ticket_list``), on SQLite and on PostgreSQL when it is installed.
Target: p95 under 100 ms for every page type at 100,000 tickets.
"""

from __future__ import annotations

import multiprocessing
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from tests.support.live import serve_in_thread

from bench.latency import percentile
from bench.ticket_list import BIG, SMALL, _databases, _desk
from postdesk.db.models import Role, User
from postdesk.db.session import transaction
from postdesk.runtime import Runtime, settle_heap
from postdesk.security.passwords import hash_password
from postdesk.web.app import create_app

CLIENTS = 4
REQUESTS = 200
WARM_UP = 5  # requests of each kind before measuring: templates compiled, caches and pools filled
TARGET_MS = 100.0
ADMIN_EMAIL = "agent1@contoso.com"
ADMIN_PASSWORD = "bench-password-123"
FIRST_NUMBER = 10_001  # bench.ticket_list numbers tickets from here
PAGES = ("ticket list, page 1", "filtered list", "search by #number", "ticket view")
Sample = tuple[str, float, int]  # page type, milliseconds, HTTP status


@dataclass(frozen=True)
class Row:
    database: str
    page: str
    big_p50: float
    big_p95: float
    small_p50: float
    small_p95: float

    @property
    def passed(self) -> bool:
        return self.big_p95 < TARGET_MS


def request_path(page: str, chance: random.Random, tickets: int) -> str:
    number = chance.randint(FIRST_NUMBER, FIRST_NUMBER + tickets - 1)
    if page == "ticket list, page 1":
        return "/tickets"
    if page == "filtered list":
        return f"/tickets?state=open&group={chance.randint(1, 8)}"
    if page == "search by #number":
        return f"/tickets?q=%23{number}"
    return f"/tickets/{number}"


def _client(base_url: str, cookies: dict[str, str], tickets: int, seed: int, samples: list[Sample]) -> None:
    chance = random.Random(seed)  # noqa: S311 - a load mix, not secrets
    with httpx.Client(base_url=base_url, cookies=cookies, timeout=30, trust_env=False) as client:
        for _ in range(REQUESTS):
            page = chance.choice(PAGES)
            path = request_path(page, chance, tickets)
            started = time.perf_counter()
            response = client.get(path)
            samples.append((page, (time.perf_counter() - started) * 1000, response.status_code))


def generate_load(base_url: str, cookies: dict[str, str], tickets: int) -> list[Sample]:
    """``CLIENTS`` clients at once, each in a thread of this (load generator) process."""
    samples: list[Sample] = []
    threads = [
        threading.Thread(target=_client, args=(base_url, cookies, tickets, seed, samples))
        for seed in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples


def _make_admin(runtime: Runtime) -> None:
    """The filled desk's first agent becomes an admin who can sign in (an admin sees every ticket)."""
    with transaction(runtime.sessions) as session:
        user = session.get(User, 1)
        assert user is not None and user.email == ADMIN_EMAIL
        user.role = Role.ADMIN
        user.password_hash = hash_password(ADMIN_PASSWORD)


def _sign_in(base_url: str) -> dict[str, str]:
    with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client:
        page = client.get("/login")
        token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
        response = client.post(
            "/login", data={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "csrf_token": token}
        )
        if response.status_code != 303:
            raise SystemExit(f"bench run invalid: sign-in answered {response.status_code}")
        chance = random.Random(0)  # noqa: S311
        for page_type in PAGES:
            for _ in range(WARM_UP):
                client.get(request_path(page_type, chance, SMALL)).raise_for_status()
        return dict(client.cookies.items())


def _measure(runtime: Runtime, tickets: int, load: ProcessPoolExecutor) -> dict[str, list[float]]:
    _make_admin(runtime)
    app = create_app(runtime)
    settle_heap()  # as `postdesk serve` does once the app is built
    with serve_in_thread(app) as base_url:
        cookies = _sign_in(base_url)
        samples = load.submit(generate_load, base_url, cookies, tickets).result()
    failed = [sample for sample in samples if sample[2] != 200]
    if failed or len(samples) != CLIENTS * REQUESTS:
        raise SystemExit(f"bench run invalid: {len(failed)} of {len(samples)} requests failed: {failed[:3]}")
    by_page: dict[str, list[float]] = defaultdict(list)
    for page, milliseconds, _status in samples:
        by_page[page].append(milliseconds)
    return by_page


def run() -> list[Row]:
    rows: list[Row] = []
    # A fresh interpreter (spawn), not a fork of this one with its server and database threads.
    with (
        tempfile.TemporaryDirectory(prefix="postdesk-bench-") as workdir,
        ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as load,
    ):
        for database, url_for in _databases(Path(workdir)):
            measured = {}
            for size in (SMALL, BIG):
                started = time.perf_counter()
                with _desk(url_for(f"web_{size}"), Path(workdir) / f"web-{database}-{size}", size) as runtime:
                    print(
                        f"{database}: {size:,} tickets filled in {time.perf_counter() - started:.1f} s",
                        file=sys.stderr,
                    )
                    measured[size] = _measure(runtime, size, load)
            rows += [
                Row(
                    database,
                    page,
                    statistics.median(measured[BIG][page]),
                    percentile(measured[BIG][page], 0.95),
                    statistics.median(measured[SMALL][page]),
                    percentile(measured[SMALL][page], 0.95),
                )
                for page in PAGES
            ]
    return rows


def print_table(rows: list[Row]) -> bool:
    print(
        f"\nWeb pages over HTTP: {CLIENTS} concurrent clients × {REQUESTS} requests, a random mix; "
        f"{BIG:,} tickets against {SMALL:,} (milliseconds at the client)"
    )
    print(
        f"{'database':<11} {'page':<22} {'p50':>8} {'p95':>8} {'p50 ' + f'{SMALL:,}':>10} "
        f"{'p95 ' + f'{SMALL:,}':>10} {'target':>10}  result"
    )
    target = f"p95 < {TARGET_MS:.0f}"
    for row in rows:
        print(
            f"{row.database:<11} {row.page:<22} {row.big_p50:>8.1f} {row.big_p95:>8.1f} "
            f"{row.small_p50:>10.1f} {row.small_p95:>10.1f} {target:>10}  {'ok' if row.passed else 'FAIL'}"
        )
    return all(row.passed for row in rows)


if __name__ == "__main__":
    sys.exit(0 if print_table(run()) else 1)
