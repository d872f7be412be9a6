"""Fixtures for the sandbox identity platform: one HTTPS server for the session, real MSAL, and a
tiny scripted browser that fills in the sign-in and consent pages."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from datetime import timedelta
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qsl, urljoin, urlsplit

import httpx
import msal
import pytest
import requests

from postdesk.sandbox import CONTOSO_TENANT_ID, RegisteredApp, SandboxDirectory, SandboxServer

# MSAL ships no type hints, so its objects are Any here.
MsalFactory = Callable[..., Any]
REDIRECT_URI = "https://desk.example.test/auth/microsoft365/callback"
OUTLOOK_SCOPES = [
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
]


class _Forms(HTMLParser):
    """Collects every form on a page as (action, fields)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms.append((attributes.get("action", ""), {}))
        elif tag == "input" and self.forms and "name" in attributes:
            self.forms[-1][1][attributes["name"]] = attributes.get("value", "")


class Browser:
    """Drives the sandbox pages the way a person would: open a URL, press a button."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def open(self, url: str) -> httpx.Response:
        return self.client.get(url)

    def press(self, page: httpx.Response, **wanted: str) -> httpx.Response:
        """Submit the form on ``page`` whose fields include all of ``wanted``."""
        parser = _Forms()
        parser.feed(page.text)
        for action, fields in parser.forms:
            if all(fields.get(name) == value for name, value in wanted.items()):
                return self.client.post(urljoin(str(page.url), action), data=fields)
        raise AssertionError(f"no form with {wanted} on the page:\n{page.text}")

    def use_another_account(self, page: httpx.Response, upn: str) -> httpx.Response:
        """Type an address into the "Use another account" box instead of picking a listed account."""
        parser = _Forms()
        parser.feed(page.text)
        action, fields = next(
            (a, f) for a, f in parser.forms if f.keys() == {"flow", "login"} and not f["login"]
        )
        return self.client.post(urljoin(str(page.url), action), data={**fields, "login": upn})

    def sign_in(self, auth_uri: str, *, upn: str, consent: str | None = "accept") -> dict[str, str]:
        """Sign in as ``upn`` and answer the consent page if one comes; return the app's callback
        parameters."""
        page = self.press(self.open(auth_uri), login=upn)
        if page.status_code == 200 and consent is not None:
            page = self.press(page, decision=consent)
        return callback_parameters(page)


def callback_parameters(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT_URI), location
    return dict(parse_qsl(urlsplit(location).query))


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    server = SandboxServer(SandboxDirectory.default(), state_dir=tmp_path_factory.mktemp("sandbox"))
    with server:
        yield server


@pytest.fixture
def directory(sandbox: SandboxServer) -> Iterator[SandboxDirectory]:
    """The session's directory, with the clock and queued failures put back after each test."""
    yield sandbox.directory
    sandbox.directory.clock_offset = timedelta(0)
    while sandbox.directory.take_failure("authorize") or sandbox.directory.take_failure("token"):
        pass


@pytest.fixture
def web_app(directory: SandboxDirectory) -> RegisteredApp:
    """A fresh single-tenant app registration in Contoso, so consents never leak between tests."""
    return directory.register_app(display_name="Postdesk (test)", redirect_uris=[REDIRECT_URI])


@pytest.fixture
def http_session(sandbox: SandboxServer) -> Iterator[requests.Session]:
    # MSAL's own verify= is ignored when REQUESTS_CA_BUNDLE is set, so trust goes on the session.
    session = requests.Session()
    session.trust_env = False
    session.verify = str(sandbox.ca_path)
    yield session
    session.close()


@pytest.fixture
def browser(sandbox: SandboxServer) -> Iterator[Browser]:
    context = ssl.create_default_context(cafile=str(sandbox.ca_path))
    with httpx.Client(verify=context, trust_env=False, follow_redirects=False, timeout=10) as client:
        yield Browser(client)


@pytest.fixture
def make_msal(sandbox: SandboxServer, http_session: requests.Session) -> MsalFactory:
    """Build a real MSAL confidential client for an app; a new one per call, because MSAL caches
    discovery documents and HTTP 400 answers per instance."""

    def factory(
        app: RegisteredApp, *, credential: object = None, tenant: str = CONTOSO_TENANT_ID, **options: Any
    ) -> Any:
        return msal.ConfidentialClientApplication(
            app.client_id,
            client_credential=credential if credential is not None else app.client_secrets[0].value,
            authority=f"{sandbox.base_url}/{tenant}",
            instance_discovery=options.pop("instance_discovery", False),
            http_client=http_session,
            **options,
        )

    return factory
