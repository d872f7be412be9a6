"""The Microsoft 365 redirect URI comes from POSTDESK_BASE_URL, never from the request's host headers.

Someone who can make the sign-in start under another host name (a hostile ``Host`` or
``X-Forwarded-Host`` passed on by a careless proxy) must not get the authorization code sent to
their site. Against the sandbox identity platform, which refuses a redirect URI that is not
registered, and a token request whose redirect URI differs from the authorize request's.

Already covered elsewhere (tests/microsoft365/test_connect_mailboxes.py): PKCE S256, state and nonce
on the authorize request (``test_the_authorize_request_uses_pkce_state_nonce_and_the_outlook_scopes``),
a replayed callback (``test_a_replayed_callback_is_refused``), a callback in another admin's session
(``test_a_callback_in_another_browser_session_is_refused``) and a forged or missing state.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from postdesk.config import Settings
from postdesk.db.models import Role
from postdesk.runtime import Runtime, bootstrap
from postdesk.sandbox import SandboxDirectory, SandboxServer
from postdesk.web.app import create_app
from tests.conftest import ADMIN_PASSWORD, add_user, sign_in
from tests.microsoft365.conftest import ADELE, BASE_URL, CALLBACK, channels, store_app
from tests.support.sandbox_browser import Browser

HOSTILE_HEADERS = {
    "host": "evil.example",
    "x-forwarded-host": "evil.example",
    "x-forwarded-proto": "https",
    "x-forwarded-port": "443",
    "forwarded": "host=evil.example;proto=https",
    "x-original-url": "https://evil.example/",
}


@pytest.fixture
def desk_runtime(
    make_settings: Callable[..., Settings], sandbox: SandboxServer, tmp_path: Path
) -> Iterator[Runtime]:
    settings = make_settings(
        base_url=BASE_URL, microsoft_login_url=sandbox.base_url, ca_bundle=sandbox.ca_path
    )
    runtime = bootstrap(settings, apply_migrations=True)
    yield runtime
    runtime.engine.dispose()


@pytest.fixture
def admin_browser(desk_runtime: Runtime, directory: SandboxDirectory) -> Iterator[TestClient]:
    """An admin of a desk whose app registration knows only the configured callback."""
    store_app(desk_runtime, directory.register_app(display_name="Postdesk", redirect_uris=[CALLBACK]))
    add_user(desk_runtime, "admin@example.com", ADMIN_PASSWORD, role=Role.ADMIN)
    with TestClient(create_app(desk_runtime), base_url=BASE_URL) as client:
        sign_in(client, "admin@example.com", ADMIN_PASSWORD)
        yield client


@pytest.fixture
def microsoft(sandbox: SandboxServer) -> Iterator[Browser]:
    context = ssl.create_default_context(cafile=str(sandbox.ca_path))
    with httpx.Client(verify=context, trust_env=False, follow_redirects=False, timeout=10) as client:
        yield Browser(client, redirect_uri=CALLBACK)


def _query(location: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}


def test_a_sign_in_started_under_a_hostile_host_still_returns_to_the_configured_callback(
    admin_browser: TestClient, microsoft: Browser, desk_runtime: Runtime
) -> None:
    start = admin_browser.get("/auth/microsoft365/start", headers=HOSTILE_HEADERS, follow_redirects=False)
    assert start.status_code == 302, start.text
    location = start.headers["location"]
    assert _query(location)["redirect_uri"] == CALLBACK
    assert "evil" not in location
    # Microsoft sends the browser back to the configured callback only, and the code is redeemed with
    # the same redirect URI (the sandbox checks both): the mailbox connects.
    params = microsoft.sign_in(location, upn=ADELE)
    back = admin_browser.get(
        "/auth/microsoft365/callback", params=params, headers=HOSTILE_HEADERS, follow_redirects=False
    )
    assert back.status_code == 303, back.text
    assert back.headers["location"].startswith("/channels?notice=connected")
    assert [channel.email for channel in channels(desk_runtime)] == [ADELE]


def test_admin_consent_under_a_hostile_host_returns_to_the_configured_callback(
    admin_browser: TestClient,
) -> None:
    consent = admin_browser.get(
        "/channels/microsoft365/admin-consent", headers=HOSTILE_HEADERS, follow_redirects=False
    )
    assert consent.status_code == 302, consent.text
    assert _query(consent.headers["location"])["redirect_uri"] == CALLBACK
    assert "evil" not in consent.headers["location"]


def test_the_callback_the_admin_is_told_to_register_ignores_the_host(admin_browser: TestClient) -> None:
    for path in ("/channels", "/settings"):
        page = admin_browser.get(path, headers=HOSTILE_HEADERS)
        assert page.status_code == 200
        assert CALLBACK in page.text, path
        assert "evil.example" not in page.text, path
