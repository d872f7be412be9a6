"""What every benchmark starts from: the sandbox, the test Dovecot and a desk with mailboxes connected.

Mailboxes are connected the way an admin connects them (the sign-in flow against the sandbox identity
platform), so the channels hold real refresh tokens and fetches run the whole path: token, XOAUTH2,
IMAP. The database is SQLite in the work directory unless a PostgreSQL URL is given.
"""

from __future__ import annotations

import ssl
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import select
from tests.support.dovecot import DovecotServer
from tests.support.sandbox_browser import Browser
from tests.support.tls import ca_bundle

from postdesk.config import Settings
from postdesk.db.models import Channel, MicrosoftApp, Role
from postdesk.db.session import transaction
from postdesk.runtime import Runtime, bootstrap
from postdesk.sandbox import CONTOSO_TENANT_ID, SandboxDirectory, SandboxServer
from postdesk.sandbox.submission import SubmissionServer
from postdesk.tickets.people import create_user
from postdesk.web.app import create_app

BASE_URL = "http://127.0.0.1:8025"
CALLBACK = f"{BASE_URL}/auth/microsoft365/callback"
SECRET_KEY = "bench-secret-key-0123456789-abcdefghijkl"
ADMIN, ADMIN_PASSWORD = "bench@example.com", "bench-password-123"


@dataclass
class BenchDesk:
    work: Path
    directory: SandboxDirectory
    sandbox: SandboxServer
    dovecot: DovecotServer
    settings: Settings
    runtime: Runtime
    submission: SubmissionServer | None = None
    _app_registered: bool = field(default=False, repr=False)

    def add_mailboxes(self, count: int, prefix: str = "desk") -> list[str]:
        """Users in the sandbox tenant, one per mailbox; returns their addresses."""
        return [
            self.directory.add_user(
                upn=f"{prefix}{n}@contoso.onmicrosoft.com",
                display_name=f"Desk {n}",
                tenant_id=CONTOSO_TENANT_ID,
            ).upn
            for n in range(1, count + 1)
        ]

    def connect(self, upns: list[str]) -> dict[str, int]:
        """Connect each mailbox by signing in as its user; returns channel ids by address."""
        self._register_app()
        context = ssl.create_default_context(cafile=str(self.sandbox.ca_path))
        with (
            TestClient(create_app(self.runtime), base_url=BASE_URL) as desk,
            httpx.Client(verify=context, trust_env=False, follow_redirects=False) as client,
        ):
            page = desk.get("/login")
            token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
            desk.post("/login", data={"email": ADMIN, "password": ADMIN_PASSWORD, "csrf_token": token})
            browser = Browser(client, redirect_uri=CALLBACK)
            for upn in upns:
                start = desk.get("/auth/microsoft365/start", follow_redirects=False).headers["location"]
                params = browser.sign_in(start, upn=upn)
                answer = desk.get("/auth/microsoft365/callback", params=params, follow_redirects=False)
                if answer.status_code != 303:
                    raise SystemExit(f"bench set-up failed: connecting {upn} answered {answer.status_code}")
        with self.runtime.sessions() as session:
            rows = session.execute(select(Channel.email, Channel.id).where(Channel.email.in_(upns))).all()
        return {email: channel_id for email, channel_id in rows}

    def _register_app(self) -> None:
        if self._app_registered:
            return
        app = self.directory.register_app(display_name="Postdesk bench", redirect_uris=[CALLBACK])
        with transaction(self.runtime.sessions) as session:
            session.add(
                MicrosoftApp(
                    client_id=app.client_id,
                    tenant="contoso.onmicrosoft.com",
                    client_secret=app.client_secrets[0].value,
                )
            )
            create_user(session, email=ADMIN, password=ADMIN_PASSWORD, role=Role.ADMIN)
        self._app_registered = True


@contextmanager
def bench_desk(*, database_url: str | None = None, smtp: bool = False) -> Iterator[BenchDesk]:
    work = Path(tempfile.mkdtemp(prefix="postdesk-bench-"))
    directory = SandboxDirectory.default()
    with ExitStack() as stack:
        sandbox = stack.enter_context(SandboxServer(directory, state_dir=work / "sandbox"))
        dovecot = stack.enter_context(
            DovecotServer(work / "dovecot", sandbox_base_url=sandbox.base_url, sandbox_ca=sandbox.ca_path)
        )
        submission = None
        if smtp:
            submission = stack.enter_context(
                SubmissionServer(
                    directory,
                    state_dir=work / "submission",
                    dovecot=dovecot,
                )
            )
        settings = Settings(
            data_dir=work / "data",
            secret_key=SECRET_KEY,
            base_url=BASE_URL,
            database_url=database_url,
            microsoft_login_url=sandbox.base_url,
            ca_bundle=ca_bundle(work / "cas.pem", sandbox, dovecot, *([submission] if submission else [])),
            microsoft_imap=f"127.0.0.1:{dovecot.port}",
            microsoft_smtp=f"127.0.0.1:{submission.port}" if submission else None,
            log_level="WARNING",
        )
        runtime = bootstrap(settings, apply_migrations=True)
        stack.callback(runtime.engine.dispose)
        yield BenchDesk(work, directory, sandbox, dovecot, settings, runtime, submission)
