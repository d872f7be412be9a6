"""Ingest throughput: messages from a real Dovecot into tickets, next to a raw imaplib fetch-and-parse.

Both read the same 1,000 messages from the same mailbox over IMAPS with XOAUTH2 in the same run: the
baseline only downloads and parses them (stdlib imaplib + email), Postdesk also spools them durably,
records them, runs the pipeline and writes tickets, articles and attachments. Target: Postdesk reaches
at least half of the baseline's messages per second.
"""

from __future__ import annotations

import email
import email.policy
import gc
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from tests.support.dovecot import DovecotServer, access_token_for, imap_login
from tests.support.mailfactory import customer_mail
from tests.support.sandbox_browser import Browser

from postdesk.config import Settings
from postdesk.db.models import Article, Channel, MicrosoftApp, Role
from postdesk.db.session import transaction
from postdesk.ingest.fetch import fetch_channel
from postdesk.runtime import Runtime, bootstrap
from postdesk.sandbox import CONTOSO_TENANT_ID, SandboxDirectory, SandboxServer
from postdesk.tickets.people import create_user
from postdesk.web.app import create_app

BASE_URL = "http://127.0.0.1:8025"
BODY = (
    "Hello support team,\n\nour invoice shows the wrong VAT number and the delivery address is out of date. "
    "Could you correct both and send a new invoice?\n\nKind regards,\nJana\n"
) * 8


@dataclass(frozen=True)
class Row:
    name: str
    value: float
    baseline: float
    target_ratio: float

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else 0.0


def _connect_channel(runtime: Runtime, sandbox: SandboxServer, upn: str) -> int:
    app = sandbox.directory.register_app(
        display_name="Postdesk bench", redirect_uris=[f"{BASE_URL}/auth/microsoft365/callback"]
    )
    with transaction(runtime.sessions) as session:
        session.add(
            MicrosoftApp(
                client_id=app.client_id,
                tenant="contoso.onmicrosoft.com",
                client_secret=app.client_secrets[0].value,
            )
        )
        create_user(session, email="bench@example.com", password="bench-password-123", role=Role.ADMIN)
    context = ssl.create_default_context(cafile=str(sandbox.ca_path))
    import httpx

    with (
        TestClient(create_app(runtime), base_url=BASE_URL) as desk,
        httpx.Client(verify=context, trust_env=False, follow_redirects=False) as client,
    ):
        page = desk.get("/login")
        token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
        desk.post(
            "/login",
            data={"email": "bench@example.com", "password": "bench-password-123", "csrf_token": token},
        )
        start = desk.get("/auth/microsoft365/start", follow_redirects=False).headers["location"]
        params = Browser(client, redirect_uri=f"{BASE_URL}/auth/microsoft365/callback").sign_in(
            start, upn=upn
        )
        desk.get("/auth/microsoft365/callback", params=params, follow_redirects=False)
    with runtime.sessions() as session:
        channel_id: int = session.scalars(select(Channel.id)).one()
        return channel_id


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
    """Start each timed run with the garbage of the setup collected, for both sides alike.

    Building and delivering the test mail leaves the collector a full collection due, and otherwise
    whichever timed run allocates enough to trigger it pays for the setup (a tenth of a second or more,
    the same order as the difference being measured).
    """
    gc.collect()


def run(messages: int = 1000) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="postdesk-bench-"))
    directory = SandboxDirectory.default()
    upn = directory.add_user(
        upn="bench@contoso.onmicrosoft.com", display_name="Bench", tenant_id=CONTOSO_TENANT_ID
    ).upn
    with (
        SandboxServer(directory, state_dir=work / "sandbox") as sandbox,
        DovecotServer(
            work / "dovecot", sandbox_base_url=sandbox.base_url, sandbox_ca=sandbox.ca_path
        ) as dovecot,
    ):
        bundle = work / "cas.pem"
        bundle.write_text(sandbox.ca_path.read_text() + dovecot.ca_path.read_text())
        settings = Settings(
            data_dir=work / "data",
            secret_key="bench-secret-key-0123456789-abcdefghijkl",
            base_url=BASE_URL,
            microsoft_login_url=sandbox.base_url,
            ca_bundle=bundle,
            microsoft_imap=f"127.0.0.1:{dovecot.port}",
            log_level="WARNING",
        )
        runtime = bootstrap(settings, apply_migrations=True)
        channel_id = _connect_channel(runtime, sandbox, upn)
        fetch_channel(runtime, channel_id)  # where the folder stands; everything after is new mail
        dovecot.deliver_many(
            upn,
            [
                customer_mail(
                    to=upn,
                    subject=f"Invoice question {n}",
                    body=BODY,
                    sender=f"Customer {n % 97} <customer{n % 97}@example.org>",
                )
                for n in range(messages)
            ],
        )
        app = sandbox.directory.register_app(display_name="baseline")
        parsed, baseline_seconds = _baseline(dovecot, access_token_for(sandbox.directory, app, upn), upn)
        _collect_setup_garbage()
        started = time.perf_counter()
        result = fetch_channel(runtime, channel_id)
        postdesk_seconds = time.perf_counter() - started
        with runtime.sessions() as session:
            articles = session.scalar(select(func.count()).select_from(Article)) or 0
        if result.error or articles != messages or parsed != messages:
            raise SystemExit(f"bench run invalid: {result.summary}; {articles} articles, {parsed} parsed")
    return [
        Row(
            f"IMAP ingest, {messages} messages, SQLite (msg/s)",
            messages / postdesk_seconds,
            messages / baseline_seconds,
            0.5,
        )
    ]


def print_table(rows: list[Row]) -> bool:
    print(f"{'measurement':<52} {'Postdesk':>10} {'baseline':>10} {'ratio':>7} {'target':>8}  result")
    ok = True
    for row in rows:
        passed = row.ratio >= row.target_ratio
        ok &= passed
        print(
            f"{row.name:<52} {row.value:>10.1f} {row.baseline:>10.1f} {row.ratio:>7.2f} "
            f"{'>= ' + str(row.target_ratio):>8}  {'ok' if passed else 'BELOW TARGET'}"
        )
    return ok


if __name__ == "__main__":
    sys.exit(0 if print_table(run()) else 1)
