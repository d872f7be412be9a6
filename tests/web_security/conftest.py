"""A desk with a small per-address sign-in limit, browsers that come from chosen addresses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from postdesk.config import Settings
from postdesk.db.models import Role
from postdesk.runtime import Runtime, bootstrap
from postdesk.web.app import create_app
from tests.conftest import ADMIN_PASSWORD, AGENT_PASSWORD, add_user, csrf_from

BASE_URL = "http://127.0.0.1:8025"
LIMIT = 3  # failed sign-ins per client address in the window
ADMIN = "admin@example.com"
AGENT = "agent@example.com"

Browsers = Callable[..., TestClient]


@pytest.fixture
def throttled(make_settings: Callable[..., Settings]) -> Iterator[Runtime]:
    """A migrated SQLite desk allowing LIMIT failed sign-ins per address, with an admin and an agent."""
    runtime = bootstrap(make_settings(login_attempts_per_address=LIMIT), apply_migrations=True)
    add_user(runtime, ADMIN, ADMIN_PASSWORD, role=Role.ADMIN)
    add_user(runtime, AGENT, AGENT_PASSWORD, role=Role.AGENT)
    yield runtime
    runtime.engine.dispose()


@pytest.fixture
def browsers(throttled: Runtime) -> Iterator[Browsers]:
    """``browsers("198.51.100.7")``: a browser at that address, against one web process of the desk."""
    app = create_app(throttled)
    with ExitStack() as stack:

        def open_browser(address: str, **options: Any) -> TestClient:
            client = TestClient(
                options.pop("app", app), base_url=BASE_URL, client=(address, 50000), **options
            )
            return stack.enter_context(client)

        yield open_browser


def attempt(browser: TestClient, email: str, password: str, **headers: str) -> httpx.Response:
    """Open the sign-in page and send the form, as a person does."""
    token = csrf_from(browser.get("/login", headers=headers).text)
    response: httpx.Response = browser.post(
        "/login",
        data={"email": email, "password": password, "csrf_token": token},
        headers=headers,
        follow_redirects=False,
    )
    return response
