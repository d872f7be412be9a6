"""Fixtures shared by the whole suite: settings, a migrated database on SQLite or PostgreSQL, the app."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from postdesk.config import Settings
from postdesk.db.models import Role, User
from postdesk.db.session import transaction
from postdesk.runtime import Runtime, bootstrap
from postdesk.sandbox import SandboxDirectory, SandboxServer
from postdesk.sandbox.mailserver import DovecotServer
from postdesk.sandbox.submission import SubmissionServer
from postdesk.tickets.people import create_user
from postdesk.web.app import create_app
from tests.support.postgres import postgres_cluster

TEST_SECRET_KEY = "test-secret-key-0123456789-abcdefghijklmnop"
ADMIN_PASSWORD = "admin-password-123"
AGENT_PASSWORD = "agent-password-123"
_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    """The sandbox Microsoft identity platform, one for the whole run (tests register their own apps)."""
    with SandboxServer(SandboxDirectory.default(), state_dir=tmp_path_factory.mktemp("sandbox")) as server:
        yield server


@pytest.fixture
def directory(sandbox: SandboxServer) -> Iterator[SandboxDirectory]:
    """The session's sandbox directory, with the clock and queued failures put back after each test."""
    yield sandbox.directory
    sandbox.directory.clock_offset = timedelta(0)
    while sandbox.directory.take_failure("authorize") or sandbox.directory.take_failure("token"):
        pass


@pytest.fixture(scope="session")
def dovecot(sandbox: SandboxServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotServer]:
    """A real Dovecot standing in for outlook.office365.com:993, trusting the sandbox's tokens."""
    server = DovecotServer(
        tmp_path_factory.mktemp("dovecot"), sandbox_base_url=sandbox.base_url, sandbox_ca=sandbox.ca_path
    )
    with server:
        yield server


@pytest.fixture(scope="session")
def submission(
    sandbox: SandboxServer, dovecot: DovecotServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SubmissionServer]:
    """A stand-in for smtp.office365.com:587 (STARTTLS, XOAUTH2) filing accepted mail into Dovecot."""
    server = SubmissionServer(sandbox.directory, tmp_path_factory.mktemp("submission"), dovecot=dovecot)
    with server:
        yield server


@pytest.fixture
def smtp_submission(submission: SubmissionServer) -> Iterator[SubmissionServer]:
    """The session's submission server with no queued faults, grants, SMTP AUTH switches or accepted mail
    left over, and its settings back to the defaults, before and after the test."""
    submission.reset()
    yield submission
    submission.reset()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


def _fresh_postgres_database(maintenance_url: str) -> str:
    name = f"postdesk_test_{next(_database_numbers)}"
    engine = create_engine(maintenance_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return maintenance_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that asks for it runs twice: on SQLite and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'postdesk.sqlite3'}"
    url: str = _fresh_postgres_database(request.getfixturevalue("postgres_url"))
    return url


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"data_dir": tmp_path / "data", "secret_key": TEST_SECRET_KEY}
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
def runtime(make_settings: Callable[..., Settings]) -> Iterator[Runtime]:
    """A migrated SQLite runtime (use ``db_runtime`` for tests that must also pass on PostgreSQL)."""
    runtime = bootstrap(make_settings(), apply_migrations=True)
    yield runtime
    runtime.engine.dispose()


@pytest.fixture
def db_runtime(make_settings: Callable[..., Settings], database_url: str) -> Iterator[Runtime]:
    runtime = bootstrap(make_settings(database_url=database_url), apply_migrations=True)
    yield runtime
    runtime.engine.dispose()


def add_user(runtime: Runtime, email: str, password: str, *, role: Role = Role.AGENT) -> User:
    with transaction(runtime.sessions) as session:
        return create_user(session, email=email, password=password, role=role)


@pytest.fixture
def admin(runtime: Runtime) -> User:
    return add_user(runtime, "admin@example.com", ADMIN_PASSWORD, role=Role.ADMIN)


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime), base_url="http://127.0.0.1:8025") as test_client:
        yield test_client


def csrf_from(html: str) -> str:
    marker = 'name="csrf_token" value="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


def sign_in(client: TestClient, email: str, password: str) -> None:
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"email": email, "password": password, "csrf_token": csrf_from(page.text)},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
