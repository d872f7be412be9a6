"""Ingest throughput: messages from a real Dovecot into tickets, next to a raw imaplib fetch-and-parse.

Both read the same 10,000 messages from the same mailbox over IMAPS with XOAUTH2 in the same run: the
baseline only downloads and parses them (stdlib imaplib + email), Postdesk also spools them durably,
records them, runs the pipeline and writes tickets, articles and attachments. It runs once on SQLite
and once on a private PostgreSQL cluster (started with fsync off, as the test clusters are: the
figure is Postdesk's work, not the disk's). Target: Postdesk reaches at least half of the baseline's
messages per second.
"""

from __future__ import annotations

import email
import email.policy
import sys
import time

from sqlalchemy import func, select
from tests.support.dovecot import DovecotServer, access_token_for, imap_login
from tests.support.mailfactory import customer_mail
from tests.support.postgres import postgres_cluster

from bench import ratio
from bench.desk import bench_desk
from postdesk.db.models import Article
from postdesk.ingest.fetch import fetch_channel
from postdesk.runtime import settle_heap

MESSAGES = 10_000
BODY = (
    "Hello support team,\n\nour invoice shows the wrong VAT number and the delivery address is out of date. "
    "Could you correct both and send a new invoice?\n\nKind regards,\nJana\n"
) * 8


def _baseline(dovecot: DovecotServer, token: str, upn: str) -> tuple[int, float]:
    _collect_setup_garbage()
    started = time.perf_counter()
    connection = imap_login(dovecot.host, dovecot.port, dovecot.ca_path, token, upn)
    connection.select("INBOX", readonly=True)
    _, data = connection.uid("SEARCH", "ALL")
    uids = data[0].split()
    parsed = 0
    for start in range(0, len(uids), 50):
        batch = b",".join(uids[start : start + 50]).decode("ascii")
        _, answer = connection.uid("FETCH", batch, "(BODY.PEEK[])")
        for item in answer:
            if isinstance(item, tuple):
                message = email.message_from_bytes(item[1], policy=email.policy.default)
                body = message.get_body(preferencelist=("plain", "html"))
                if body is not None:
                    body.get_content()
                parsed += 1
    connection.logout()
    return parsed, time.perf_counter() - started


def _collect_setup_garbage() -> None:
    """Start each timed run with the setup's garbage collected and what survives set aside, as
    ``postdesk worker`` does once it has started (``settle_heap``), for both sides alike.

    Building and delivering the test mail leaves the collector a full collection due, and otherwise
    whichever timed run allocates enough to trigger it pays for the setup (a tenth of a second or more,
    the same order as the difference being measured).
    """
    settle_heap()


def run(messages: int = MESSAGES) -> list[ratio.Row]:
    with postgres_cluster() as url:
        return [_run(messages, None, "SQLite"), _run(messages, url, "PostgreSQL")]


def _run(messages: int, database_url: str | None, database: str) -> ratio.Row:
    with bench_desk(database_url=database_url) as desk:
        [upn] = desk.add_mailboxes(1, prefix="ingest")
        channel_id = desk.connect([upn])[upn]
        fetch_channel(desk.runtime, channel_id)  # where the folder stands; everything after is new mail
        desk.dovecot.deliver_many(
            upn,
            (
                customer_mail(
                    to=upn,
                    subject=f"Invoice question {n}",
                    body=BODY,
                    sender=f"Customer {n % 97} <customer{n % 97}@example.org>",
                )
                for n in range(messages)
            ),
        )
        app = desk.directory.register_app(display_name="baseline")
        token = access_token_for(desk.directory, app, upn)
        parsed, baseline_seconds = _baseline(desk.dovecot, token, upn)
        _collect_setup_garbage()
        started = time.perf_counter()
        result = fetch_channel(desk.runtime, channel_id)
        postdesk_seconds = time.perf_counter() - started
        with desk.runtime.sessions() as session:
            articles = session.scalar(select(func.count()).select_from(Article)) or 0
        if result.error or articles != messages or parsed != messages:
            raise SystemExit(f"bench run invalid: {result.summary}; {articles} articles, {parsed} parsed")
    return ratio.Row(
        f"IMAP ingest, {messages:,} messages, {database} (msg/s)",
        messages / postdesk_seconds,
        messages / baseline_seconds,
        0.5,
    )


def print_table(rows: list[ratio.Row]) -> bool:
    return ratio.print_table("Inbound: IMAP into tickets (baseline: imaplib fetch + stdlib parse)", rows)


if __name__ == "__main__":
    sys.exit(0 if print_table(run()) else 1)
